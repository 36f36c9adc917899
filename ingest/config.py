"""Typed params of the ``ingest`` section of ``params.yaml``: how raw files become observations.

Kept apart from ``features/config.py`` (feature engineering) so each stage's keys stay in its
own model and dvc.yaml can list them exactly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class WideColumn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    unit: str | None = None


#: PhysioNet/CinC 2019 column names (the defaults for ``ingest.psv_columns``)
PHYSIONET_COLUMNS = {
    "HR": WideColumn(code="heart_rate", unit="/min"),
    "O2Sat": WideColumn(code="spo2", unit="%"),
    "Temp": WideColumn(code="body_temp", unit="Cel"),
    "SBP": WideColumn(code="sbp", unit="mm[Hg]"),
    "DBP": WideColumn(code="dbp", unit="mm[Hg]"),
    "Resp": WideColumn(code="resp_rate", unit="/min"),
    "FiO2": WideColumn(code="o2_support", unit="{FiO2}"),
    "Creatinine": WideColumn(code="creatinine", unit="mg/dL"),
    "Lactate": WideColumn(code="lactate", unit="mmol/L"),
}


class IngestConfig(BaseModel):
    """How raw files map onto canonical observations, and who may be used for what."""

    model_config = ConfigDict(extra="forbid")
    #: consent purpose the outputs are for; patients without that consent are excluded
    purpose: Literal["care", "model_training", "research"] = "model_training"
    #: patients with no consent record at all (no patients table row): exclude or include
    missing_consent: Literal["exclude", "include"] = "exclude"
    #: naive timestamps (no offset): assume UTC, or reject them to quarantine
    naive_time: Literal["utc", "reject"] = "utc"
    #: wide CSV (and cohort) column -> vocabulary code and unit; vocabulary keys work as-is
    wide_columns: dict[str, WideColumn] = Field(default_factory=dict)
    #: PhysioNet-style PSV column -> vocabulary code and unit
    psv_columns: dict[str, WideColumn] = Field(default_factory=lambda: dict(PHYSIONET_COLUMNS))
    #: PSV time anchor when a directory has no anchors.csv (ISO time, UTC); None -> error
    psv_anchor: str | None = None
    #: source label for rows that carry none, per reader format
    default_source: dict[str, str] = Field(
        default_factory=lambda: {
            "long_csv": "unknown",
            "long_parquet": "unknown",
            "wide_csv": "wearable",
            "fhir": "ward",
            "psv": "ward",
        }
    )
    #: regex of raw identifiers scrubbed (pseudonymised) from quarantined record text
    identifier_pattern: str = r"MRN-\d+"
    #: validate each FHIR resource with fhir.resources (R4B models) as well as our mapping
    fhir_validate: bool = True
