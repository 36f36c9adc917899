"""FHIR R4 in and out: a Bundle of Observations -> the API's patient shape -> a RiskAssessment.

``fhir.resources`` (R4B models, identical to R4 for these resources) validates the input and
the output, so what we emit is a valid resource by construction.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, Literal

from pydantic import ValidationError

from core.vocabulary import Vocabulary
from serving.schemas import MAX_PATIENT_ID, Covariates, ObservationIn, PatientIn, PatientScore
from serving.scoring import InputError

RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
OUTCOME_TEXT = "Clinical deterioration (ICU transfer, rapid response, emergency admission or death)"
_BAND_CODE = {"low": "low", "medium": "moderate", "high": "high"}
_SKIP_STATUS = {"entered-in-error", "cancelled"}


def _errors(exc: ValidationError, prefix: str) -> list[tuple[str, str]]:
    return [
        (prefix + ".".join(str(x) for x in e["loc"]), e["msg"])
        for e in exc.errors(include_input=False)[:20]
    ]


def _value(obs: Any) -> tuple[float | str | None, str | None]:
    if obs.valueQuantity is not None and obs.valueQuantity.value is not None:
        q = obs.valueQuantity
        return float(q.value), (q.code or q.unit)
    if obs.valueCodeableConcept is not None:
        cc = obs.valueCodeableConcept
        for c in cc.coding or []:
            if c.code:
                return str(c.code), None
        return (str(cc.text) if cc.text else None), None
    if obs.valueString is not None:
        return str(obs.valueString), None
    if obs.valueBoolean is not None:
        return ("yes" if obs.valueBoolean else "no"), None
    if obs.valueInteger is not None:
        return float(obs.valueInteger), None
    return None, None


def _time(obs: Any) -> datetime | None:
    t = obs.effectiveDateTime or obs.effectiveInstant
    if t is None and obs.effectivePeriod is not None:
        t = obs.effectivePeriod.start
    if isinstance(t, datetime):
        return t
    return None


def _codes(cc: Any) -> list[str]:
    return [str(c.code) for c in (cc.coding or []) if c.code] if cc is not None else []


def _subject_id(subject: Any) -> str | None:
    """The patient id of ``Patient/<id>``, stripped; None when absent, blank or too long."""
    ref = str(getattr(subject, "reference", None) or "") if subject is not None else ""
    if not ref.startswith("Patient/"):
        return None
    pid = ref.split("/", 1)[1].strip()
    return pid if 0 < len(pid) <= MAX_PATIENT_ID else None


def bundle_to_patient(payload: dict[str, Any], vocab: Vocabulary) -> tuple[PatientIn, list[str]]:
    """Parse and validate a Bundle; one subject only. Raises ``InputError`` with locations."""
    from fhir.resources.R4B.bundle import Bundle

    if payload.get("resourceType") != "Bundle":
        raise InputError([("resourceType", "expected a FHIR R4 Bundle")])
    try:
        bundle = Bundle.model_validate(payload)
    except ValidationError as exc:
        raise InputError(_errors(exc, "Bundle.")) from None
    except (KeyError, TypeError, ValueError, AttributeError):
        # fhir.resources raises these for an entry of an unknown resource type
        raise InputError(
            [("Bundle.entry", "not valid FHIR R4 resources (unknown resourceType?)")]
        ) from None
    subjects: set[str] = set()
    observations: list[ObservationIn] = []
    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    gender: str | None = None
    birth: date | None = None
    for i, entry in enumerate(bundle.entry or []):
        res: Any = entry.resource
        loc = f"entry[{i}]"
        kind = getattr(res, "__resource_type__", type(res).__name__)
        if kind == "Patient":
            if res.id and str(res.id).strip():
                subjects.add(str(res.id).strip())
            gender = res.gender
            birth = res.birthDate if isinstance(res.birthDate, date) else None
            continue
        if kind != "Observation":
            warnings.append(f"{loc}: {kind} ignored (only Observation and Patient are read)")
            continue
        if res.status in _SKIP_STATUS:
            warnings.append(f"{loc}: status {res.status} ignored")
            continue
        subject = _subject_id(res.subject)
        if subject is None:
            problems.append(
                (
                    f"{loc}.subject",
                    f"expected a reference 'Patient/<id>' (id of 1-{MAX_PATIENT_ID} characters)",
                )
            )
            continue
        subjects.add(subject)
        t = _time(res)
        if t is None or t.tzinfo is None:
            problems.append((f"{loc}.effectiveDateTime", "expected a date-time with timezone"))
            continue
        parts: list[tuple[str, Any]] = []
        codes = _codes(res.code)
        panel = next((c for c in codes if c in vocab.panels), None)
        if panel is not None or (res.component and not any(vocab.resolve_code(c) for c in codes)):
            for k, comp in enumerate(res.component or []):
                parts.append((f"{loc}.component[{k}]", comp))
        else:
            parts.append((loc, res))
        for where, item in parts:
            key = next(
                (vocab.resolve_code(c) for c in _codes(item.code) if vocab.resolve_code(c)), None
            )
            if key is None:
                problems.append((f"{where}.code", f"no known LOINC code among {_codes(item.code)}"))
                continue
            value, unit = _value(item)
            if value is None:
                problems.append((f"{where}.value[x]", "no value"))
                continue
            try:
                observations.append(
                    ObservationIn(time=t, code=key, value=value, unit=unit, source="fhir")
                )
            except ValidationError as exc:
                problems.extend(_errors(exc, f"{where}."))
    if len(subjects) > 1:
        problems.append(
            (
                "Bundle",
                f"observations of {len(subjects)} different patients; send one Bundle per patient",
            )
        )
    if not observations and not problems:
        problems.append(("Bundle.entry", "no Observation to score"))
    if problems:
        raise InputError(problems)
    sex: Literal["F", "M"] | None = None
    if gender == "female":
        sex = "F"
    elif gender == "male":
        sex = "M"
    age = None
    if birth is not None:
        latest = max(o.time for o in observations).astimezone(UTC).date()
        age = max(0.0, min(130.0, (latest - birth).days / 365.25))
    patient = PatientIn(
        patient_id=next(iter(subjects)),
        covariates=Covariates(age=age, sex=sex),
        observations=observations,
        as_of=None,
    )
    return patient, warnings


def risk_assessment(
    score: PatientScore, model_name: str, model_version: str, request_id: str
) -> dict[str, Any]:
    """A validated FHIR R4 RiskAssessment for one scored patient."""
    from fhir.resources.R4B.riskassessment import RiskAssessment

    notes = [{"text": c.text} for c in score.top_features]
    if score.news2_total is not None:
        notes.append({"text": f"NEWS2 total score {score.news2_total:g}"})
    notes.extend({"text": f"warning: {w}"} for w in score.warnings)
    resource = {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": "urn:vitalrisk:request", "value": request_id}],
        "status": "final",
        "subject": {"reference": f"Patient/{score.patient_id}"},
        "occurrenceDateTime": score.as_of,
        "method": {"text": f"{model_name} version {model_version} (LightGBM, calibrated)"},
        "prediction": [
            {
                "outcome": {"text": OUTCOME_TEXT},
                "probabilityDecimal": round(score.probability, 6),
                "qualitativeRisk": {
                    "coding": [{"system": RISK_PROBABILITY, "code": _BAND_CODE[score.risk_band]}]
                },
            }
        ],
        "note": notes or None,
    }
    if not notes:
        resource.pop("note")
    return RiskAssessment.model_validate(resource).model_dump(mode="json", exclude_none=True)
