"""Request and response models of the HTTP API (pydantic v2; they make the OpenAPI document).

Strict where a wrong value would silently change a risk score or whose patient data lands
where: no extra fields, finite numbers only (``NaN``/``Infinity`` are rejected), numbers as
JSON numbers (not ``true`` or ``"70"``), timestamps as ISO-8601 text with a timezone (not a
number of seconds), patient ids stripped and non-blank (two blank-looking ids must not
collapse into one pseudonym). The error statuses every route can answer live here too
(:data:`ERROR_STATUSES`), for the routes' ``responses`` and the served OpenAPI document.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StringConstraints,
)

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=256)
_FLAG = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_PATIENT_ID = 128


def _no_control(v: str) -> str:
    if _CONTROL.search(v):
        raise ValueError("must not contain control characters or line breaks")
    return v


def _iso_text(v: Any) -> Any:
    """JSON gives text; a datetime comes from our own code (FHIR parsing). Not a number."""
    if not isinstance(v, str | datetime):
        raise ValueError("expected an ISO-8601 date-time string with a timezone")
    return v


#: a source patient identifier: surrounding whitespace removed, then 1-128 characters without
#: control characters (``"  MRN-1 "`` is ``"MRN-1"``; ``" "`` is refused, not pseudonymised)
PatientId = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PATIENT_ID),
    AfterValidator(_no_control),
]
#: a JSON number (``true`` and ``"70"`` are refused, integers are fine)
Number = Annotated[float, Strict()]
#: ISO-8601 text with a timezone (a JSON number of seconds is refused)
IsoTime = Annotated[AwareDatetime, BeforeValidator(_iso_text)]


class ObservationIn(BaseModel):
    """One measurement: ``code`` is a vocabulary key (``heart_rate``) or a LOINC code (``8867-4``)."""

    model_config = _STRICT
    time: IsoTime = Field(description="ISO-8601 with timezone, e.g. 2026-01-01T08:00:00Z")
    code: str = Field(min_length=1, max_length=64, examples=["heart_rate", "9279-1"])
    value: Number | Annotated[str, Strict(), StringConstraints(min_length=1, max_length=32)] = (
        Field(description="number in `unit`, or a category (ACVPU letter, yes/no for oxygen)")
    )
    unit: str | None = Field(None, max_length=32, description="UCUM unit; default canonical")
    source: str | None = Field(None, max_length=32, description="ward, home, wearable, ...")


class ObservationItem(ObservationIn):
    """An observation sent for collection (``POST /v1/observations``)."""

    patient_id: PatientId


class Covariates(BaseModel):
    """Static covariates; comorbidities and other flags as ``cm_<name>`` (or e.g. ``spo2_scale2``) = 0/1."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    age: Number | None = Field(default=None, ge=0, le=130)
    sex: Literal["F", "M"] | None = None
    setting: Literal["ward", "home"] | None = None

    def comorbidities(self) -> dict[str, int]:
        extra = self.model_extra or {}
        out: dict[str, int] = {}
        for k, v in extra.items():
            if not _FLAG.match(k):
                raise ValueError(
                    f"covariates.{k[:40]!r}: expected age, sex, setting or a flag like cm_<name>"
                )
            if v not in (0, 1, True, False):
                raise ValueError(f"covariates.{k}: expected 0 or 1")
            out[k] = int(v)
        return out


def unknown_flags(covariates: Any, known: Collection[str]) -> list[str]:
    """Covariate flags of one raw request patient that the served model does not read.

    ``covariates`` is the JSON object as sent; ``age``, ``sex`` and ``setting`` are always
    known. A misspelt flag (``cm_copdd``) would otherwise be dropped without a word.
    """
    if not isinstance(covariates, Mapping):
        return []
    fixed = {"age", "sex", "setting"}
    return [str(k) for k in covariates if k not in fixed and k not in known]


class PatientIn(BaseModel):
    model_config = _STRICT
    patient_id: PatientId
    covariates: Covariates = Field(default_factory=lambda: Covariates())
    observations: list[ObservationIn] = Field(max_length=100_000)
    as_of: IsoTime | None = Field(
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


Band = Literal["low", "medium", "high"]
EscalationCode = Literal["news2_emergency", "news2_urgent", "news2_single_parameter"]


class PatientScore(BaseModel):
    """One patient's answer after every safety rule (``serving/safety.py``)."""

    patient_id: str = Field(
        description="the caller's identifier, as sent (only its pseudonym is stored)"
    )
    status: Literal["ok", "insufficient_data"] = Field(
        description="insufficient_data: not enough recent vitals (serve.data_sufficiency): "
        "no probability and no band, never 'low'"
    )
    status_detail: str
    as_of: str = Field(description="prediction time (ISO-8601 UTC)")
    setting: str | None = Field(description="care setting the answer is for (ward, home)")
    horizon_hours: float | None = Field(
        description="the model predicts deterioration within this many hours after as_of"
    )
    probability: float | None = Field(description="calibrated; null when insufficient_data")
    risk_band: Band | None = Field(
        description="from the model's own thresholds, raised by the NEWS2 escalation floor"
    )
    model_risk_band: Band | None = Field(description="the model's band before the NEWS2 floor")
    alert: bool = Field(
        description="probability at or above the model's alert threshold (its 'high'), or a "
        "NEWS2 escalation"
    )
    escalation: EscalationCode | None = Field(
        description="NEWS2 trigger (RCP): >=7 emergency, 5-6 urgent, a single parameter "
        "scoring 3 urgent ward-based"
    )
    escalation_text: str | None
    news2_total: float | None
    news2_max_single: float | None = Field(description="highest NEWS2 parameter score")
    latest_observations: dict[str, str] = Field(
        description="newest observation time per vocabulary key (ISO-8601 UTC)"
    )
    top_features: list[Contribution]
    warnings: list[str]


class RiskThresholds(BaseModel):
    """The served model's thresholds (fitted with it): p < low low, p < high medium, else high."""

    low: float
    high: float = Field(description="the alert threshold (alert budget per 100 patient-days)")
    alert_budget_per_100: float
    unit: str


class ScoreResponse(BaseModel):
    request_id: str
    model: ModelRef
    thresholds: RiskThresholds
    results: list[PatientScore]


class FeatureRow(BaseModel):
    """One precomputed feature row (names as in the model's feature list; null = missing)."""

    model_config = _STRICT
    patient_id: PatientId | None = None
    features: dict[str, Number | Annotated[str, Strict()] | None]
    request_id: str | None = Field(
        None, max_length=64, description="set by the server (the HTTP request id)"
    )
    #: the row as the served model's input, when the guard built it while checking the
    #: request: ``(model, matrix, row)`` (``serving.runtime.Runtime.check_feature_rows``)
    _model_input: tuple[Any, Any, int] | None = PrivateAttr(default=None)


class FeaturesRequest(BaseModel):
    """The body of ``POST /v1/score/features`` (BentoML builds its own model of it; the guard
    validates with this one first, so that BentoML never logs a rejected body's inputs)."""

    model_config = _STRICT
    rows: list[FeatureRow] = Field(min_length=1)


_ROW_KEYS = frozenset({"patient_id", "features", "request_id"})
_CELL_TYPES = frozenset({int, float, str, type(None)})


@dataclass(frozen=True)
class ValidRows:
    """The validated rows of one ``/v1/score/features`` body."""

    rows: list[FeatureRow]
    #: positions of the rows with a text value (categorical features, ``setting``)
    text: list[int]


def feature_rows_fast(body: Mapping[str, Any], request_id: str | None = None) -> ValidRows | None:
    """The rows of a ``/v1/score/features`` body exactly as :class:`FeaturesRequest` would
    validate them (ids stripped, integers as floats), built without validating again, when
    every row certainly passes (cheap: type sets in C); None means "validate properly", not
    necessarily invalid. ``request_id`` replaces each row's (the server sets it)."""
    rows = body.get("rows")
    if type(rows) is not list or not rows or body.keys() != {"rows"}:
        return None
    out: list[FeatureRow] = []
    text: list[int] = []
    construct = FeatureRow.model_construct
    for i, row in enumerate(rows):
        if type(row) is not dict or not row.keys() <= _ROW_KEYS:
            return None
        feats = row.get("features")
        if type(feats) is not dict:
            return None
        types = set(map(type, feats.values()))
        if not types <= _CELL_TYPES:
            return None
        if str in types:
            if any(type(v) is str and len(v) > 256 for v in feats.values()):
                return None
            text.append(i)
        if int in types:  # a strict float field takes an integer as that float
            feats = {k: float(v) if type(v) is int else v for k, v in feats.items()}
        pid = row.get("patient_id")
        if pid is not None:
            if not valid_patient_id(pid):
                return None
            pid = pid.strip()
        rid = row.get("request_id")
        if rid is not None and not (type(rid) is str and len(rid) <= 64):
            return None
        out.append(construct(patient_id=pid, features=feats, request_id=request_id or rid))
    return ValidRows(out, text)


def feature_rows(body: Mapping[str, Any], request_id: str | None = None) -> ValidRows:
    """The validated rows of a ``/v1/score/features`` body (pydantic's ``ValidationError``
    when it breaks :class:`FeaturesRequest`); ``request_id`` replaces each row's."""
    fast = feature_rows_fast(body, request_id)
    if fast is not None:
        return fast
    rows = FeaturesRequest.model_validate(body).rows
    if request_id is not None:
        rows = [r.model_copy(update={"request_id": request_id}) for r in rows]
    text = [i for i, r in enumerate(rows) if any(type(v) is str for v in r.features.values())]
    return ValidRows(rows, text)


def valid_patient_id(pid: Any) -> bool:
    """The ``PatientId`` rule as a check (FHIR subjects, feature rows): text, non-blank after
    stripping, at most ``MAX_PATIENT_ID`` characters, no control characters."""
    if type(pid) is not str:
        return False
    stripped = pid.strip()
    return 0 < len(stripped) <= MAX_PATIENT_ID and not _CONTROL.search(stripped)


class FeatureScore(BaseModel):
    patient_id: str | None = Field(description="the caller's identifier, as sent")
    probability: float
    risk_band: str = Field(description="model thresholds, raised by the NEWS2 floor")
    alert: bool
    escalation: str | None = Field(description="from the row's news2_total, when sent")
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
    #: the served model's own risk thresholds (fitted and logged with it)
    thresholds: RiskThresholds | None = None


class ErrorResponse(BaseModel):
    error: str
    detail: list[dict[str, Any]] | None = None
    request_id: str | None = None


class CdsHookRequest(BaseModel):
    """A CDS Hooks 2.0 hook request (``patient-view``); ``prefetch`` holds ``patient`` (a
    Patient) and ``vitals`` (a search Bundle of vital-sign Observations)."""

    model_config = ConfigDict(extra="allow")
    hook: str = Field(min_length=1, max_length=64, examples=["patient-view"])
    hookInstance: str = Field(min_length=1, max_length=128)
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None
    fhirServer: str | None = Field(None, max_length=512)
    fhirAuthorization: dict[str, Any] | None = None


class CdsSource(BaseModel):
    label: str
    url: str | None = None


class CdsCard(BaseModel):
    summary: str = Field(max_length=140)
    indicator: Literal["info", "warning", "critical"]
    detail: str = Field(description="markdown: reasons, NEWS2, thresholds, data freshness")
    source: CdsSource


class CdsResponse(BaseModel):
    cards: list[CdsCard]


class CdsService(BaseModel):
    hook: str
    id: str
    title: str
    description: str
    prefetch: dict[str, str]
    usageRequirements: str | None = None


class CdsDiscovery(BaseModel):
    services: list[CdsService]


class CohortResponse(BaseModel):
    """Counts per ISO week, setting and age band; cells under ``k`` are "<k" (suppressed)."""

    k: int
    age_bands: list[str]
    weeks: int
    rows: list[dict[str, Any]]


class FhirBundle(BaseModel):
    """A FHIR R4 Bundle (type collection/batch/...) whose entries are Observations of one
    patient and optionally that Patient; fully validated with ``fhir.resources``."""

    model_config = ConfigDict(extra="allow")
    resourceType: Literal["Bundle"]
    type: str = Field(min_length=1, max_length=32)
    entry: list[dict[str, Any]] = Field(min_length=1, max_length=100_000)


#: every status an authenticated ``/v1`` route can answer besides 200, and why (the routes'
#: OpenAPI ``responses`` and :func:`complete_openapi` both read this table)
ERROR_STATUSES: dict[int, str] = {
    400: "malformed JSON, duplicate keys, NaN/Infinity or an empty body",
    401: "missing or unknown API key",
    403: "the key lacks the scope for this route",
    408: "the body did not arrive within serve.body_timeout_seconds",
    413: "body, patients, observations or rows above the configured limits",
    422: "valid JSON that breaks the schema or the vocabulary: every problem with its place",
    429: "per-key rate limit, or too many failed authentications from this address (Retry-After)",
    503: "audit or prediction log unavailable, service starting or overloaded: nothing was processed (Retry-After)",
}
#: statuses one route answers besides :data:`ERROR_STATUSES` (kept in the OpenAPI document)
ROUTE_STATUSES: dict[str, dict[int, str]] = {
    "/v1/patients/{patient_id}/summary": {
        404: "this API key sent no data for this patient (ids are resolved per key)"
    },
}
#: routes outside /v1 that authenticate like it (CDS Hooks: the API key as bearer token)
AUTHENTICATED_PREFIXES = ("/v1/", "/cds-services/")
#: statuses of the public probes besides 200
PROBE_STATUSES: dict[str, dict[int, str]] = {
    "/readyz": {503: "not ready: model not loaded, or the audit log cannot be written"},
}


def error_responses(ref: str = "#/components/schemas/ErrorResponse") -> dict[str, Any]:
    """OpenAPI ``responses`` entries for :data:`ERROR_STATUSES` (JSON bodies)."""
    return {
        str(code): {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": ref}}},
        }
        for code, text in ERROR_STATUSES.items()
    }


def complete_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """The served OpenAPI document with every status each route can answer.

    BentoML documents its own routes with 400/404/500 (the API never answers 404 or 500 on a
    declared route) and its probes with 200 only; a request body is always required. Pure:
    returns a new document.
    """
    import copy

    out = copy.deepcopy(doc)
    schemas = out.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema())
    for path, item in (out.get("paths") or {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            if path.startswith(AUTHENTICATED_PREFIXES):
                for unused in ("404", "500"):
                    responses.pop(unused, None)
                responses.update(error_responses())
                for status, text in ROUTE_STATUSES.get(path, {}).items():
                    responses[str(status)] = {
                        "description": text,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                            }
                        },
                    }
                if method in ("post", "put", "patch") and "requestBody" in op:
                    op["requestBody"]["required"] = True
            for status, text in PROBE_STATUSES.get(path, {}).items():
                responses[str(status)] = {"description": text}
    return out
