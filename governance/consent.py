"""Consent per purpose: who may be used for care, for model training, for research.

Consent comes either from the patient table (boolean columns ``consent_care``,
``consent_model_training``, ``consent_research``) or from FHIR R4 ``Consent`` resources. Every
stage that uses patient data filters for its own purpose with :func:`filter_by_consent` and
reports how many patients it excluded: ingestion for the stage's ``purpose`` param, training for
``model_training``, the service for ``care``, ``vitalrisk export`` for ``research``.

Policy choices (conservative, opt-in):

* A missing, null or unparsable consent value means **no consent**.
* FHIR: only ``status = active`` resources count; a resource without a root ``provision`` is
  ignored (its policy is not machine-readable here). A provision applies to a purpose when it
  lists no ``purpose`` codes or lists a code that maps to the purpose (:data:`FHIR_PURPOSE_MAP`);
  nested provisions are exceptions to their parent and override it; a provision whose
  ``period`` does not contain ``at`` does not apply. With several Consent resources for the same
  patient, the latest ``dateTime`` decides; on a tie ``deny`` wins.
* When both the table and FHIR give an answer, both must permit (the most restrictive wins).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from governance.pseudonym import pseudonymise

logger = logging.getLogger(__name__)

PURPOSES: tuple[str, ...] = ("care", "model_training", "research")

V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
VITALRISK_PURPOSE = "https://vitalrisk.dev/fhir/CodeSystem/purpose"

#: FHIR purpose-of-use codes -> our purposes. Keys are ``(system, code)``; a system of ``None``
#: matches the code in any system. HL7 v3 PurposeOfUse (v3-ActReason) has treatment and research
#: codes but no dedicated "train a model" code in R4-era terminology, so ``model_training`` is
#: granted by HQUALIMP (healthcare quality improvement; risk models are deployed to improve
#: care), by MLTRAINING where a newer terminology release provides it, and by our own code
#: system. HOPERAT (operations) is deliberately NOT mapped: too broad for secondary use.
FHIR_PURPOSE_MAP: dict[tuple[str | None, str], str] = {
    (V3_ACT_REASON, "TREAT"): "care",
    (V3_ACT_REASON, "ETREAT"): "care",
    (V3_ACT_REASON, "CAREMGT"): "care",
    (V3_ACT_REASON, "HQUALIMP"): "model_training",
    (V3_ACT_REASON, "MLTRAINING"): "model_training",
    (V3_ACT_REASON, "HRESCH"): "research",
    (V3_ACT_REASON, "CLINTRCH"): "research",
    (V3_ACT_REASON, "BIORCH"): "research",
    (VITALRISK_PURPOSE, "care"): "care",
    (VITALRISK_PURPOSE, "model_training"): "model_training",
    (VITALRISK_PURPOSE, "research"): "research",
}

_TRUE = {"true", "t", "yes", "y", "1", "permit", "granted"}


class ConsentError(ValueError):
    """Consent information is missing or malformed (the message names the column or resource)."""


def consent_column(purpose: str) -> str:
    check_purpose(purpose)
    return f"consent_{purpose}"


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ConsentError(f"unknown consent purpose {purpose!r}; expected one of {PURPOSES}")
    return purpose


def _as_bool(series: pd.Series) -> pd.Series:
    """Consent values as strict booleans: anything not clearly 'yes' is 'no'."""
    if pd.api.types.is_bool_dtype(series):
        return series.fillna(False).astype(bool)
    if pd.api.types.is_numeric_dtype(series):
        return series.fillna(0).eq(1)
    return series.astype("string").str.strip().str.lower().isin(_TRUE).fillna(False).astype(bool)


def consent_mask(patients: pd.DataFrame, purpose: str) -> pd.Series:
    """Boolean Series aligned with ``patients``: True where the patient consented to ``purpose``."""
    col = consent_column(purpose)
    if col not in patients.columns:
        raise ConsentError(
            f"patient table has no column {col!r} (consent for purpose {purpose!r}); "
            f"expected boolean columns {[f'consent_{p}' for p in PURPOSES]}"
        )
    return _as_bool(patients[col])


def consented_ids(patients: pd.DataFrame, purpose: str, id_col: str = "patient_id") -> set[str]:
    mask = consent_mask(patients, purpose)
    return set(patients.loc[mask, id_col].astype(str))


@dataclass(frozen=True)
class ConsentFilterResult:
    """What a consent filter kept and excluded, for stage reports (counts only, no ids)."""

    purpose: str
    patients_kept: int
    patients_excluded: int
    rows_kept: int
    rows_excluded: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose,
            "patients_kept": self.patients_kept,
            "patients_excluded": self.patients_excluded,
            "rows_kept": self.rows_kept,
            "rows_excluded": self.rows_excluded,
        }


def filter_by_consent(
    frame: pd.DataFrame,
    purpose: str,
    patients: pd.DataFrame | None = None,
    id_col: str = "patient_id",
) -> tuple[pd.DataFrame, ConsentFilterResult]:
    """Rows of ``frame`` whose patient consented to ``purpose``, and the counts excluded.

    ``frame`` may be the patient table itself (``patients=None``) or any frame keyed by
    ``id_col`` (observations, features, outcomes) together with the patient table. Patients
    missing from the patient table count as not consented. Does not mutate its inputs.
    """
    check_purpose(purpose)
    table = frame if patients is None else patients
    if id_col not in frame.columns:
        raise ConsentError(f"frame has no {id_col!r} column to filter by consent")
    allowed = consented_ids(table, purpose, id_col=id_col)
    ids = frame[id_col].astype(str)
    keep = ids.isin(allowed)
    kept = frame.loc[keep].copy()
    all_ids = set(ids.unique())
    kept_ids = all_ids & allowed
    result = ConsentFilterResult(
        purpose=purpose,
        patients_kept=len(kept_ids),
        patients_excluded=len(all_ids - kept_ids),
        rows_kept=int(keep.sum()),
        rows_excluded=int((~keep).sum()),
    )
    if result.patients_excluded:
        logger.info(
            "consent %s: kept %d patients, excluded %d (%d rows)",
            purpose,
            result.patients_kept,
            result.patients_excluded,
            result.rows_excluded,
        )
    return kept, result


def consent_summary(patients: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per purpose: how many patients consented and how many did not (for reports)."""
    out: dict[str, dict[str, int]] = {}
    for purpose in PURPOSES:
        if consent_column(purpose) in patients.columns:
            mask = consent_mask(patients, purpose)
            out[purpose] = {"consented": int(mask.sum()), "excluded": int((~mask).sum())}
    return out


# ---------------------------------------------------------------------------------------------
# FHIR R4 Consent


def _parse_dt(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = pd.Timestamp(str(value)).to_pydatetime()
        except (ValueError, TypeError):
            return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _purposes_of(codings: Iterable[Any] | None) -> set[str] | None:
    """Our purposes named by a provision's purpose codings; None when it names none."""
    codings = list(codings or [])
    if not codings:
        return None
    found: set[str] = set()
    for c in codings:
        system, code = getattr(c, "system", None), str(getattr(c, "code", "") or "")
        system = None if system is None else str(system)
        mapped = FHIR_PURPOSE_MAP.get((system, code)) or FHIR_PURPOSE_MAP.get((None, code))
        if mapped:
            found.add(mapped)
    return found


def _in_period(period: Any, at: datetime) -> bool:
    if period is None:
        return True
    start, end = _parse_dt(getattr(period, "start", None)), _parse_dt(getattr(period, "end", None))
    return (start is None or start <= at) and (end is None or at <= end)


def _decide(provision: Any, purpose: str, at: datetime, inherited: str | None) -> str | None:
    """permit/deny for ``purpose`` from a provision tree; nested provisions override parents."""
    if provision is None or not _in_period(getattr(provision, "period", None), at):
        return inherited
    purposes = _purposes_of(getattr(provision, "purpose", None))
    applies = purposes is None or purpose in purposes
    decision = inherited
    if applies and getattr(provision, "type", None) in ("permit", "deny"):
        decision = provision.type
    for child in getattr(provision, "provision", None) or []:
        decision = _decide(child, purpose, at, decision)
    return decision


def _patient_ref(resource: Any) -> str | None:
    ref = getattr(getattr(resource, "patient", None), "reference", None)
    if ref:
        return str(ref).rsplit("/", 1)[-1]
    ident = getattr(getattr(resource, "patient", None), "identifier", None)
    return str(ident.value) if ident is not None and ident.value else None


def parse_consent(resource: Mapping[str, Any] | Any) -> Any:
    """Validate one FHIR R4 Consent (dict or model) with fhir.resources (R4B == R4 here)."""
    from fhir.resources.R4B.consent import Consent

    if isinstance(resource, Consent):
        return resource
    try:
        return Consent.model_validate(dict(resource))
    except Exception as exc:  # pydantic ValidationError, with the FHIR path in its message
        rid = resource.get("id", "?") if isinstance(resource, Mapping) else "?"
        raise ConsentError(f"Consent/{rid}: not a valid FHIR R4 Consent: {exc}") from None


def consent_from_fhir(
    resources: Iterable[Mapping[str, Any] | Any], key: bytes | None, at: datetime | None = None
) -> pd.DataFrame:
    """One row per patient (pseudonymised with ``key``) with ``consent_<purpose>`` booleans.

    ``key=None`` keeps the source ids (only for use inside the enclave, before ingestion
    pseudonymises them). ``at`` is the time the decision is made for (provision periods);
    default now.
    """
    at = at or datetime.now(UTC)
    #: pseudonym -> purpose -> (dateTime, decision)
    latest: dict[str, dict[str, tuple[datetime, str]]] = {}
    epoch = datetime(1900, 1, 1, tzinfo=UTC)
    for raw in resources:
        res = parse_consent(raw)
        if res.status != "active":
            continue
        sid = _patient_ref(res)
        if not sid:
            raise ConsentError(f"Consent/{res.id or '?'}: no patient reference")
        pid = sid if key is None else pseudonymise(sid, key)
        when = _parse_dt(res.dateTime) or epoch
        per = latest.setdefault(pid, {})
        for purpose in PURPOSES:
            decision = _decide(res.provision, purpose, at, None)
            if decision is None:
                continue
            prev = per.get(purpose)
            if prev is None or when > prev[0] or (when == prev[0] and decision == "deny"):
                per[purpose] = (when, decision)
    rows = [
        {
            "patient_id": pid,
            **{f"consent_{p}": per.get(p, (epoch, "deny"))[1] == "permit" for p in PURPOSES},
        }
        for pid, per in sorted(latest.items())
    ]
    return pd.DataFrame(rows, columns=["patient_id", *[f"consent_{p}" for p in PURPOSES]])


def read_fhir_consents(path: str | Path) -> list[dict[str, Any]]:
    """Consent resources from an ndjson file, a Bundle, or a single resource JSON file."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    docs: list[Any] = []
    if p.suffix == ".ndjson":
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except ValueError:
                    raise ConsentError(f"{p}:{i}: not valid JSON") from None
    else:
        try:
            doc = json.loads(text)
        except ValueError:
            raise ConsentError(f"{p}: not valid JSON") from None
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            docs = [e.get("resource", {}) for e in doc.get("entry", []) or []]
        else:
            docs = doc if isinstance(doc, list) else [doc]
    return [d for d in docs if isinstance(d, dict) and d.get("resourceType") == "Consent"]


def merge_consent(patients: pd.DataFrame, fhir_consent: pd.DataFrame) -> pd.DataFrame:
    """Patient table with FHIR consent folded in: a purpose is permitted only if every source
    that speaks about it permits (the most restrictive wins). Returns a new frame."""
    out = patients.copy()
    fhir = fhir_consent.set_index("patient_id")
    ids = out["patient_id"].astype(str)
    for purpose in PURPOSES:
        col = f"consent_{purpose}"
        if col in fhir.columns:
            from_fhir = ids.map(fhir[col]).astype("boolean")
        else:
            from_fhir = pd.Series(pd.NA, index=out.index, dtype="boolean")
        if col in out.columns:
            table = _as_bool(out[col])
            out[col] = table & from_fhir.fillna(True).astype(bool)
        else:
            out[col] = from_fhir.fillna(False).astype(bool)
    return out
