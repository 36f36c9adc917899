"""One-row-per-patient cohorts: a single prediction time per patient and a time-to-event outcome.

Why a separate adapter: the train/evaluate path expects a binary ``label`` at a horizon. A
survival-style outcome (time to event, event indicator, censoring) becomes that label:

* event observed at or before the horizon            -> label 1
* event after the horizon, or censored at/after it   -> label 0 (known event-free at horizon)
* censored before the horizon without an event       -> excluded (outcome at horizon unknown)

Everything else (patient split, LightGBM with categorical covariates, calibration, metrics vs
NEWS2, registry) is the same code as for the repeated-measures feature matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortLabels:
    frame: pd.DataFrame  # kept rows with ``label``
    event_times: dict[str, pd.Timestamp]  # patient -> event time (for lead time)
    n_positive: int
    n_negative: int
    n_excluded_censored: int


def label_at_horizon(
    cohort: pd.DataFrame,
    horizon_days: float,
    time_to_event: str = "time_to_event_days",
    event: str = "event",
) -> CohortLabels:
    """Binary label at ``horizon_days`` from a time-to-event outcome with censoring.

    ``cohort`` has one row per ``patient_id`` with the prediction ``time``; ``time_to_event`` is
    days from ``time`` to the event or censoring, ``event`` is 1 if the event was observed.
    Pure: returns a new frame without the outcome columns.
    """
    for c in ("patient_id", "time", time_to_event, event):
        if c not in cohort.columns:
            raise ValueError(f"cohort is missing column {c!r}")
    if cohort["patient_id"].duplicated().any():
        raise ValueError("cohort must have one row per patient_id")
    tte = pd.to_numeric(cohort[time_to_event], errors="raise").to_numpy(float)
    ev = cohort[event].astype(int).to_numpy()
    if np.any(tte < 0) or np.isnan(tte).any():
        raise ValueError(f"{time_to_event} must be non-negative and present")
    positive = (ev == 1) & (tte <= horizon_days)
    negative = (tte > horizon_days) | ((ev == 0) & (tte >= horizon_days))
    censored_early = (ev == 0) & (tte < horizon_days)
    keep = positive | negative
    out = cohort.loc[keep].drop(columns=[time_to_event, event]).copy()
    out["label"] = positive[keep].astype(int)
    times = pd.to_datetime(cohort["time"], utc=True)
    ev_mask = ev == 1
    ev_times = times[ev_mask] + pd.to_timedelta(tte[ev_mask], unit="D")
    event_times = dict(zip(cohort.loc[ev_mask, "patient_id"], ev_times, strict=True))
    cols = ["patient_id", "time", *(["setting"] if "setting" in out.columns else []), "label"]
    out = out[cols + [c for c in out.columns if c not in cols]].reset_index(drop=True)
    res = CohortLabels(
        frame=out,
        event_times=event_times,
        n_positive=int(positive.sum()),
        n_negative=int(negative.sum()),
        n_excluded_censored=int(censored_early.sum()),
    )
    log.info(
        "cohort labels at %.0f days: %d positive, %d negative, %d censored before horizon excluded",
        horizon_days,
        res.n_positive,
        res.n_negative,
        res.n_excluded_censored,
    )
    return res
