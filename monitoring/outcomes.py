"""Outcome feedback: turn a file of outcomes into labels of logged predictions.

Two shapes are accepted, because outcomes come back either from the system that made the
request (it knows ``request_id``) or from the clinical record (it knows patient and time):

* ``request_id`` with ``label`` (0/1) or ``event`` (empty / ``none`` = no event);
* ``patient_id``, ``time``, ``event``: every prediction of that patient gets label 1 when an
  event follows it within the horizon, 0 when the patient is known event-free for the whole
  horizon (a row with a later ``time``, e.g. ``event`` = ``none`` at discharge), and no label
  otherwise (censored: monitoring must not count unknowns as negatives). The horizon is the
  one the model predicts for the patient's care setting (training: ward 24 h, home 168 h),
  as the service logged it with the prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from monitoring.prediction_log import iso

logger = logging.getLogger(__name__)

NO_EVENT = {"", "none", "no", "0", "nan", "null", "censored"}


class OutcomeFileError(ValueError):
    """The outcome file is not in one of the accepted shapes (message names what is wrong)."""


def read_outcome_file(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise OutcomeFileError(f"{p}: outcome file not found")
    if p.suffix.lower() in {".parquet", ".pq"}:
        df = pd.read_parquet(p)
    elif p.suffix.lower() in {".csv", ".txt"}:
        df = pd.read_csv(p, dtype={"request_id": str, "patient_id": str, "event": str})
    else:
        raise OutcomeFileError(f"{p}: expected a .csv or .parquet outcome file")
    if "request_id" not in df.columns and not {"patient_id", "time"} <= set(df.columns):
        raise OutcomeFileError(
            f"{p}: expected columns request_id (+ label or event) or patient_id, time, event; "
            f"found {list(df.columns)}"
        )
    if "request_id" in df.columns and not ({"label", "event"} & set(df.columns)):
        raise OutcomeFileError(f"{p}: request_id rows need a label or an event column")
    return df


def _is_event(values: pd.Series) -> pd.Series:
    return ~values.fillna("").astype(str).str.strip().str.lower().isin(NO_EVENT)


def labels_by_request(outcomes: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """Outcome-table rows for request-keyed outcomes; unknown request ids are dropped (logged)."""
    df = outcomes.copy()
    df["request_id"] = df["request_id"].astype(str)
    if "label" in df.columns:
        label = pd.to_numeric(df["label"], errors="coerce")
        bad = label.notna() & ~label.isin([0, 1])
        if bad.any():
            raise OutcomeFileError(
                f"row {int(np.flatnonzero(bad.to_numpy())[0]) + 1}: label must be 0 or 1"
            )
        if "event" in df.columns:
            label = label.fillna(_is_event(df["event"]).astype(float))
    else:
        label = _is_event(df["event"]).astype(float)
    df["label"] = label
    preds = predictions[["request_id", "patient_id"]]
    if "patient_id" in df.columns:  # both keys given: both must match (contract join)
        df["patient_id"] = df["patient_id"].astype(str)
        merged = df.merge(preds, on=["request_id", "patient_id"], how="inner")
    else:
        merged = df.merge(preds, on="request_id", how="inner")
    dropped = len(df) - len(merged)
    if dropped:
        logger.warning("%d outcome rows matched no logged prediction", dropped)
    event_time = (
        pd.to_datetime(merged["time"], utc=True).map(iso) if "time" in merged.columns else None
    )
    return pd.DataFrame(
        {
            "request_id": merged["request_id"],
            "patient_id": merged["patient_id"],
            "event_time": event_time,
            "event": merged["event"] if "event" in merged.columns else None,
            "label": merged["label"].astype(int),
        }
    ).dropna(subset=["label"])


def prediction_horizons(
    predictions: pd.DataFrame, horizon_hours: Mapping[str, float] | float
) -> pd.Series:
    """Label horizon of each prediction: the one the service logged with it (the served
    model's, for the patient's care setting), else ``horizon_hours`` by setting (``"*"`` for
    any), else missing (such a prediction gets no label)."""
    by_setting = dict(horizon_hours) if isinstance(horizon_hours, Mapping) else {"*": horizon_hours}
    setting = predictions.get("setting", pd.Series(None, index=predictions.index, dtype=object))
    fallback = setting.map(lambda s: by_setting.get(str(s), by_setting.get("*")))
    logged = pd.to_numeric(
        predictions.get("horizon_hours", pd.Series(np.nan, index=predictions.index)),
        errors="coerce",
    )
    return logged.fillna(pd.to_numeric(fallback, errors="coerce"))


def labels_by_patient_time(
    outcomes: pd.DataFrame, predictions: pd.DataFrame, horizon_hours: Mapping[str, float] | float
) -> pd.DataFrame:
    """Outcome-table rows for patient/time outcomes (see the module docstring)."""
    predictions = predictions.assign(
        _horizon=pd.to_timedelta(prediction_horizons(predictions, horizon_hours), unit="h")
    )
    unknown = int(predictions["_horizon"].isna().sum())
    if unknown:
        logger.warning("%d predictions have no known label horizon: left unlabelled", unknown)
        predictions = predictions[predictions["_horizon"].notna()]
    o = outcomes[["patient_id", "time", "event"]].copy()
    o["patient_id"] = o["patient_id"].astype(str)
    o["time"] = pd.to_datetime(o["time"], utc=True, errors="coerce")
    if o["time"].isna().any():
        row = int(np.flatnonzero(o["time"].isna().to_numpy())[0]) + 1
        raise OutcomeFileError(f"row {row}: time is not a date-time")
    o["is_event"] = _is_event(o["event"])
    follow = o.groupby("patient_id")["time"].max().rename("known_until")
    pairs = predictions.merge(o[o.is_event], on="patient_id", how="left")
    in_window = (pairs["time"] > pairs["scored_at"]) & (
        pairs["time"] <= pairs["scored_at"] + pairs["_horizon"]
    )
    pairs["hit"] = in_window
    first_hit = (
        pairs[pairs.hit]
        .sort_values("time")
        .drop_duplicates("request_id")[["request_id", "time", "event"]]
    )
    out = predictions.merge(follow, on="patient_id", how="inner").merge(
        first_hit, on="request_id", how="left"
    )
    positive = out["time"].notna()
    negative = ~positive & (out["known_until"] >= out["scored_at"] + out["_horizon"])
    out = out[positive | negative]
    return pd.DataFrame(
        {
            "request_id": out["request_id"],
            "patient_id": out["patient_id"],
            "event_time": out["time"].map(lambda t: iso(t) if pd.notna(t) else None),
            "event": out["event"].where(positive[positive | negative], None),
            "label": positive[positive | negative].astype(int),
        }
    )


def outcome_rows(
    outcomes: pd.DataFrame, predictions: pd.DataFrame, horizon_hours: Mapping[str, float] | float
) -> pd.DataFrame:
    """Rows for the ``outcomes`` table (contract columns) from either accepted shape."""
    if "request_id" in outcomes.columns:
        rows = labels_by_request(outcomes, predictions)
    else:
        rows = labels_by_patient_time(outcomes, predictions, horizon_hours)
    rows = rows.copy()
    rows["received_at"] = iso(datetime.now(UTC))
    return rows.reset_index(drop=True)
