"""The one FHIR R4 Observation parser: ndjson lines and Bundle entries in ingest, and
``/v1/fhir/score``, read Observations through :func:`parse_resources` with the same rules.

FHIR semantics as R4 defines them (https://hl7.org/fhir/R4/observation.html):
* ``status``: ``entered-in-error`` and ``cancelled`` are never data, nor is ``registered`` (no
  result yet); ``preliminary`` (and ``unknown``) follow the policy (``accept``/``reject``);
  ``final``, ``amended`` and ``corrected`` are data.
* Versions: resources with the same ``id`` are versions of one Observation; only the latest
  counts (highest numeric ``meta.versionId``, then latest ``meta.lastUpdated``, then the later
  one in the input). An ``amended``/``corrected`` value therefore replaces the earlier one, and
  a later ``entered-in-error`` withdraws it.
* Components: a panel code of the vocabulary (e.g. 85354-9), or components under a code the
  vocabulary does not know, become one record per component.
* ``dataAbsentReason``: counted, never data. A ``valueQuantity`` with a ``comparator``
  (``<0.01``) is not an exact value and is refused.
* Time: ``effectiveDateTime`` / ``effectiveInstant`` / ``effectivePeriod`` (its end, when the
  value is known; else its start), else ``issued`` (when the result was released: never
  earlier than the measurement, so a point-in-time feature cannot see it early).
* ``valueBoolean``: ``true``/``false`` (the vocabulary's categories map them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from core.vocabulary import Vocabulary
from ingest.canonical import Reason

NOT_DATA_STATUS = frozenset({"entered-in-error", "cancelled", "registered"})
POLICY_STATUS = frozenset({"preliminary", "unknown"})
DATA_STATUS = frozenset({"final", "amended", "corrected"})
SUPPORTED = ("Observation", "Patient")


@dataclass
class ResourceProblem:
    """A resource that yields no record at all (not a resource, unsupported type, invalid)."""

    line: int
    field: str
    reason: str
    code: str = ""


@dataclass
class FhirRecords:
    """One row per candidate observation, as text; ``pre``/``detail`` carry FHIR verdicts."""

    line: list[int] = field(default_factory=list)
    subject: list[str] = field(default_factory=list)
    time: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    value: list[Any] = field(default_factory=list)
    unit: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    pre: list[int] = field(default_factory=list)
    detail: dict[int, str] = field(default_factory=dict)
    where: list[str] = field(default_factory=list)  # entry[i] / entry[i].component[k]
    patients: list[dict[str, Any]] = field(default_factory=list)
    problems: list[ResourceProblem] = field(default_factory=list)

    def add(self, base: dict[str, Any], code: str, value: Any, unit: str, where: str) -> int:
        self.line.append(base["line"])
        self.subject.append(base["subject"])
        self.time.append(base["time"])
        self.code.append(code)
        self.value.append(value)
        self.unit.append(unit)
        self.source.append(base["source"])
        self.pre.append(int(base["pre"]))
        self.where.append(where)
        i = len(self.line) - 1
        if base.get("detail"):
            self.detail[i] = base["detail"]
        return i


def _codings(concept: Any) -> list[str]:
    if not isinstance(concept, dict):
        return []
    return [
        str(c["code"]).strip()
        for c in concept.get("coding") or []
        if isinstance(c, dict) and c.get("code")
    ]


def _pick_code(codes: list[str], vocab: Vocabulary) -> str:
    """The first coding the vocabulary knows (panel or observation), else the first."""
    for c in codes:
        if c in vocab.panels or vocab.resolve_code(c):
            return c
    return codes[0] if codes else ""


def _value(item: dict) -> tuple[Any, str, Reason, str]:
    """(value, unit, pre-reason, detail) of an Observation or component."""
    if "dataAbsentReason" in item and not any(k.startswith("value") for k in item):
        dar = item["dataAbsentReason"]
        why = (_codings(dar) or [str(dar.get("text", "")) if isinstance(dar, dict) else ""])[0]
        return "", "", Reason.DATA_ABSENT, f"data absent ({why or 'no reason given'})"
    q = item.get("valueQuantity")
    if isinstance(q, dict):
        unit = str(q.get("code") or q.get("unit") or "").strip()
        if q.get("comparator"):
            return (
                q.get("value", ""),
                unit,
                Reason.UNPARSEABLE_VALUE,
                f"value {q.get('comparator')}{q.get('value')} has a comparator: not an exact value",
            )
        v = q.get("value")
        return ("" if v is None else v), unit, Reason.ACCEPTED, ""
    cc = item.get("valueCodeableConcept")
    if isinstance(cc, dict):
        codes = _codings(cc)
        return (codes[0] if codes else str(cc.get("text") or "")), "", Reason.ACCEPTED, ""
    for k in ("valueInteger", "valueDecimal"):
        if k in item:
            return item[k], "", Reason.ACCEPTED, ""
    if "valueString" in item:
        return str(item["valueString"]), "", Reason.ACCEPTED, ""
    if "valueBoolean" in item:
        return ("true" if item["valueBoolean"] is True else "false"), "", Reason.ACCEPTED, ""
    other = next((k for k in item if k.startswith("value")), None)
    if other is not None:
        return "", "", Reason.UNPARSEABLE_VALUE, f"{other} is not a supported value type"
    return "", "", Reason.ACCEPTED, ""  # no value: MISSING_VALUE downstream


def _time(res: dict) -> str:
    for k in ("effectiveDateTime", "effectiveInstant"):
        if res.get(k):
            return str(res[k])
    period = res.get("effectivePeriod")
    if isinstance(period, dict) and (period.get("end") or period.get("start")):
        return str(period.get("end") or period.get("start"))
    return str(res.get("issued") or "")


def _version_key(res: dict, order: int) -> tuple[int, str, int]:
    raw = res.get("meta")
    meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
    vid = str(meta.get("versionId", ""))
    return (int(vid) if vid.isdigit() else -1, str(meta.get("lastUpdated", "")), order)


def latest_versions(resources: list[tuple[int, Any]]) -> dict[int, int]:
    """line -> line of the latest version that supersedes it (Observations sharing an id)."""
    best: dict[str, tuple[tuple[int, str, int], int]] = {}
    for order, (line, res) in enumerate(resources):
        if isinstance(res, dict) and res.get("resourceType") == "Observation" and res.get("id"):
            k = _version_key(res, order)
            rid = str(res["id"])
            if rid not in best or k > best[rid][0]:
                best[rid] = (k, line)
    out: dict[int, int] = {}
    for line, res in resources:
        if isinstance(res, dict) and res.get("resourceType") == "Observation" and res.get("id"):
            latest = best[str(res["id"])][1]
            if latest != line:
                out[line] = latest
    return out


def _status_verdict(status: str, preliminary: str) -> tuple[Reason, str]:
    if status in NOT_DATA_STATUS:
        return Reason.STATUS_NOT_DATA, f"status {status}: never data (FHIR R4)"
    if status in POLICY_STATUS and preliminary == "reject":
        return Reason.PRELIMINARY, f"status {status}: refused (policy preliminary: reject)"
    if status and status not in DATA_STATUS | POLICY_STATUS:
        return Reason.STATUS_NOT_DATA, f"status {status!r}: not an Observation status of FHIR R4"
    return Reason.ACCEPTED, ""


def parse_resources(
    resources: Iterable[tuple[int, Any]],
    vocab: Vocabulary,
    default_source: str = "fhir",
    preliminary: Literal["accept", "reject"] = "accept",
    validate: bool = False,
) -> FhirRecords:
    """Candidate records of numbered resources (ndjson line or Bundle entry number)."""
    items = list(resources)
    superseded = latest_versions(items)
    out = FhirRecords()
    for line, res in items:
        if not isinstance(res, dict) or "resourceType" not in res:
            out.problems.append(
                ResourceProblem(line, "resourceType", "not a FHIR resource (no resourceType)")
            )
            continue
        kind = res["resourceType"]
        if kind not in SUPPORTED:
            why = f"unsupported resourceType {str(kind)[:40]!r} (expected Observation or Patient)"
            out.problems.append(ResourceProblem(line, "resourceType", why))
            continue
        if validate:
            err = validation_error(kind, res)
            if err:
                out.problems.append(
                    ResourceProblem(line, "resource", f"invalid FHIR R4 {kind}: {err}")
                )
                continue
        if kind == "Patient":
            pat = _patient(res)
            if pat is None:
                out.problems.append(ResourceProblem(line, "id", "missing field: Patient.id"))
            else:
                out.patients.append({**pat, "line": line})
            continue
        _observation(res, line, vocab, default_source, preliminary, superseded, out)
    return out


def _patient(res: dict) -> dict[str, Any] | None:
    pid = res.get("id") or next(
        (i.get("value") for i in res.get("identifier") or [] if isinstance(i, dict)), ""
    )
    if not pid or not str(pid).strip():
        return None
    sex = {"female": "F", "male": "M"}.get(str(res.get("gender", "")).lower(), "")
    return {"patient_id": str(pid).strip(), "sex": sex, "birth_date": str(res.get("birthDate", ""))}


def _observation(
    res: dict,
    line: int,
    vocab: Vocabulary,
    default_source: str,
    preliminary: str,
    superseded: dict[int, int],
    out: FhirRecords,
) -> None:
    subject = res.get("subject")
    ref = str(subject.get("reference", "")).strip() if isinstance(subject, dict) else ""
    sid = ref.split("/", 1)[1].strip() if ref.startswith("Patient/") else ""
    pre, detail = _status_verdict(str(res.get("status", "")), preliminary)
    if line in superseded:
        pre = Reason.SUPERSEDED
        detail = f"superseded by a later version of Observation/{res.get('id')} (record {superseded[line]})"
    if pre == Reason.ACCEPTED and not sid:
        pre, detail = (
            Reason.MISSING_PATIENT,
            "missing field: subject (expected a reference 'Patient/<id>')",
        )
    cats = [c for cat in res.get("category") or [] for c in _codings(cat)]
    base = {
        "line": line,
        "subject": sid,
        "time": _time(res),
        "source": "lab" if "laboratory" in cats else default_source,
        "pre": pre,
        "detail": detail,
    }
    codes = _codings(res.get("code"))
    code = _pick_code(codes, vocab)
    comps = res.get("component")
    own_known = vocab.resolve_code(code) is not None
    if code in vocab.panels or (isinstance(comps, list) and comps and not own_known):
        if not isinstance(comps, list) or not comps:
            why = f"missing field: component (panel {code} without components)"
            out.problems.append(ResourceProblem(line, "component", why, code))
            return
        for k, comp in enumerate(comps):
            comp = comp if isinstance(comp, dict) else {}
            _add(out, base, _pick_code(_codings(comp.get("code")), vocab), comp, f"component[{k}]")
        return
    _add(out, base, code, res, "")


def _add(out: FhirRecords, base: dict[str, Any], code: str, item: dict, where: str) -> None:
    value, unit, pre, detail = _value(item)
    if base["pre"] == Reason.ACCEPTED and pre != Reason.ACCEPTED:
        base = {**base, "pre": pre, "detail": detail}
    out.add(base, code, value, unit, where)


def validation_error(kind: str, res: dict) -> str:
    """'' when ``res`` is a valid FHIR R4 resource (fhir.resources R4B models), else why."""
    if kind == "Observation":
        from fhir.resources.R4B.observation import Observation as model
    else:
        from fhir.resources.R4B.patient import Patient as model  # type: ignore[assignment]
    try:
        model.model_validate(res)
    except Exception as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            try:
                e = errors()[0]
                return f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}"
            except Exception:  # pragma: no cover - defensive
                pass
        return str(exc).splitlines()[0][:200]
    return ""
