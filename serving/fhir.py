"""FHIR R4 in and out: a Bundle of Observations -> the API's patient shape -> a RiskAssessment.

``fhir.resources`` (R4B models, identical to R4 for these resources) validates the input and
the output, so what we emit is a valid resource by construction.
"""

from __future__ import annotations

from datetime import UTC, date
from typing import Any, Literal

from pydantic import ValidationError

from core.vocabulary import Vocabulary
from serving.schemas import (
    MAX_PATIENT_ID,
    Covariates,
    ObservationIn,
    PatientIn,
    PatientScore,
    valid_patient_id,
)
from serving.scoring import InputError

RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
OUTCOME_TEXT = "Clinical deterioration (ICU transfer, rapid response, emergency admission or death)"
_BAND_CODE = {"low": "low", "medium": "moderate", "high": "high"}


def _errors(exc: ValidationError, prefix: str) -> list[tuple[str, str]]:
    return [
        (prefix + ".".join(str(x) for x in e["loc"]), e["msg"])
        for e in exc.errors(include_input=False)[:20]
    ]


_ID_RULE = f"expected a reference 'Patient/<id>' (id of 1-{MAX_PATIENT_ID} characters)"


def bundle_to_patient(payload: dict[str, Any], vocab: Vocabulary) -> tuple[PatientIn, list[str]]:
    """Parse and validate a Bundle; one subject only. Raises ``InputError`` with locations.

    Observations go through the one FHIR Observation parser (``ingest.fhir``): statuses,
    versions, panels/components, ``dataAbsentReason``, times and value types are read as
    ingest reads them. Records that are not data by FHIR's rules (status, superseded, absent)
    become warnings; a record that cannot be read is a 422 naming its entry.
    """
    from fhir.resources.R4B.bundle import Bundle

    from ingest.canonical import NOT_DATA, Reason
    from ingest.fhir import parse_resources
    from serving.config import ingest_preliminary

    if payload.get("resourceType") != "Bundle":
        raise InputError([("resourceType", "expected a FHIR R4 Bundle")])
    try:
        Bundle.model_validate(payload)
    except ValidationError as exc:
        raise InputError(_errors(exc, "Bundle.")) from None
    except (KeyError, TypeError, ValueError, AttributeError):
        # fhir.resources raises these for an entry of an unknown resource type
        raise InputError(
            [("Bundle.entry", "not valid FHIR R4 resources (unknown resourceType?)")]
        ) from None
    entries = payload.get("entry") or []
    resources = [
        (i, e.get("resource") if isinstance(e, dict) else None) for i, e in enumerate(entries)
    ]
    recs = parse_resources(
        resources, vocab, default_source="fhir", preliminary=ingest_preliminary()
    )
    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    for pr in recs.problems:
        if pr.field == "resourceType" and "unsupported" in pr.reason:
            kind = (resources[pr.line][1] or {}).get("resourceType")
            warnings.append(
                f"entry[{pr.line}]: {kind} ignored (only Observation and Patient are read)"
            )
        else:
            problems.append((f"entry[{pr.line}].{pr.field}", pr.reason))
    subjects = {str(p["patient_id"]).strip() for p in recs.patients}
    if any(not valid_patient_id(p["patient_id"]) for p in recs.patients):
        problems.append(
            ("Patient.id", f"expected an id of 1-{MAX_PATIENT_ID} printable characters")
        )
    patient = recs.patients[-1] if recs.patients else {}
    observations: list[ObservationIn] = []
    for j, line in enumerate(recs.line):
        where = f"entry[{line}]" + (f".{recs.where[j]}" if recs.where[j] else "")
        pre = Reason(recs.pre[j])
        if pre in NOT_DATA:
            warnings.append(f"{where}: {recs.detail.get(j, pre.name.lower())}: ignored")
            continue
        if pre == Reason.MISSING_PATIENT:
            problems.append((f"entry[{line}].subject", "expected a reference 'Patient/<id>'"))
            continue
        if not valid_patient_id(recs.subject[j]):
            problems.append((f"entry[{line}].subject", _ID_RULE))
            continue
        subjects.add(recs.subject[j].strip())
        if pre != Reason.ACCEPTED:
            problems.append((f"{where}.value[x]", recs.detail.get(j, pre.name.lower())))
            continue
        if not recs.code[j] or vocab.resolve_code(recs.code[j]) is None:
            problems.append((f"{where}.code", f"no known LOINC code among {[recs.code[j]]}"))
            continue
        if recs.value[j] in ("", None):
            problems.append((f"{where}.value[x]", "no value"))
            continue
        if not recs.time[j]:
            problems.append((f"{where}.effectiveDateTime", "expected a date-time with timezone"))
            continue
        try:
            observations.append(
                ObservationIn.model_validate(
                    {
                        "time": recs.time[j],
                        "code": recs.code[j],
                        "value": recs.value[j],
                        "unit": recs.unit[j] or None,
                        "source": "fhir",
                    }
                )
            )
        except ValidationError as exc:
            problems.extend(
                (
                    f"{where}.effectiveDateTime"
                    if e["loc"][:1] == ("time",)
                    else f"{where}.{'.'.join(map(str, e['loc']))}",
                    "expected a date-time with timezone" if e["loc"][:1] == ("time",) else e["msg"],
                )
                for e in exc.errors(include_input=False)[:5]
            )
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
    sex: Literal["F", "M"] | None = {"F": "F", "M": "M"}.get(str(patient.get("sex", "")))  # type: ignore[assignment]
    age = None
    birth = _date(str(patient.get("birth_date", "")))
    if birth is not None:
        latest = max(o.time for o in observations).astimezone(UTC).date()
        age = max(0.0, min(130.0, (latest - birth).days / 365.25))
    out = PatientIn(
        patient_id=next(iter(subjects)),
        covariates=Covariates(age=age, sex=sex),
        observations=observations,
        as_of=None,
    )
    return out, warnings


def _date(text: str) -> date | None:
    try:
        return date.fromisoformat(text[:10]) if len(text) >= 10 else None
    except ValueError:
        return None


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
