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
    """Parse and validate a Bundle; one subject only. Raises ``InputError`` with locations."""
    patient, warnings, _ = parse_bundle(payload, vocab)
    return patient, warnings


def _reference(entry: Any) -> str | None:
    """``Observation/<id>`` of a Bundle entry (its ``fullUrl`` when the resource has no id)."""
    if not isinstance(entry, dict):
        return None
    res = entry.get("resource") or {}
    rid = res.get("id") if isinstance(res, dict) else None
    if isinstance(rid, str) and rid:
        return f"{res.get('resourceType', 'Observation')}/{rid}"
    url = entry.get("fullUrl")
    return str(url) if isinstance(url, str) and url else None


def parse_bundle(
    payload: dict[str, Any], vocab: Vocabulary
) -> tuple[PatientIn, list[str], list[str]]:
    """Patient, warnings and the references of the Observations read (the ``basis``).

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
    basis: list[str] = []
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
            ref = _reference(entries[line]) if 0 <= line < len(entries) else None
            if ref and ref not in basis:
                basis.append(ref)
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
    return out, warnings, basis


def _date(text: str) -> date | None:
    try:
        return date.fromisoformat(text[:10]) if len(text) >= 10 else None
    except ValueError:
        return None


def risk_assessment(
    score: PatientScore,
    model_name: str,
    model_version: str,
    request_id: str,
    basis: list[str] | None = None,
) -> dict[str, Any]:
    """A validated FHIR R4 RiskAssessment for one scored patient.

    ``subject`` is the caller's own Patient reference (never the pseudonym), ``prediction``
    has the horizon as ``whenPeriod`` and the reasons as ``rationale``, ``basis`` lists the
    Observations read. ``insufficient_data``: no probability and no qualitative risk, said in
    the rationale; a NEWS2 escalation is always a note.
    """
    from datetime import datetime, timedelta

    from fhir.resources.R4B.riskassessment import RiskAssessment

    reasons = [c.text for c in score.top_features]
    prediction: dict[str, Any] = {"outcome": {"text": OUTCOME_TEXT}}
    if score.status == "ok" and score.probability is not None and score.risk_band:
        prediction["probabilityDecimal"] = round(score.probability, 6)
        prediction["qualitativeRisk"] = {
            "coding": [{"system": RISK_PROBABILITY, "code": _BAND_CODE[score.risk_band]}],
            "text": score.risk_band,
        }
        prediction["rationale"] = "; ".join(reasons) or "no single factor stood out"
    else:
        prediction["rationale"] = f"insufficient data: {score.status_detail}"
    if score.horizon_hours:
        start = datetime.fromisoformat(score.as_of.replace("Z", "+00:00"))
        end = start + timedelta(hours=score.horizon_hours)
        prediction["whenPeriod"] = {
            "start": score.as_of,
            "end": end.isoformat().replace("+00:00", "Z"),
        }
    notes = []
    if score.escalation_text:
        notes.append({"text": f"escalation: {score.escalation_text}"})
    if score.news2_total is not None:
        notes.append({"text": f"NEWS2 total score {score.news2_total:g}"})
    notes.append({"text": f"alert: {'yes' if score.alert else 'no'}"})
    notes.extend({"text": f"warning: {w}"} for w in score.warnings)
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": "urn:vitalrisk:request", "value": request_id}],
        "status": "final",
        "subject": {"reference": f"Patient/{score.patient_id}"},
        "occurrenceDateTime": score.as_of,
        "method": {"text": f"{model_name} version {model_version} (LightGBM, calibrated)"},
        "prediction": [prediction],
        "note": notes,
    }
    if basis:
        resource["basis"] = [{"reference": r} for r in basis[:1000]]
    return RiskAssessment.model_validate(resource).model_dump(mode="json", exclude_none=True)
