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


@dataclass(frozen=True)
class CohortMatrix:
    frame: pd.DataFrame  # patient_id, time, setting?, covariates, codes, news2_*, tte, event
    text_columns: list[str]  # text columns (used only if declared categorical in train)
    news2_partial_rows: int  # rows whose NEWS2 lacks at least one of its seven inputs


def cohort_matrix(
    cohort: pd.DataFrame, scale2_flags: tuple[str, ...] = ("spo2_scale2", "cm_copd")
) -> CohortMatrix:
    """The ingest stage's ``cohort.parquet`` as a train-ready one-row-per-patient frame.

    Adds ``sex_f``, the NEWS2 sub-scores and total from the snapshot's vital columns, with
    ``news2_n_missing`` and ``news2_partial`` (1 when any of its inputs is absent, so a
    partial NEWS2 is never mistaken for a full one), and keeps ``time_to_event_days`` and
    ``event`` for :func:`label_at_horizon`. Pure.
    """
    from features.news2 import NEWS2_CODES, news2_scores

    for c in ("patient_id", "time", "time_to_event_days", "event"):
        if c not in cohort.columns:
            raise ValueError(
                f"cohort is missing column {c!r} (expected ingest's cohort.parquet: index_time, "
                "time_to_event_h or _days, event_observed or a 0/1 event)"
            )
    out = cohort.copy()
    if "sex" in out and "sex_f" not in out:
        out["sex_f"] = out["sex"].map({"F": 1.0, "M": 0.0}).astype(float)
    latest = {
        k: out[code].to_numpy(float) if code in out else np.full(len(out), np.nan)
        for k, code in NEWS2_CODES.items()
    }
    scale2 = np.zeros(len(out), dtype=bool)
    for flag in scale2_flags:
        if flag in out:
            scale2 |= pd.to_numeric(out[flag], errors="coerce").fillna(0).to_numpy() > 0
    scores = news2_scores(latest, scale2)
    if "news2_total" in cohort.columns:  # a prepared cohort brings its own NEWS2
        scores = {"news2_n_missing": np.zeros(len(out))}
    for k, v in scores.items():
        out[k] = v
    out["news2_partial"] = (scores["news2_n_missing"] > 0).astype(float)
    text = [
        c for c in out.columns if out[c].dtype == object and c not in ("patient_id", "event_type")
    ]
    res = CohortMatrix(out, text, int((scores["news2_n_missing"] > 0).sum()))
    log.info("cohort matrix: %d rows, NEWS2 partial in %d", len(out), res.news2_partial_rows)
    return res


#: the labelled cohort rows train saves beside run.json (evaluate and register score them)
COHORT_FEATURES = "cohort_features.parquet"


def features_path(model_dir: str, default: str | None) -> str | None:
    """The feature rows a model was trained on: the cohort's when train used the cohort path."""
    from pathlib import Path

    p = Path(model_dir) / COHORT_FEATURES
    return str(p) if p.is_file() else default
