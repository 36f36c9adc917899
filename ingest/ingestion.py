"""Ingestion: raw files -> canonical, pseudonymised, consent-filtered observations + quarantine.

The accounting is explicit and per (file, code):
``read = accepted + quarantined + consent_excluded + duplicates``. Order of the gates:
record checks (quarantine) -> consent for the configured purpose -> exact duplicates
(same patient, time, code, value; the first occurrence in input order is kept).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.schema import OBSERVATION_COLUMNS, QUARANTINE_COLUMNS
from core.vocabulary import Vocabulary
from governance.pseudonym import pseudonymise
from ingest.cleaning import normalise_observations, parse_bool, parse_times, scrubber
from ingest.config import IngestConfig
from ingest.readers import Problem, RawRead, expand_inputs, read_unit, wide_mapping

logger = logging.getLogger(__name__)

COUNT_KEYS = ("read", "accepted", "quarantined", "consent_excluded", "duplicates")
PATIENT_KEY = "(patient)"
OUTCOME_KEY = "(outcome)"
UNPARSED_KEY = "(unparsed)"
QUARANTINE_OUT = [*QUARANTINE_COLUMNS, "code"]


@dataclass
class IngestResult:
    observations: pd.DataFrame
    patients: pd.DataFrame
    outcomes: pd.DataFrame
    cohort: pd.DataFrame | None
    quarantine: pd.DataFrame
    counts: (
        pd.DataFrame
    )  # file, format, code, read, accepted, quarantined, consent_excluded, duplicates
    report: dict[str, Any] = field(default_factory=dict)


class _Pseudo:
    """Memoised pseudonyms for one run."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.cache: dict[str, str] = {}

    def __call__(self, sid: str) -> str:
        p = self.cache.get(sid)
        if p is None:
            p = self.cache[sid] = pseudonymise(sid, self.key)
        return p

    def series(self, s: pd.Series) -> pd.Series:
        u = pd.unique(s.astype(str))
        return s.astype(str).map({x: self(x) for x in u})


def _problems_frame(problems: list[Problem]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "line": [p.line for p in problems],
            "field": [p.field for p in problems],
            "reason": [p.reason for p in problems],
            "code": [p.code or UNPARSED_KEY for p in problems],
            "source_id": ["" for _ in problems],
            "record": [p.record for p in problems],
        }
    )


def _patients_from(rr: RawRead, cfg: IngestConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Typed patient rows (raw ids) and rejected rows of one patients table."""
    df = rr.patients
    assert df is not None
    rej: list[dict] = []
    out = pd.DataFrame({"source_id": df["patient_id"].str.strip(), "line": df["line"]})
    bad = out["source_id"] == ""
    for ln in out.loc[bad, "line"]:
        rej.append(
            {
                "line": int(ln),
                "field": "patient_id",
                "reason": "missing field: patient_id",
                "code": PATIENT_KEY,
                "source_id": "",
            }
        )
    for c in df.columns:
        if c in ("patient_id", "line"):
            continue
        if c.startswith("consent_"):
            out[c] = parse_bool(df[c])
        elif c in ("followup_start", "followup_end"):
            t, unp, _ = parse_times(df[c], "utc")
            out[c] = t
            for ln in out.loc[unp & ~bad, "line"]:
                # the line number locates the row; the raw identifier never goes to a log
                logger.warning("%s line %d: unparseable %s; left empty", rr.file, ln, c)
        elif c == "age":
            out[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
        elif c.startswith("cm_"):
            out[c] = pd.to_numeric(df[c], errors="coerce").fillna(0).astype(int)
        else:
            out[c] = df[c].str.strip()
    purpose_col = f"consent_{cfg.purpose}"
    if purpose_col in out:
        inval = out[purpose_col].isna() & ~bad & (df[purpose_col].str.strip() != "")
        for ln, sid, v in zip(
            out.loc[inval, "line"],
            out.loc[inval, "source_id"],
            df.loc[inval, purpose_col],
            strict=True,
        ):
            rej.append(
                {
                    "line": int(ln),
                    "field": purpose_col,
                    "reason": f"invalid consent value {v!r}: expected true/false",
                    "code": PATIENT_KEY,
                    "source_id": sid,
                }
            )
        bad |= inval
    return out[~bad].reset_index(drop=True), rej


def _outcomes_from(rr: RawRead, cfg: IngestConfig) -> tuple[pd.DataFrame, list[dict]]:
    df = rr.outcomes
    assert df is not None
    rej: list[dict] = []
    sid = df["patient_id"].str.strip()
    ev = df["event"].str.strip()
    t, unp, naive_bad = parse_times(df["time"], cfg.naive_time)
    checks = [
        (sid == "", "patient_id", "missing field: patient_id"),
        (ev == "", "event", "missing field: event"),
        (df["time"].str.strip() == "", "time", "missing field: time"),
        (unp, "time", "unparseable time: expected ISO 8601"),
        (naive_bad, "time", "naive time without UTC offset (ingest.naive_time: reject)"),
    ]
    bad = pd.Series(False, index=df.index)
    for mask, fld, why in checks:
        new = mask & ~bad
        for ln, s in zip(df.loc[new, "line"], sid[new], strict=True):
            rej.append(
                {"line": int(ln), "field": fld, "reason": why, "code": OUTCOME_KEY, "source_id": s}
            )
        bad |= mask
    out = pd.DataFrame({"source_id": sid, "time": t, "event": ev, "line": df["line"]})
    extra = [c for c in df.columns if c not in ("patient_id", "time", "event", "line")]
    for c in extra:
        out[c] = df[c]
    return out[~bad].reset_index(drop=True), rej


def _cohort_from(
    rr: RawRead, cfg: IngestConfig, vocab: Vocabulary
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(cohort rows with canonical value columns, cell-level raw candidates accepted, rejected)."""
    df = rr.cohort
    assert df is not None
    mapping = wide_mapping([c for c in df.columns if c not in ("index_time", "line")], cfg, vocab)
    parts = []
    for col, (code, unit) in mapping.items():
        m = df[col].str.strip() != ""
        parts.append(
            pd.DataFrame(
                {
                    "source_id": df.loc[m, "patient_id"],
                    "time": df.loc[m, "index_time"],
                    "code": code,
                    "value": df.loc[m, col],
                    "unit": unit,
                    "source": "cohort",
                    "line": df.loc[m, "line"],
                    "_col": col,
                }
            )
        )
    raw = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(
            columns=["source_id", "time", "code", "value", "unit", "source", "line", "_col"]
        )
    )
    acc, rej = normalise_observations(raw, vocab, cfg, "cohort")
    t, unp, naive_bad = parse_times(df["index_time"], cfg.naive_time)
    keep = (df["patient_id"].str.strip() != "") & ~unp & ~naive_bad & t.notna()
    base = df.loc[keep, [c for c in df.columns if c not in mapping]].copy()
    base["patient_id"] = base["patient_id"].str.strip()
    base["index_time"] = t[keep]
    for c in base.columns:
        if c.startswith("cm_") or c == "event_observed":
            base[c] = pd.to_numeric(base[c], errors="coerce").fillna(0).astype(int)
        elif c in ("age", "time_to_event_h"):
            base[c] = pd.to_numeric(base[c], errors="coerce").astype(float)
    if len(acc):
        wide = acc.pivot_table(index="line", columns="code", values="value", aggfunc="last")
        base = base.merge(wide, left_on="line", right_index=True, how="left")
    for code, _ in mapping.values():
        if code not in base:
            base[code] = np.nan
    return base.reset_index(drop=True), acc, rej


def _add_counts(rows: list[dict], file: str, fmt: str, codes: pd.Series, col: str) -> None:
    for code, n in codes.value_counts().items():
        rows.append({"file": file, "format": fmt, "code": str(code), col: int(n)})


def ingest(
    inputs: Sequence[str | Path] | Iterable[str | Path],
    cfg: IngestConfig,
    vocab: Vocabulary,
    key: bytes,
) -> IngestResult:
    """Read, check, pseudonymise and consent-filter every input; never drop a row silently."""
    units, skipped = expand_inputs(list(inputs), cfg, vocab)
    pseudo = _Pseudo(key)
    scrub = scrubber(cfg.identifier_pattern, pseudo)
    count_rows: list[dict] = []
    obs_parts: list[pd.DataFrame] = []
    q_parts: list[pd.DataFrame] = []
    pat_parts: list[pd.DataFrame] = []
    fhir_pat: list[pd.DataFrame] = []
    out_parts: list[pd.DataFrame] = []
    cohort_parts: list[pd.DataFrame] = []
    cohort_obs: list[pd.DataFrame] = []

    def quarantine(rr: RawRead, rej: pd.DataFrame) -> None:
        if rej.empty:
            return
        rej = rej.copy()
        if "record" not in rej:
            rej["record"] = ""
        rej["record"] = [
            r if r else rr.record_text(int(ln))
            for r, ln in zip(rej["record"], rej["line"], strict=True)
        ]
        rej["record"] = [scrub(r, s) for r, s in zip(rej["record"], rej["source_id"], strict=True)]
        rej["file"] = rr.file
        q_parts.append(rej)
        _add_counts(count_rows, rr.file, rr.format, rej["code"], "quarantined")

    for order, (path, fmt) in enumerate(units):
        rr = read_unit(path, fmt, cfg, vocab)
        logger.info("read %s as %s", path, rr.format)
        probs = _problems_frame(rr.problems)
        _add_counts(count_rows, rr.file, rr.format, probs["code"], "read")
        quarantine(rr, probs)
        if rr.format == "patients":
            pats, rej = _patients_from(rr, cfg)
            rej_df = pd.DataFrame(rej, columns=["line", "field", "reason", "code", "source_id"])
            n_rows = len(pats) + len(rej_df)
            count_rows.append(
                {"file": rr.file, "format": rr.format, "code": PATIENT_KEY, "read": n_rows}
            )
            quarantine(rr, rej_df)
            pats["_file"], pats["_order"] = rr.file, order
            pat_parts.append(pats)
            continue
        if rr.format == "outcomes":
            outs, rej = _outcomes_from(rr, cfg)
            rej_df = pd.DataFrame(rej, columns=["line", "field", "reason", "code", "source_id"])
            count_rows.append(
                {
                    "file": rr.file,
                    "format": rr.format,
                    "code": OUTCOME_KEY,
                    "read": len(outs) + len(rej_df),
                }
            )
            quarantine(rr, rej_df)
            outs["_file"] = rr.file
            out_parts.append(outs)
            continue
        if rr.format == "cohort":
            base, acc, rej = _cohort_from(rr, cfg, vocab)
            _add_counts(
                count_rows, rr.file, rr.format, pd.concat([acc["code"], rej["code"]]), "read"
            )
            quarantine(rr, rej)
            base["_file"] = rr.file
            cohort_parts.append(base)
            acc["_file"], acc["_order"] = rr.file, order
            acc["format"] = rr.format
            cohort_obs.append(acc)
            continue
        if rr.patients is not None:
            fp = rr.patients.rename(columns={"patient_id": "source_id"})
            fhir_pat.append(fp)
        raw = rr.observations
        ds = cfg.default_source
        default = ds.get(rr.format) or ds.get(rr.format.split("_")[0]) or "unknown"
        acc, rej = normalise_observations(raw, vocab, cfg, default)
        read_codes = pd.concat([acc["code"], rej["code"]])
        _add_counts(count_rows, rr.file, rr.format, read_codes, "read")
        quarantine(rr, rej)
        acc["_file"], acc["_order"] = rr.file, order
        acc["format"] = rr.format
        obs_parts.append(acc)

    # -- patients: tables are authoritative; FHIR Patient resources fill in unknown patients
    patients = (
        pd.concat(pat_parts, ignore_index=True)
        if pat_parts
        else pd.DataFrame(columns=["source_id", "line", "_file", "_order"])
    )
    # consent, duplicates and joins work on pseudonyms, so raw ids and already-pseudonymised
    # ids (e.g. the service's landing files) of the same patient meet
    patients["_pid"] = pseudo.series(patients["source_id"])
    dup_pat = patients.duplicated("_pid", keep="first")
    for f, n in patients.loc[dup_pat, "_file"].value_counts().items():
        count_rows.append(
            {"file": f, "format": "patients", "code": PATIENT_KEY, "duplicates": int(n)}
        )
    patients = patients[~dup_pat].reset_index(drop=True)
    if fhir_pat:
        fp = pd.concat(fhir_pat, ignore_index=True)
        fp["_pid"] = pseudo.series(fp["source_id"])
        fp = fp.drop_duplicates("_pid")
        fp = fp[~fp["_pid"].isin(patients["_pid"])]
        if len(fp):
            add = pd.DataFrame(
                {"source_id": fp["source_id"], "_pid": fp["_pid"], "sex": fp.get("sex")}
            )
            patients = pd.concat([patients, add], ignore_index=True)
    consent_col = f"consent_{cfg.purpose}"
    if consent_col not in patients:
        patients[consent_col] = pd.Series(pd.NA, index=patients.index, dtype="boolean")
    consent = patients.set_index("_pid")[consent_col]
    allowed_ids = set(consent.index[consent.fillna(False).astype(bool)])
    denied_ids = set(consent.index[~consent.fillna(True).astype(bool)])

    def allowed(s: pd.Series) -> pd.Series:
        pid = pseudo.series(s)
        if cfg.missing_consent == "include":
            return ~pid.isin(denied_ids)
        return pid.isin(allowed_ids)

    def seen(s: pd.Series) -> set[str]:
        return set(pseudo.series(pd.Series(pd.unique(s.astype(str)))))

    all_seen: set[str] = set()
    # -- observations: consent, then exact duplicates
    obs = (
        pd.concat(obs_parts, ignore_index=True)
        if obs_parts
        else pd.DataFrame(
            columns=[*OBSERVATION_COLUMNS, "source_id", "line", "_file", "_order", "format"]
        )
    )
    all_seen |= seen(obs["source_id"])
    ok = allowed(obs["source_id"])
    for (f, fmt, c), n in obs.loc[~ok].groupby(["_file", "format", "code"]).size().items():
        count_rows.append({"file": f, "format": fmt, "code": c, "consent_excluded": int(n)})
    obs = obs[ok.to_numpy()].copy()
    obs["patient_id"] = pseudo.series(obs["source_id"])
    obs = obs.sort_values(["_order", "line"], kind="stable")
    dup = obs.duplicated(["patient_id", "time", "code", "value"], keep="first")
    for (f, fmt, c), n in obs.loc[dup].groupby(["_file", "format", "code"]).size().items():
        count_rows.append({"file": f, "format": fmt, "code": c, "duplicates": int(n)})
    obs = obs[~dup.to_numpy()]
    observations = (
        obs[OBSERVATION_COLUMNS]
        .sort_values(["patient_id", "time", "code"], kind="stable")
        .reset_index(drop=True)
    )
    observations["value"] = observations["value"].astype("float64")
    observations["time"] = observations["time"].astype("datetime64[ns, UTC]")

    # -- outcomes
    outcomes = (
        pd.concat(out_parts, ignore_index=True)
        if out_parts
        else pd.DataFrame(columns=["source_id", "time", "event", "line", "_file"])
    )
    all_seen |= seen(outcomes["source_id"])
    ok = allowed(outcomes["source_id"])
    for f, n in outcomes.loc[~ok, "_file"].value_counts().items():
        count_rows.append(
            {"file": f, "format": "outcomes", "code": OUTCOME_KEY, "consent_excluded": int(n)}
        )
    outcomes = outcomes[ok.to_numpy()].copy()
    outcomes["patient_id"] = pseudo.series(outcomes["source_id"])
    dup = outcomes.duplicated(["patient_id", "time", "event"], keep="first")
    for f, n in outcomes.loc[dup, "_file"].value_counts().items():
        count_rows.append(
            {"file": f, "format": "outcomes", "code": OUTCOME_KEY, "duplicates": int(n)}
        )
    outcomes = outcomes[~dup.to_numpy()]
    for f, n in outcomes["_file"].value_counts().items():
        count_rows.append(
            {"file": f, "format": "outcomes", "code": OUTCOME_KEY, "accepted": int(n)}
        )
    extra_o = [
        c
        for c in outcomes.columns
        if c not in ("source_id", "line", "_file", "patient_id", "time", "event")
    ]
    outcomes = (
        outcomes[["patient_id", "time", "event", *extra_o]]
        .sort_values(["patient_id", "time"], kind="stable")
        .reset_index(drop=True)
    )
    outcomes["time"] = pd.to_datetime(outcomes["time"], utc=True)

    # -- cohort
    cohort = None
    if cohort_parts:
        cohort = pd.concat(cohort_parts, ignore_index=True)
        cobs = pd.concat(cohort_obs, ignore_index=True)
        all_seen |= seen(cohort["patient_id"])
        ok_cells = allowed(cobs["source_id"])
        for (f, fmt, c), n in (
            cobs.loc[~ok_cells].groupby(["_file", "format", "code"]).size().items()
        ):
            count_rows.append({"file": f, "format": fmt, "code": c, "consent_excluded": int(n)})
        cohort = cohort[allowed(cohort["patient_id"]).to_numpy()].copy()
        cohort["patient_id"] = pseudo.series(cohort["patient_id"])
        cohort = (
            cohort.drop(columns=["line", "_file"])
            .sort_values("patient_id", kind="stable")
            .reset_index(drop=True)
        )
        for (f, fmt, c), n in (
            cobs.loc[ok_cells].groupby(["_file", "format", "code"]).size().items()
        ):
            count_rows.append({"file": f, "format": fmt, "code": c, "accepted": int(n)})

    # -- patients output
    all_seen |= set(patients["_pid"])
    n_pat = len(patients)
    ok = allowed(patients["source_id"])
    pat_excl = patients.loc[~ok]
    for f, n in pat_excl["_file"].dropna().value_counts().items():
        count_rows.append(
            {"file": f, "format": "patients", "code": PATIENT_KEY, "consent_excluded": int(n)}
        )
    for f, n in patients.loc[ok, "_file"].dropna().value_counts().items():
        count_rows.append(
            {"file": f, "format": "patients", "code": PATIENT_KEY, "accepted": int(n)}
        )
    patients_out = patients[ok.to_numpy()].copy()
    patients_out.insert(0, "patient_id", pseudo.series(patients_out["source_id"]))
    patients_out = patients_out.drop(
        columns=[c for c in ("source_id", "_pid", "line", "_file", "_order") if c in patients_out]
    )
    for c in patients_out.columns:
        if c.startswith("consent_"):
            patients_out[c] = patients_out[c].astype("boolean").fillna(False).astype(bool)
    patients_out = patients_out.sort_values("patient_id", kind="stable").reset_index(drop=True)

    # accepted counts for observations and outcomes
    for (f, fmt, c), n in obs.groupby(["_file", "format", "code"]).size().items():
        count_rows.append({"file": f, "format": fmt, "code": c, "accepted": int(n)})
    counts = pd.DataFrame(count_rows, columns=["file", "format", "code", *COUNT_KEYS])
    counts = (
        counts.groupby(["file", "format", "code"], sort=True, as_index=False)[list(COUNT_KEYS)]
        .sum(min_count=0)
        .fillna(0)
    )
    for c in COUNT_KEYS:
        counts[c] = counts[c].astype(int)
    quarantine_df = (
        pd.concat(q_parts, ignore_index=True)[QUARANTINE_OUT]
        if q_parts
        else pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_OUT})
    )
    quarantine_df["line"] = quarantine_df["line"].astype("int64")
    for c in ("file", "field", "reason", "record", "code"):
        quarantine_df[c] = quarantine_df[c].astype(str)
    report = build_report(counts, quarantine_df, cfg, skipped)
    report["consent"].update(
        {
            "patients_in_tables": n_pat,
            "patients_excluded": len(pat_excl),
            "patients_without_consent_record": len(all_seen - set(consent.index)),
        }
    )
    report["outputs"] = {
        "observations": len(observations),
        "patients": len(patients_out),
        "outcomes": len(outcomes),
        "cohort": 0 if cohort is None else len(cohort),
        "quarantine": len(quarantine_df),
    }
    return IngestResult(observations, patients_out, outcomes, cohort, quarantine_df, counts, report)


def _reason_kind(reason: str) -> str:
    r = reason.split(":")[0]
    for prefix in (
        "unparseable time",
        "unknown code",
        "unknown unit",
        "unparseable value",
        "out-of-range value",
        "invalid consent value",
    ):
        if r.startswith(prefix):
            return prefix
    return r


def build_report(
    counts: pd.DataFrame, quarantine: pd.DataFrame, cfg: IngestConfig, skipped: list[str]
) -> dict[str, Any]:
    """JSON-able report: totals, per file and code, quarantine reasons, and the balance check."""
    totals = {k: int(counts[k].sum()) for k in COUNT_KEYS}
    files: dict[str, Any] = {}
    for (f, fmt), g in counts.groupby(["file", "format"], sort=True):
        entry: dict[str, Any] = {"format": fmt, **{k: int(g[k].sum()) for k in COUNT_KEYS}}
        entry["codes"] = {
            str(r.code): {k: int(getattr(r, k)) for k in COUNT_KEYS}
            for r in g.itertuples(index=False)
        }
        files[str(f)] = entry
    bal = counts["read"] - counts[
        ["accepted", "quarantined", "consent_excluded", "duplicates"]
    ].sum(axis=1)
    reasons = quarantine["reason"].map(_reason_kind).value_counts().sort_index()
    return {
        "purpose": cfg.purpose,
        "totals": totals,
        "balanced": bool((bal == 0).all()),
        "files": files,
        "quarantine_reasons": {str(k): int(v) for k, v in reasons.items()},
        "consent": {
            "purpose": cfg.purpose,
            "missing_consent": cfg.missing_consent,
            "records_excluded": totals["consent_excluded"],
        },
        "skipped_files": skipped,
    }
