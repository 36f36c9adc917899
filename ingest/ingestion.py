"""Ingestion: raw files -> canonical, pseudonymised, consent-filtered observations + quarantine.

The accounting is explicit and per (file, code):
``read = accepted + quarantined + consent_excluded + duplicates + unmapped``. Order of the
gates: the reader (unmapped columns, broken records) -> the canonical path (quarantine; an
unknown code counts as unmapped) -> consent for the configured purpose -> exact duplicates
(same patient, time, code, value; the first occurrence in input order is kept).

Observations travel as integer-coded arrays (patient, code, source indexes, int64 times), so
20,000 PSV files cost numpy passes, not Python loops per value.
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
from ingest.canonical import Reason, Result, canonicalise
from ingest.config import IngestConfig
from ingest.formats.tables import (
    COVARIATE_KEY,
    OUTCOME_KEY,
    PATIENT_KEY,
    type_cohort,
    type_outcomes,
    type_patients,
)
from ingest.raw import RawRead, StructuralError
from ingest.walk import walk_inputs

logger = logging.getLogger(__name__)

COUNT_KEYS = ("read", "accepted", "quarantined", "consent_excluded", "duplicates", "unmapped")
UNPARSED_KEY = "(unparsed)"
QUARANTINE_OUT = [*QUARANTINE_COLUMNS, "code"]


@dataclass
class IngestResult:
    observations: pd.DataFrame
    patients: pd.DataFrame
    outcomes: pd.DataFrame
    cohort: pd.DataFrame | None
    quarantine: pd.DataFrame
    counts: pd.DataFrame  # file, format, code, then COUNT_KEYS
    report: dict[str, Any] = field(default_factory=dict)


class _Ids:
    """Raw ids -> pseudonym indexes, shared by every file of one run."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.raw: dict[str, int] = {}
        self.names: list[str] = []  # pseudonyms
        self._pidx: dict[str, int] = {}
        self.of_raw: list[int] = []

    def index(self, raw_names: Sequence[str]) -> np.ndarray:
        out = np.empty(len(raw_names), dtype=np.int32)
        for i, r in enumerate(raw_names):
            j = self.raw.get(r)
            if j is None:
                p = pseudonymise(r, self.key) if r else ""
                k = self._pidx.setdefault(p, len(self.names))
                if k == len(self.names):
                    self.names.append(p)
                j = self.raw[r] = len(self.of_raw)
                self.of_raw.append(k)
            out[i] = self.of_raw[j]
        return out

    def series(self, s: pd.Series) -> np.ndarray:
        codes, uniq = pd.factorize(s.astype(str).str.strip())
        return self.index(list(uniq))[codes] if len(s) else np.zeros(0, np.int32)

    def pseudonym(self, raw: str) -> str:
        return self.names[int(self.index([raw])[0])]


@dataclass
class _Chunk:
    """Accepted candidates of one read (observations or cohort cells)."""

    file: int
    pid: np.ndarray
    time: np.ndarray
    key: np.ndarray
    value: np.ndarray
    source: np.ndarray  # global source index
    line: np.ndarray


class _Ledger:
    """Counts per (file, format, code) and the quarantine rows."""

    def __init__(self, scrub: Any) -> None:
        self.rows: list[dict[str, Any]] = []
        self.q: list[pd.DataFrame] = []
        self.scrub = scrub

    def add(self, file: str, fmt: str, code: str, **counts: int) -> None:
        if any(counts.values()):
            self.rows.append({"file": file, "format": fmt, "code": code, **counts})

    def quarantine(self, rr: RawRead, rej: pd.DataFrame, read: bool = True) -> None:
        """Quarantine ``rej`` (line, field, reason, code, source_id[, record]) of ``rr``."""
        if rej.empty:
            return
        rej = rej.copy()
        if "record" not in rej:
            rej["record"] = ""
        rej["record"] = [
            self.scrub(r if r else rr.record_text(int(ln)), s)
            for r, ln, s in zip(rej["record"], rej["line"], rej["source_id"], strict=True)
        ]
        rej["file"] = rr.file
        self.q.append(rej)
        for code, n in rej["code"].value_counts().items():
            self.add(
                rr.file,
                rr.format,
                str(code),
                quarantined=int(n),
                **({"read": int(n)} if read else {}),
            )


def scrubber(pattern: str, pseudo: Any) -> Any:
    """A function that pseudonymises raw identifiers in free text (quarantined records): the
    record's own source id when known, and anything matching ``pattern``."""
    import re

    rx = re.compile(pattern) if pattern else None

    def scrub(text: str, source_id: str = "") -> str:
        out = str(text)
        if source_id and source_id in out:
            out = out.replace(source_id, pseudo(source_id))
        if rx is not None:
            out = rx.sub(lambda m: pseudo(m.group(0)), out)
        return out

    return scrub


def _judge(rr: RawRead, res: Result, ledger: _Ledger, keys: list[str]) -> np.ndarray:
    """Count and quarantine one read's verdicts; returns the accepted mask."""
    assert rr.cand is not None and rr.pid is not None and rr.line is not None
    c = rr.cand
    reason = res.reason
    ok = reason == 0
    unknown = reason == Reason.UNKNOWN_CODE
    per_key = np.bincount(res.key[ok].astype(np.int64), minlength=len(keys))
    for k in np.flatnonzero(per_key).tolist():
        ledger.add(rr.file, rr.format, keys[k], read=int(per_key[k]))
    names = np.array(c.code_names, dtype=object)
    for name, n in pd.Series(names[c.code[unknown]]).value_counts().items():
        ledger.add(rr.file, rr.format, f"{name} (unmapped code)", read=int(n), unmapped=int(n))
    label = np.array([*keys, ""], dtype=object)
    code_label = lambda at: np.where(res.key[at] >= 0, label[res.key[at]], names[c.code[at]])  # noqa: E731
    bad = np.flatnonzero(~ok & ~unknown)
    if len(bad):
        rej = pd.DataFrame(
            {
                "line": rr.line[bad],
                "field": [res.field_of(int(i)) for i in bad],
                "reason": [res.message(int(i)) for i in bad],
                "code": code_label(bad),
                "source_id": np.array(rr.pid_names, dtype=object)[rr.pid[bad]],
            }
        )
        ledger.quarantine(rr, rej)
    return ok


def ingest(
    inputs: Sequence[str | Path] | Iterable[str | Path],
    cfg: IngestConfig,
    vocab: Vocabulary,
    key: bytes,
) -> IngestResult:
    """Read, check, pseudonymise and consent-filter every input; never drop a row silently."""
    units, skipped = walk_inputs(list(inputs), cfg, vocab)
    ids = _Ids(key)
    ledger = _Ledger(scrubber(cfg.identifier_pattern, ids.pseudonym))
    window, now = cfg.time_window.window(), cfg.time_window.reference_ns()
    keys = list(vocab.codes)
    files: list[tuple[str, str]] = []
    sources: dict[str, int] = {}
    chunks: list[_Chunk] = []
    cohort_chunks: list[_Chunk] = []
    tables: dict[str, list[pd.DataFrame]] = {
        "patients": [],
        "derived": [],
        "outcomes": [],
        "cohort": [],
    }
    for order, (path, fmt) in enumerate(units):
        try:
            rr = fmt.read(path, cfg, vocab)
        except OSError as exc:
            why = f"unreadable ({exc.strerror or exc})"
            if cfg.unreadable == "error":
                raise StructuralError(f"{path}: {why} (ingest.unreadable: error)") from None
            skipped.append({"path": str(path), "reason": why})
            continue
        logger.info("read %s as %s", path, rr.format)
        _side_tables(rr, order, cfg, ledger, tables)
        for col, n in rr.unmapped.items():
            ledger.add(rr.file, rr.format, f"{col} (unmapped column)", read=n, unmapped=n)
        if rr.problems:
            ledger.quarantine(
                rr,
                pd.DataFrame(
                    {
                        "line": [p.line for p in rr.problems],
                        "field": [p.field for p in rr.problems],
                        "reason": [p.reason for p in rr.problems],
                        "code": [p.code or UNPARSED_KEY for p in rr.problems],
                        "source_id": [p.source_id for p in rr.problems],
                        "record": [p.record for p in rr.problems],
                    }
                ),
            )
        if not rr.n:
            continue
        res = canonicalise(rr.cand, vocab, window, now)  # type: ignore[arg-type]
        ok = _judge(rr, res, ledger, keys)
        assert rr.pid is not None and rr.source is not None and rr.line is not None
        gsrc = np.array([sources.setdefault(s, len(sources)) for s in rr.source_names], np.int32)
        files.append((rr.file, rr.format))
        chunk = _Chunk(
            len(files) - 1,
            ids.index(rr.pid_names)[rr.pid[ok]],
            rr.cand.time_ns[ok],  # type: ignore[union-attr]
            res.key[ok].astype(np.int16),
            res.value[ok],
            gsrc[rr.source[ok]],
            rr.line[ok],
        )
        (cohort_chunks if rr.cohort is not None else chunks).append(chunk)
    return _assemble(
        ids, ledger, cfg, vocab, keys, files, list(sources), chunks, cohort_chunks, tables, skipped
    )


def _side_tables(
    rr: RawRead,
    order: int,
    cfg: IngestConfig,
    ledger: _Ledger,
    tables: dict[str, list[pd.DataFrame]],
) -> None:
    """Type patients/outcomes/cohort tables of one read; quarantine their bad rows."""
    if rr.patients is not None:
        pats, rej = type_patients(rr.patients, rr.file, cfg)
        ledger.add(rr.file, rr.format, PATIENT_KEY, read=len(pats))
        ledger.quarantine(rr, rej)
        tables["patients"].append(pats.assign(_file=rr.file, _order=order))
    if rr.derived_patients is not None and len(rr.derived_patients):
        tables["derived"].append(rr.derived_patients)
    if rr.outcomes is not None:
        outs, rej = type_outcomes(rr.outcomes, cfg)
        ledger.add(
            rr.file,
            "outcomes" if rr.format == "outcomes" else rr.format,
            OUTCOME_KEY,
            read=len(outs),
        )
        ledger.quarantine(rr, rej)
        tables["outcomes"].append(outs.assign(_file=rr.file, _format=rr.format))
    if rr.cohort is not None:
        coh, rej, counts = type_cohort(rr.cohort, cfg)
        ledger.add(rr.file, rr.format, COVARIATE_KEY, read=counts["read"] - counts["quarantined"])
        ledger.quarantine(rr, rej)
        tables["cohort"].append(coh.assign(_file=rr.file))


def _assemble(
    ids: _Ids,
    ledger: _Ledger,
    cfg: IngestConfig,
    vocab: Vocabulary,
    keys: list[str],
    files: list[tuple[str, str]],
    source_names: list[str],
    chunks: list[_Chunk],
    cohort_chunks: list[_Chunk],
    tables: dict[str, list[pd.DataFrame]],
    skipped: list[dict[str, str]],
) -> IngestResult:
    patients, n_in_tables = _patients(ids, ledger, tables)
    if "_file" not in patients:
        patients["_file"] = np.nan
    consent_col = f"consent_{cfg.purpose}"
    n_ids = len(ids.names)
    has_record = np.zeros(n_ids, dtype=bool)
    granted = np.zeros(n_ids, dtype=bool)
    pidx = patients["_pid"].to_numpy(dtype=np.int32)
    if consent_col in patients and len(patients):
        rec = patients[consent_col].astype("boolean")
        has_record[pidx[rec.notna().to_numpy()]] = True
        granted[pidx[rec.fillna(False).to_numpy(dtype=bool)]] = True
    allowed = granted | (~has_record if cfg.missing_consent == "include" else np.zeros(n_ids, bool))
    seen = np.zeros(n_ids, dtype=bool)

    observations = _observations(chunks, allowed, seen, ledger, files, keys, source_names, ids)
    outcomes = _outcomes(ids, allowed, seen, ledger, tables["outcomes"])
    cohort = _cohort(ids, allowed, seen, ledger, files, keys, cohort_chunks, tables)
    seen[pidx] = True
    ok_p = allowed[pidx]
    for f, n in patients.loc[~ok_p, "_file"].dropna().value_counts().items():
        ledger.add(str(f), "patients", PATIENT_KEY, consent_excluded=int(n))
    for f, n in patients.loc[ok_p, "_file"].dropna().value_counts().items():
        ledger.add(str(f), "patients", PATIENT_KEY, accepted=int(n))
    patients_out = patients[ok_p].copy()
    patients_out.insert(0, "patient_id", [ids.names[i] for i in patients_out["_pid"]])
    patients_out = patients_out.drop(
        columns=[c for c in ("source_id", "_pid", "line", "_file", "_order") if c in patients_out]
    )
    for c in patients_out.columns:
        if c.startswith("consent_"):
            patients_out[c] = patients_out[c].astype("boolean").fillna(False).astype(bool)
    patients_out = patients_out.sort_values("patient_id", kind="stable").reset_index(drop=True)

    counts = pd.DataFrame(ledger.rows, columns=["file", "format", "code", *COUNT_KEYS])
    counts = (
        counts.groupby(["file", "format", "code"], sort=True, as_index=False)[list(COUNT_KEYS)]
        .sum(min_count=0)
        .fillna(0)
    )
    for c in COUNT_KEYS:
        counts[c] = counts[c].astype(int)
    quarantine = (
        pd.concat(ledger.q, ignore_index=True)[QUARANTINE_OUT]
        if ledger.q
        else pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_OUT})
    )
    quarantine["line"] = quarantine["line"].astype("int64")
    for c in ("file", "field", "reason", "record", "code"):
        quarantine[c] = quarantine[c].astype(str)
    report = build_report(counts, quarantine, cfg, skipped)
    refused = has_record & ~granted & seen
    without = seen & ~has_record
    excluded = refused | (without if cfg.missing_consent == "exclude" else np.zeros(n_ids, bool))
    report["consent"].update(
        {
            "patients_seen": int(seen.sum()),
            "patients_in_tables": n_in_tables,
            "patients_with_consent_record": int((seen & has_record).sum()),
            "patients_refused": int(refused.sum()),
            "patients_without_consent_record": int(without.sum()),
            "patients_excluded": int(excluded.sum()),
        }
    )
    report["outputs"] = {
        "observations": len(observations),
        "patients": len(patients_out),
        "outcomes": len(outcomes),
        "cohort": 0 if cohort is None else len(cohort),
        "quarantine": len(quarantine),
    }
    return IngestResult(observations, patients_out, outcomes, cohort, quarantine, counts, report)


def _patients(
    ids: _Ids, ledger: _Ledger, tables: dict[str, list[pd.DataFrame]]
) -> tuple[pd.DataFrame, int]:
    """Patients tables (authoritative, deduplicated) + rows data files carry (gaps only)."""
    parts = tables["patients"]
    pats = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame({"source_id": pd.Series(dtype=str), "_file": pd.Series(dtype=str)})
    )
    pats["_pid"] = ids.series(pats["source_id"])
    dup = pats.duplicated("_pid", keep="first").to_numpy()
    for f, n in pats.loc[dup, "_file"].value_counts().items():
        ledger.add(str(f), "patients", PATIENT_KEY, duplicates=int(n))
    pats = pats[~dup].reset_index(drop=True)
    n_tables = len(pats)
    if tables["derived"]:
        der = pd.concat(tables["derived"], ignore_index=True)
        der["_pid"] = ids.series(der["source_id"])
        der = der.drop_duplicates("_pid").drop(columns=["source_id"]).set_index("_pid")
        der = der.drop(columns=[c for c in der.columns if c.startswith("consent_")])
        if "sex" in der:
            der["sex"] = der["sex"].mask(der["sex"] == "")
        base = pats.set_index("_pid")
        merged = base.combine_first(der) if len(base) else der.copy()
        merged["source_id"] = merged.get("source_id", "")
        pats = merged.reset_index().rename(columns={"index": "_pid"})
        pats["_pid"] = pats["_pid"].astype(np.int32)
    return pats, n_tables


def _observations(
    chunks: list[_Chunk],
    allowed: np.ndarray,
    seen: np.ndarray,
    ledger: _Ledger,
    files: list[tuple[str, str]],
    keys: list[str],
    source_names: list[str],
    ids: _Ids,
) -> pd.DataFrame:
    nk = len(keys)

    def cat(name, dt):
        return (
            np.concatenate([getattr(c, name) for c in chunks]).astype(dt)
            if chunks
            else np.zeros(0, dt)
        )

    pid, t, key = cat("pid", np.int32), cat("time", np.int64), cat("key", np.int16)
    value, src = cat("value", np.float64), cat("source", np.int32)
    fidx = (
        np.concatenate([np.full(len(c.pid), c.file, np.int32) for c in chunks])
        if chunks
        else np.zeros(0, np.int32)
    )
    seen[pid] = True
    ok = allowed[pid]
    _count(ledger, files, keys, fidx[~ok], key[~ok], "consent_excluded")
    pid, t, key, value, src, fidx = pid[ok], t[ok], key[ok], value[ok], src[ok], fidx[ok]
    dup = _duplicates(pid, t, key, value)
    _count(ledger, files, keys, fidx[dup], key[dup], "duplicates")
    keep = ~dup
    _count(ledger, files, keys, fidx[keep], key[keep], "accepted")
    pid, t, key, value, src = pid[keep], t[keep], key[keep], value[keep], src[keep]
    # sorted by patient pseudonym, time, code name
    pnames = np.array(ids.names, dtype=object)
    prank = np.empty(len(pnames), np.int64)
    prank[np.argsort(pnames, kind="stable")] = np.arange(len(pnames))
    kn = np.array(keys, dtype=object)
    krank = np.empty(nk, np.int64)
    krank[np.argsort(kn, kind="stable")] = np.arange(nk)
    order = np.lexsort((krank[key], t, prank[pid]))
    pid, t, key, value, src = pid[order], t[order], key[order], value[order], src[order]
    used_p = np.unique(pid)
    out = pd.DataFrame(
        {
            "patient_id": pd.Categorical.from_codes(
                np.searchsorted(used_p, pid), categories=pnames[used_p].astype(str)
            )
            if len(pid)
            else pd.Categorical([], categories=[]),
            "time": pd.to_datetime(t, unit="ns", utc=True),
            "code": pd.Categorical.from_codes(key.astype(np.int32), categories=keys),
            "value": value,
            "source": pd.Categorical.from_codes(src, categories=source_names or ["unknown"])
            if len(src)
            else pd.Categorical([], categories=[]),
        }
    )
    out["code"] = out["code"].cat.remove_unused_categories()
    out["source"] = out["source"].cat.remove_unused_categories()
    return out[OBSERVATION_COLUMNS]


def _duplicates(pid: np.ndarray, t: np.ndarray, key: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Exact repeats of (patient, time, code, value), the first occurrence kept.

    The rare (patient, time, code) collisions are compared with their values too.
    """
    pk = (pid.astype(np.int64) << 16) | key.astype(np.int64)
    # one 64-bit mix of (patient, code, time): hashing one column is several times faster
    # than three; a collision only makes a candidate, checked exactly below
    with np.errstate(over="ignore"):
        mix = (pk.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ t.astype(np.uint64)
    maybe = pd.Series(mix).duplicated(keep=False).to_numpy()
    dup = np.zeros(len(pid), dtype=bool)
    if maybe.any():
        at = np.flatnonzero(maybe)
        sub = pd.DataFrame({"pk": pk[at], "t": t[at], "v": value[at]})
        dup[at] = sub.duplicated(keep="first").to_numpy()
    return dup


def _count(
    ledger: _Ledger,
    files: list[tuple[str, str]],
    keys: list[str],
    fidx: np.ndarray,
    key: np.ndarray,
    what: str,
) -> None:
    if not len(fidx):
        return
    nk = len(keys)
    counts = np.bincount(fidx.astype(np.int64) * nk + key, minlength=len(files) * nk)
    for j in np.flatnonzero(counts).tolist():
        f, k = divmod(j, nk)
        ledger.add(files[f][0], files[f][1], keys[k], **{what: int(counts[j])})


def _outcomes(
    ids: _Ids, allowed: np.ndarray, seen: np.ndarray, ledger: _Ledger, parts: list[pd.DataFrame]
) -> pd.DataFrame:
    outs = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(
            {
                "source_id": pd.Series(dtype=str),
                "time": pd.Series(dtype="datetime64[ns, UTC]"),
                "event": pd.Series(dtype=str),
                "_file": pd.Series(dtype=str),
                "_format": pd.Series(dtype=str),
            }
        )
    )
    pid = ids.series(outs["source_id"])
    seen[pid] = True
    ok = allowed[pid]
    for (f, fmt), n in outs.loc[~ok].groupby(["_file", "_format"]).size().items():
        ledger.add(str(f), _ofmt(fmt), OUTCOME_KEY, consent_excluded=int(n))
    outs = outs[ok].copy()
    outs["patient_id"] = [ids.names[i] for i in pid[ok]]
    dup = outs.duplicated(["patient_id", "time", "event"], keep="first").to_numpy()
    for (f, fmt), n in outs.loc[dup].groupby(["_file", "_format"]).size().items():
        ledger.add(str(f), _ofmt(fmt), OUTCOME_KEY, duplicates=int(n))
    outs = outs[~dup]
    for (f, fmt), n in outs.groupby(["_file", "_format"]).size().items():
        ledger.add(str(f), _ofmt(fmt), OUTCOME_KEY, accepted=int(n))
    extra = [
        c
        for c in outs.columns
        if c not in ("source_id", "line", "_file", "_format", "patient_id", "time", "event")
    ]
    outs = outs[["patient_id", "time", "event", *extra]].sort_values(
        ["patient_id", "time"], kind="stable"
    )
    outs = outs.reset_index(drop=True)
    outs["time"] = pd.to_datetime(outs["time"], utc=True)
    return outs


def _ofmt(fmt: str) -> str:
    return "outcomes" if fmt == "outcomes" else fmt


def _cohort(
    ids: _Ids,
    allowed: np.ndarray,
    seen: np.ndarray,
    ledger: _Ledger,
    files: list[tuple[str, str]],
    keys: list[str],
    chunks: list[_Chunk],
    tables: dict[str, list[pd.DataFrame]],
) -> pd.DataFrame | None:
    if not tables["cohort"]:
        return None
    coh = pd.concat(tables["cohort"], ignore_index=True)
    pid = ids.series(coh["source_id"])
    seen[pid] = True
    ok = allowed[pid]
    for f, g in coh.assign(_ok=ok).groupby("_file"):
        # covariate cells follow their row's consent verdict
        ledger.add(
            str(f),
            "cohort",
            COVARIATE_KEY,
            accepted=int(g.loc[g["_ok"], "_cells"].sum()),
            consent_excluded=int(g.loc[~g["_ok"], "_cells"].sum()),
        )
    out = coh[ok].drop(columns=["_cells"]).copy()
    out["patient_id"] = [ids.names[i] for i in pid[ok]]
    if chunks:
        c_pid = np.concatenate([c.pid for c in chunks])
        c_key = np.concatenate([c.key for c in chunks])
        c_val = np.concatenate([c.value for c in chunks])
        c_line = np.concatenate([c.line for c in chunks])
        c_file = np.concatenate([np.full(len(c.pid), c.file, np.int32) for c in chunks])
        cok = allowed[c_pid]
        _count(ledger, files, keys, c_file[~cok], c_key[~cok], "consent_excluded")
        _count(ledger, files, keys, c_file[cok], c_key[cok], "accepted")
        cells_df = pd.DataFrame(
            {
                "file": [files[i][0] for i in c_file[cok]],
                "line": c_line[cok],
                "code": np.array(keys, dtype=object)[c_key[cok]],
                "value": c_val[cok],
            }
        )
        wide = cells_df.pivot_table(
            index=["file", "line"], columns="code", values="value", aggfunc="last"
        )
        out = out.merge(wide, left_on=["_file", "line"], right_index=True, how="left")
    out = out.drop(columns=["source_id", "line", "_file"])
    cols = ["patient_id", "time", *[c for c in out.columns if c not in ("patient_id", "time")]]
    return out[cols].sort_values("patient_id", kind="stable").reset_index(drop=True)


def _reason_kind(reason: str) -> str:
    r = reason.split(":")[0]
    for prefix in (
        "unparseable time",
        "unknown code",
        "unknown unit",
        "unparseable value",
        "out-of-range value",
        "invalid consent value",
        "no unit for",
        "status",
        "superseded",
        "data absent",
        "implausible time",
        "non-numeric value",
    ):
        if r.startswith(prefix):
            return prefix
    if " is in the future" in r:
        return "future time"
    return r[:60]


def build_report(
    counts: pd.DataFrame, quarantine: pd.DataFrame, cfg: IngestConfig, skipped: list[dict[str, str]]
) -> dict[str, Any]:
    """JSON-able report: totals, per file and code, quarantine reasons, unmapped, balance."""
    totals = {k: int(counts[k].sum()) for k in COUNT_KEYS}
    files: dict[str, Any] = {}
    for (f, fmt), g in counts.groupby(["file", "format"], sort=True):
        entry: dict[str, Any] = {"format": fmt, **{k: int(g[k].sum()) for k in COUNT_KEYS}}
        entry["codes"] = {
            str(r.code): {k: int(getattr(r, k)) for k in COUNT_KEYS}
            for r in g.itertuples(index=False)
        }
        files[str(f)] = entry
    bal = counts["read"] - counts[list(COUNT_KEYS[1:])].sum(axis=1)
    reasons = quarantine["reason"].map(_reason_kind).value_counts().sort_index()
    unm = (
        counts[counts["unmapped"] > 0]
        .groupby("code")["unmapped"]
        .sum()
        .sort_values(ascending=False)
    )
    return {
        "purpose": cfg.purpose,
        "totals": totals,
        "balanced": bool((bal == 0).all()),
        "files": files,
        "quarantine_reasons": {str(k): int(v) for k, v in reasons.items()},
        "unmapped": {str(k): int(v) for k, v in unm.items()},
        "consent": {
            "purpose": cfg.purpose,
            "missing_consent": cfg.missing_consent,
            "records_excluded": totals["consent_excluded"],
        },
        "skipped_files": skipped,
    }
