"""Minimised research exports: consent, date shifting, generalised quasi-identifiers, k-anonymity.

A research dataset leaves the secure enclave, so it carries as little as the research needs:

* only patients who consented to ``research``;
* a separate research id per patient (keyed HMAC of the internal pseudonym with a
  domain label), so the export cannot be joined back to internal artifacts without the key;
* every timestamp of a patient shifted by the same whole number of days, derived from the key
  and the pseudonym (deterministic: re-exports agree, intervals and time of day are kept,
  calendar dates and weekdays are not);
* age generalised to bands (top-coded at ``top_age``); only the patient columns listed in
  ``patient_columns`` are kept and every kept attribute counts as a quasi-identifier;
* a k-anonymity check over those quasi-identifiers: if any combination is shared by fewer than
  ``k`` patients the export is refused (:class:`ExportRefused`), nothing is written.

k-anonymity does not protect against attribute disclosure (l-diversity) or linkage through the
observation series themselves; it is a floor, not a proof of anonymity.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from governance.consent import filter_by_consent

logger = logging.getLogger(__name__)

RESEARCH_ID_PREFIX = "r_"


class ExportConfig(BaseModel):
    """``params.yaml`` section ``export``."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=5, ge=2, description="minimum patients per quasi-identifier combination")
    max_shift_days: int = Field(default=182, ge=1, le=3650, description="dates shift by ±1..N days")
    age_band_years: int = Field(default=10, ge=1, le=50)
    top_age: int = Field(
        default=90, ge=18, le=120, description="ages at or above are one band 'N+'"
    )
    patient_columns: list[str] = Field(
        default_factory=lambda: ["sex", "setting"],
        description="patient columns kept besides age_band; all count as quasi-identifiers",
    )
    include_outcomes: bool = True

    @model_validator(mode="after")
    def _no_identifiers(self) -> ExportConfig:
        forbidden = {"patient_id", "age", "followup_start", "followup_end"}
        bad = sorted(forbidden & set(self.patient_columns))
        if bad:
            raise ValueError(f"patient_columns may not include {bad} (exported in minimised form)")
        return self

    @property
    def quasi_identifiers(self) -> list[str]:
        return ["age_band", *self.patient_columns]


class ExportRefused(ValueError):
    """The export would not meet the minimisation rules; nothing may be written."""


@dataclass
class ExportResult:
    patients: pd.DataFrame
    observations: pd.DataFrame
    outcomes: pd.DataFrame | None
    manifest: dict[str, Any] = field(default_factory=dict)
    #: internal pseudonyms of the exported patients, for the audit log only (never written)
    exported_pseudonyms: list[str] = field(default_factory=list)


def _hmac_int(key: bytes, label: str, pseudonym: str) -> int:
    digest = hmac.new(key, f"{label}|{pseudonym}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big")


def date_shift_days(pseudonym: str, key: bytes, max_days: int) -> int:
    """Whole-day shift in ``[-max_days, -1] ∪ [1, max_days]``: never zero, same for every
    timestamp of the patient and every export made with the same key."""
    n = _hmac_int(key, "date-shift", pseudonym) % (2 * max_days)
    return n - max_days if n < max_days else n - max_days + 1


def research_id(pseudonym: str, key: bytes) -> str:
    """Export-only identifier: unlinkable to internal pseudonyms without the key."""
    digest = hmac.new(key, f"research-id|{pseudonym}".encode(), hashlib.sha256).hexdigest()
    return RESEARCH_ID_PREFIX + digest[:20]


def age_band(age: pd.Series, width: int, top: int) -> pd.Series:
    """``"60-69"`` style bands; ``"90+"`` at and above ``top``; missing stays missing."""
    a = pd.to_numeric(age, errors="coerce")
    lo = (a // width * width).astype("Int64")
    labels = lo.astype("string") + "-" + (lo + width - 1).astype("string")
    labels = labels.where(a < top, f"{top}+")
    return labels.where(a.notna(), pd.NA).astype("string")


def k_anonymity(frame: pd.DataFrame, quasi_identifiers: list[str]) -> pd.DataFrame:
    """Size of each equivalence class (combination of quasi-identifier values, NA included)."""
    return (
        frame.groupby(quasi_identifiers, dropna=False, observed=True)
        .size()
        .rename("n")
        .reset_index()
        .sort_values("n", kind="stable")
    )


def _shift(frame: pd.DataFrame, shifts: pd.Series, id_col: str = "patient_id") -> pd.DataFrame:
    out = frame.copy()
    delta = pd.to_timedelta(out[id_col].map(shifts), unit="D")
    for col in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[col]):
            out[col] = out[col] + delta
    return out


def build_export(
    observations: pd.DataFrame,
    patients: pd.DataFrame,
    outcomes: pd.DataFrame | None,
    config: ExportConfig,
    key: bytes,
) -> ExportResult:
    """The minimised research dataset, or :class:`ExportRefused` (pure: no IO, no mutation)."""
    missing = [c for c in ["patient_id", "age", *config.patient_columns] if c not in patients]
    if missing:
        raise ExportRefused(f"patient table lacks column(s) {missing} required by params export")
    consented, consent = filter_by_consent(patients, "research")
    if consented.empty:
        raise ExportRefused("no patient consented to research: nothing to export")

    pats = consented[["patient_id", *config.patient_columns]].copy()
    pats.insert(1, "age_band", age_band(consented["age"], config.age_band_years, config.top_age))
    classes = k_anonymity(pats, config.quasi_identifiers)
    small = classes[classes["n"] < config.k]
    if not small.empty:
        worst = small.iloc[0]
        combo = ", ".join(f"{q}={worst[q]}" for q in config.quasi_identifiers)
        raise ExportRefused(
            f"k-anonymity {int(classes['n'].min())} < k={config.k}: {len(small)} of "
            f"{len(classes)} quasi-identifier combinations ({', '.join(config.quasi_identifiers)}) "
            f"have fewer than {config.k} patients (smallest: {combo}, n={int(worst['n'])}); "
            "widen age bands, drop patient_columns or lower export.k"
        )

    ids = pats["patient_id"].astype(str)
    shifts = pd.Series(
        {pid: date_shift_days(pid, key, config.max_shift_days) for pid in ids}, dtype="int64"
    )
    rids = pd.Series({pid: research_id(pid, key) for pid in ids})

    # follow-up window, shifted with the patient's other dates
    dates = consented[["patient_id"]].copy()
    for col in ("followup_start", "followup_end"):
        if col in consented:
            dates[col] = consented[col]
    pats = pats.merge(_shift(dates, shifts), on="patient_id", how="left")

    obs, obs_consent = filter_by_consent(observations, "research", patients=patients)
    obs = _shift(obs, shifts)
    outc = None
    if outcomes is not None and config.include_outcomes:
        outc, _ = filter_by_consent(outcomes, "research", patients=patients)
        outc = _shift(outc, shifts)

    def relabel(frame: pd.DataFrame) -> pd.DataFrame:
        f = frame.copy()
        f["patient_id"] = f["patient_id"].astype(str).map(rids)
        f = f.rename(columns={"patient_id": "research_id"})
        sort = [c for c in ("research_id", "time", "code") if c in f]
        return f.sort_values(sort, kind="stable").reset_index(drop=True)

    manifest = {
        "purpose": "research",
        "patients": len(pats),
        "observations": len(obs),
        "outcomes": None if outc is None else len(outc),
        "consent": consent.as_dict(),
        "observations_consent": obs_consent.as_dict(),
        "k": config.k,
        "k_achieved": int(classes["n"].min()),
        "quasi_identifiers": config.quasi_identifiers,
        "equivalence_classes": len(classes),
        "date_shift": f"per patient, whole days in ±[1, {config.max_shift_days}] (keyed HMAC)",
        "age_bands": f"{config.age_band_years}-year bands, top-coded at {config.top_age}+",
        "identifier": "research_id = keyed HMAC of the internal pseudonym (not linkable without key)",
    }
    logger.info(
        "export: %d patients (%d excluded without research consent), k=%d achieved %d",
        manifest["patients"],
        consent.patients_excluded,
        config.k,
        manifest["k_achieved"],
    )
    return ExportResult(
        patients=relabel(pats),
        observations=relabel(obs),
        outcomes=None if outc is None else relabel(outc),
        manifest=manifest,
        exported_pseudonyms=sorted(ids),
    )
