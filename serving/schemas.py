"""Request and response models of the HTTP API (pydantic v2; they make the OpenAPI document).

Strict where a wrong value would silently change a risk score: no extra fields, finite
numbers only (``NaN``/``Infinity`` are rejected), timezone-aware timestamps.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=256)
_FLAG = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


class ObservationIn(BaseModel):
    """One measurement: ``code`` is a vocabulary key (``heart_rate``) or a LOINC code (``8867-4``)."""

    model_config = _STRICT
    time: AwareDatetime = Field(description="ISO-8601 with timezone, e.g. 2026-01-01T08:00:00Z")
    code: str = Field(min_length=1, max_length=64, examples=["heart_rate", "9279-1"])
    value: float | Annotated[str, StringConstraints(min_length=1, max_length=32)] = Field(
        description="number in `unit`, or a category (ACVPU letter, yes/no for oxygen)"
    )
    unit: str | None = Field(None, max_length=32, description="UCUM unit; default canonical")
    source: str | None = Field(None, max_length=32, description="ward, home, wearable, ...")


class ObservationItem(ObservationIn):
    """An observation sent for collection (``POST /v1/observations``)."""

    patient_id: str = Field(min_length=1, max_length=128)


class Covariates(BaseModel):
    """Static covariates; comorbidities and other flags as ``cm_<name>`` (or e.g. ``spo2_scale2``) = 0/1."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    age: float | None = Field(default=None, ge=0, le=130)
    sex: Literal["F", "M"] | None = None
    setting: Literal["ward", "home"] | None = None

    def comorbidities(self) -> dict[str, int]:
        extra = self.model_extra or {}
        out: dict[str, int] = {}
        for k, v in extra.items():
            if not _FLAG.match(k):
                raise ValueError(
                    f"covariates.{k[:40]}: expected age, sex, setting or a flag like cm_<name>"
                )
            if v not in (0, 1, True, False):
                raise ValueError(f"covariates.{k}: expected 0 or 1")
            out[k] = int(v)
        return out


class PatientIn(BaseModel):
    model_config = _STRICT
    patient_id: str = Field(min_length=1, max_length=128)
    covariates: Covariates = Field(default_factory=lambda: Covariates())
    observations: list[ObservationIn] = Field(max_length=100_000)
    as_of: AwareDatetime | None = Field(
        None, description="prediction time; default the latest observation time"
    )


class ScoreRequest(BaseModel):
    model_config = _STRICT
    patients: list[PatientIn] = Field(min_length=1, max_length=10_000)


class ModelRef(BaseModel):
    name: str
    version: str


class Contribution(BaseModel):
    feature: str
    value: float | None
    contribution: float = Field(description="SHAP value on the log-odds scale")
    text: str = Field(description="clinician-readable reason")


class PatientScore(BaseModel):
    patient_id: str = Field(description="pseudonym")
    as_of: str
    probability: float
    risk_band: Literal["low", "medium", "high"]
    news2_total: float | None
    top_features: list[Contribution]
    warnings: list[str]


class ScoreResponse(BaseModel):
    request_id: str
    model: ModelRef
    results: list[PatientScore]


class FeatureRow(BaseModel):
    """One precomputed feature row (names as in the model's feature list; null = missing)."""

    model_config = _STRICT
    patient_id: str | None = Field(None, min_length=1, max_length=128)
    features: dict[str, float | str | None]
    request_id: str | None = Field(
        None, max_length=64, description="set by the server (the HTTP request id)"
    )


class FeatureScore(BaseModel):
    patient_id: str | None
    probability: float
    risk_band: str
    model_version: str
    request_id: str


class ObservationsRequest(BaseModel):
    """Device/app data collection: each item is checked on its own; bad ones are returned."""

    model_config = _STRICT
    observations: list[Any] = Field(
        min_length=1,
        max_length=100_000,
        description="items with patient_id, time, code, value, unit?, source?",
    )


class Rejected(BaseModel):
    index: int
    field: str
    reason: str


class ObservationsResponse(BaseModel):
    request_id: str
    received: int
    accepted: int
    rejected: list[Rejected]
    landing_file: str | None


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    run_id: str | None
    features: list[str]
    training_data_hash: str | None
    metrics: dict[str, float]
    shadow: ModelRef | None


class ErrorResponse(BaseModel):
    error: str
    detail: list[dict[str, Any]] | None = None
    request_id: str | None = None


class FhirBundle(BaseModel):
    """A FHIR R4 Bundle (type collection/batch/...) whose entries are Observations of one
    patient and optionally that Patient; fully validated with ``fhir.resources``."""

    model_config = ConfigDict(extra="allow")
    resourceType: Literal["Bundle"]
    type: str = Field(min_length=1, max_length=32)
    entry: list[dict[str, Any]] = Field(min_length=1, max_length=100_000)
