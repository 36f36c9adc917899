"""Typed params of the ``ingest`` section of ``params.yaml``: how raw files become observations.

Kept apart from ``features/config.py`` (feature engineering) so each stage's keys stay in its
own model and dvc.yaml can list them exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingest.canonical import DAY_NS, MINUTE_NS, TimeWindow


class WideColumn(BaseModel):
    """A source column -> a vocabulary code, in ``unit`` (None: the code's default unit)."""

    model_config = ConfigDict(extra="forbid")
    code: str
    unit: str | None = None


#: one column may feed several codes (PSV FiO2 -> fio2 and o2_support)
ColumnMap = WideColumn | list[WideColumn]


def _w(code: str, unit: str) -> WideColumn:
    return WideColumn(code=code, unit=unit)


#: PhysioNet/CinC 2019 clinical columns (https://physionet.org/content/challenge-2019/1.0.0/,
#: "Table 1"), as units the values are in (see config/vocabulary.yaml for the three labels
#: that disagree with the data: FiO2, Lactate, Magnesium)
PHYSIONET_COLUMNS: dict[str, ColumnMap] = {
    "HR": _w("heart_rate", "/min"),
    "O2Sat": _w("spo2", "%"),
    "Temp": _w("body_temp", "Cel"),
    "SBP": _w("sbp", "mm[Hg]"),
    "MAP": _w("map", "mm[Hg]"),
    "DBP": _w("dbp", "mm[Hg]"),
    "Resp": _w("resp_rate", "/min"),
    "EtCO2": _w("etco2", "mm[Hg]"),
    "BaseExcess": _w("base_excess", "mmol/L"),
    "HCO3": _w("hco3", "mmol/L"),
    "FiO2": [_w("fio2", "1"), _w("o2_support", "{FiO2}")],
    "pH": _w("ph", "[pH]"),
    "PaCO2": _w("paco2", "mm[Hg]"),
    "SaO2": _w("sao2", "%"),
    "AST": _w("ast", "U/L"),
    "BUN": _w("bun", "mg/dL"),
    "Alkalinephos": _w("alkaline_phosphatase", "U/L"),
    "Calcium": _w("calcium", "mg/dL"),
    "Chloride": _w("chloride", "mmol/L"),
    "Creatinine": _w("creatinine", "mg/dL"),
    "Bilirubin_direct": _w("bilirubin_direct", "mg/dL"),
    "Glucose": _w("glucose", "mg/dL"),
    "Lactate": _w("lactate", "mmol/L"),
    "Magnesium": _w("magnesium", "mg/dL"),
    "Phosphate": _w("phosphate", "mg/dL"),
    "Potassium": _w("potassium", "mmol/L"),
    "Bilirubin_total": _w("bilirubin_total", "mg/dL"),
    "TroponinI": _w("troponin_i", "ng/mL"),
    "Hct": _w("hematocrit", "%"),
    "Hgb": _w("hemoglobin", "g/dL"),
    "PTT": _w("ptt", "s"),
    "WBC": _w("wbc", "10*3/uL"),
    "Fibrinogen": _w("fibrinogen", "mg/dL"),
    "Platelets": _w("platelets", "10*3/uL"),
}

#: PhysioNet demographics -> patient-table columns (Gender 0 = female, 1 = male)
PHYSIONET_PATIENT_COLUMNS = {
    "Age": "age",
    "Gender": "sex",
    "Unit1": "unit_micu",
    "Unit2": "unit_sicu",
    "HospAdmTime": "hosp_adm_hours",
}

#: the documented epoch of PSV files without a time anchor: row time = epoch + ICULOS hours,
#: so every patient's ICU admission is the same instant (relative time; no calendar meaning)
RELATIVE_EPOCH = "2000-01-01T00:00:00Z"


class PsvLabel(BaseModel):
    """A per-row label column turned into one outcome event per patient.

    PhysioNet 2019 defines ``SepsisLabel`` as 1 from 6 h *before* sepsis onset
    ("For sepsis patients, SepsisLabel is 1 if t >= t_sepsis - 6 and 0 if t < t_sepsis - 6"),
    so onset = the first positive row + 6 h.
    """

    model_config = ConfigDict(extra="forbid")
    column: str = "SepsisLabel"
    event: str = "sepsis"
    offset_hours: float = 6.0


class PsvConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: care setting of PSV patients not in a patients table
    setting: str = "icu"
    #: time anchor of files without a row in anchors.csv: ISO time (UTC) or ``relative``
    #: (``RELATIVE_EPOCH`` + ICULOS hours)
    anchor: str = "relative"
    #: column giving each row's hours since ICU admission
    hours_column: str = "ICULOS"
    #: demographic columns -> patient-table columns
    patient_columns: dict[str, str] = Field(default_factory=lambda: dict(PHYSIONET_PATIENT_COLUMNS))
    #: label column -> outcome events (None: the column is counted as unmapped)
    label: PsvLabel | None = Field(default_factory=PsvLabel)


class TimeWindowConfig(BaseModel):
    """Plausible observation times (the canonical path refuses the rest, with a reason)."""

    model_config = ConfigDict(extra="forbid")
    #: nothing earlier is a real electronic observation (an epoch-0 or century-old time is a
    #: default value or a typo)
    earliest: str = "1990-01-01T00:00:00Z"
    #: times after the reference + this are refused
    max_future_minutes: float = Field(default=5.0, ge=0)
    #: times more than this before the reference are refused (None: no limit)
    max_history_days: float | None = Field(default=None, gt=0)
    #: reference time (ISO, UTC); None = when ingest runs
    reference: str | None = None

    @field_validator("earliest", "reference")
    @classmethod
    def _iso(cls, v: str | None) -> str | None:
        if v is not None and pd.isna(pd.to_datetime(v, utc=True, errors="coerce")):
            raise ValueError(f"{v!r} is not an ISO time")
        return v

    def window(self) -> TimeWindow:
        return TimeWindow(
            earliest_ns=int(pd.to_datetime(self.earliest, utc=True).value),
            max_future_ns=int(self.max_future_minutes * MINUTE_NS),
            max_history_ns=None
            if self.max_history_days is None
            else int(self.max_history_days * DAY_NS),
        )

    def reference_ns(self) -> int:
        if self.reference is None:
            return int(pd.Timestamp(datetime.now(UTC)).value)
        return int(pd.to_datetime(self.reference, utc=True).value)


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
    wide_columns: dict[str, ColumnMap] = Field(default_factory=dict)
    #: PhysioNet-style PSV column -> vocabulary code(s) and unit
    psv_columns: dict[str, ColumnMap] = Field(default_factory=lambda: dict(PHYSIONET_COLUMNS))
    psv: PsvConfig = Field(default_factory=PsvConfig)
    #: one-row-per-patient cohort: columns kept as text categories (the rest must be numeric
    #: or are refused by name)
    cohort_categorical: list[str] = Field(default_factory=lambda: ["sex", "setting"])
    #: source label for rows that carry none, per reader format
    default_source: dict[str, str] = Field(
        default_factory=lambda: {
            "long_csv": "unknown",
            "long_parquet": "unknown",
            "wide_csv": "wearable",
            "fhir": "ward",
            "psv": "ward",
            "hl7v2": "ward",
        }
    )
    #: regex of raw identifiers scrubbed (pseudonymised) from quarantined record text
    identifier_pattern: str = r"MRN-\d+"
    #: validate each FHIR resource with fhir.resources (R4B models) as well as our mapping
    fhir_validate: bool = True
    #: FHIR ``preliminary``/``unknown`` status and HL7 OBX-11 ``P``: accept as data or refuse
    preliminary: Literal["accept", "reject"] = "accept"
    time_window: TimeWindowConfig = Field(default_factory=TimeWindowConfig)
    #: a dangling link, unreadable file or special file met while walking a directory:
    #: ``error`` stops (exit 2) naming it, ``skip`` lists it in the report
    unreadable: Literal["error", "skip"] = "skip"
