"""Data contracts shared by every step (see DESIGN.md, "Data contracts")."""

from __future__ import annotations

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
