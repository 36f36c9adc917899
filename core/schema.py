"""Data contracts shared by every step (see DESIGN.md, "Data contracts")."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pandera.pandas as pa

#: Canonical long observations: one row per measurement, canonical unit, pseudonymised id.
OBSERVATION_COLUMNS = ["patient_id", "time", "code", "value", "source"]

#: Quarantined records keep where they came from and why they were rejected.
QUARANTINE_COLUMNS = ["file", "line", "field", "reason", "record"]

#: Outcomes: deterioration events; follow-up/censoring lives in the patient table.
OUTCOME_COLUMNS = ["patient_id", "time", "event"]

#: Patient table: static covariates, care setting, follow-up window and consent per purpose.
PATIENT_COLUMNS = [
    "patient_id",
    "setting",
    "age",
    "sex",
    "followup_start",
    "followup_end",
    "consent_care",
    "consent_model_training",
    "consent_research",
]

CONSENT_PURPOSES = ("care", "model_training", "research")

observation_schema = pa.DataFrameSchema(
    {
        "patient_id": pa.Column(str, nullable=False),
        "time": pa.Column(pd.DatetimeTZDtype(tz="UTC"), nullable=False),
        "code": pa.Column(str, nullable=False),
        "value": pa.Column(
            float, nullable=False, checks=pa.Check(lambda s: s.abs() < float("inf"))
        ),
        "source": pa.Column(str, nullable=False),
    },
    strict=False,
    ordered=False,
)

outcome_schema = pa.DataFrameSchema(
    {
        "patient_id": pa.Column(str, nullable=False),
        "time": pa.Column(pd.DatetimeTZDtype(tz="UTC"), nullable=False),
        "event": pa.Column(str, nullable=False),
    },
    strict=False,
)

# Prediction log (serving writes, monitoring reads): the SQLite tables of docs/contracts.md.
PREDICTION_LOG_COLUMNS = (
    "request_id",
    "scored_at",
    "patient_id",
    "model_name",
    "model_version",
    "role",
    "probability",
    "news2_total",
    "features",
    "setting",
    "horizon_hours",
)
OUTCOME_LOG_COLUMNS = ("request_id", "patient_id", "event_time", "event", "label", "received_at")

PREDICTIONS_DDL = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT, scored_at TEXT, patient_id TEXT, model_name TEXT, model_version TEXT,
    role TEXT, probability REAL, news2_total REAL, features TEXT, setting TEXT,
    horizon_hours REAL
)"""
#: columns added after the first release: (name, SQL type); logs written before get them
#: with NULLs (unknown setting/horizon) by ``upgrade_prediction_log``
PREDICTIONS_ADDED = (("setting", "TEXT"), ("horizon_hours", "REAL"))
OUTCOMES_DDL = """
CREATE TABLE IF NOT EXISTS outcomes (
    request_id TEXT, patient_id TEXT, event_time TEXT, event TEXT, label INTEGER,
    received_at TEXT
)"""


def upgrade_prediction_log(con: sqlite3.Connection) -> None:
    """Create the prediction-log tables, or add the newer columns to an older log."""
    con.execute(PREDICTIONS_DDL)
    con.execute(OUTCOMES_DDL)
    have = {row[1] for row in con.execute("PRAGMA table_info(predictions)")}
    for name, sql_type in PREDICTIONS_ADDED:
        if name not in have:
            con.execute(f"ALTER TABLE predictions ADD COLUMN {name} {sql_type}")
