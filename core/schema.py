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


#: every answer serving gave, one row per patient (also ``insufficient_data`` answers, which
#: have no probability and so no ``predictions`` row): what the worklist, the patient summary
#: and the cohort view are built from. ``key_name`` is the API key that asked (pseudonyms are
#: resolved to caller ids only for that key); ``reasons`` JSON list of texts, ``latest`` JSON
#: object vocabulary key -> newest observation time
ANSWER_LOG_COLUMNS = (
    "request_id",
    "scored_at",
    "as_of",
    "patient_id",
    "key_name",
    "model_name",
    "model_version",
    "status",
    "probability",
    "risk_band",
    "model_risk_band",
    "alert",
    "escalation",
    "news2_total",
    "news2_max_single",
    "setting",
    "horizon_hours",
    "age_band",
    "reasons",
    "latest",
)
ANSWERS_DDL = """
CREATE TABLE IF NOT EXISTS answers (
    request_id TEXT, scored_at TEXT, as_of TEXT, patient_id TEXT, key_name TEXT,
    model_name TEXT, model_version TEXT, status TEXT, probability REAL, risk_band TEXT,
    model_risk_band TEXT, alert INTEGER, escalation TEXT, news2_total REAL,
    news2_max_single REAL, setting TEXT, horizon_hours REAL, age_band TEXT, reasons TEXT,
    latest TEXT
)"""
#: acknowledgements of an answer on the worklist (also audit entries ``acknowledge``)
ACK_LOG_COLUMNS = ("acked_at", "patient_id", "key_name", "request_id")
ACKS_DDL = """
CREATE TABLE IF NOT EXISTS acknowledgements (
    acked_at TEXT, patient_id TEXT, key_name TEXT, request_id TEXT
)"""


def upgrade_prediction_log(con: sqlite3.Connection) -> None:
    """Create the prediction-log tables, or add the newer columns to an older log."""
    con.execute(PREDICTIONS_DDL)
    con.execute(OUTCOMES_DDL)
    con.execute(ANSWERS_DDL)
    con.execute(ACKS_DDL)
    con.execute("CREATE INDEX IF NOT EXISTS answers_key_patient ON answers (key_name, patient_id)")
    con.execute("CREATE INDEX IF NOT EXISTS answers_patient_time ON answers (patient_id, as_of)")
    have = {row[1] for row in con.execute("PRAGMA table_info(predictions)")}
    for name, sql_type in PREDICTIONS_ADDED:
        if name not in have:
            con.execute(f"ALTER TABLE predictions ADD COLUMN {name} {sql_type}")
