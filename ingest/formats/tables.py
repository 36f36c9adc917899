"""Side tables: patients (covariates, follow-up, consent per purpose), outcomes
(``patient_id,time,event``) and one-row-per-patient cohorts (``patient_id,index_time,...``).

Each reader types its table here; rows it cannot use come back as rejects with a reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from ingest.canonical import NAT_NS, Reason, parse_time_text
from ingest.config import IngestConfig
from ingest.formats.wide import column_mapping, melt
from ingest.raw import RawRead, require, table

PATIENT_KEY = "(patient)"
OUTCOME_KEY = "(outcome)"
COVARIATE_KEY = "(cohort covariate)"
TRUE_TEXT = {"true", "1", "yes", "y", "t"}
FALSE_TEXT = {"false", "0", "no", "n", "f"}
REJECT_COLUMNS = ["line", "field", "reason", "code", "source_id"]


def parse_bool(text: pd.Series) -> pd.Series:
    """True / False / NA from common spellings; anything else is NA."""
    t = text.fillna("").astype(str).str.strip().str.lower()
    out = pd.Series(pd.NA, index=t.index, dtype="boolean")
    out[t.isin(TRUE_TEXT)] = True
    out[t.isin(FALSE_TEXT)] = False
    return out


def times_of(text: pd.Series, naive: str) -> tuple[pd.Series, np.ndarray]:
    """(UTC times, reason per row) of ISO text (the canonical path's time parser)."""
    ns, why = parse_time_text(text.to_numpy(), naive)
    t = pd.to_datetime(np.where(ns == NAT_NS, np.iinfo(np.int64).min, ns), unit="ns", utc=True)
    return pd.Series(t, index=text.index).where(ns != NAT_NS), why


def _rejects(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=REJECT_COLUMNS)


class PatientsTable:
    name = "patients"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        cols = set(header or [])
        return "followup_start" in cols or any(c.startswith("consent_") for c in cols)

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        df, line_no, lines, problems, records = table(path)
        require(path, df.columns, ["patient_id"], "patients table")
        return RawRead(
            str(path),
            "patients",
            problems=problems,
            lines=lines,
            records=records,
            patients=df.assign(line=line_no),
        )


def type_patients(
    df: pd.DataFrame, file: str, cfg: IngestConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Typed patient rows (``source_id`` raw) and rejected rows of one patients table."""
    rej: list[dict] = []
    out = pd.DataFrame({"source_id": df["patient_id"].str.strip(), "line": df["line"]})
    bad = (out["source_id"] == "").to_numpy()
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
            out[c], _ = times_of(df[c], "utc")
        elif c == "age" or c.startswith("cm_"):
            num = pd.to_numeric(df[c], errors="coerce").astype(float)
            out[c] = num.fillna(0).astype(int) if c.startswith("cm_") else num
        else:
            out[c] = df[c].str.strip()
    purpose_col = f"consent_{cfg.purpose}"
    if purpose_col in out:
        inval = (out[purpose_col].isna() & ~bad & (df[purpose_col].str.strip() != "")).to_numpy()
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
    return out[~bad].reset_index(drop=True), _rejects(rej)


class OutcomesTable:
    name = "outcomes"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        cols = set(header or [])
        return "event" in cols and "time" in cols

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        df, line_no, lines, problems, records = table(path)
        require(path, df.columns, ["patient_id", "time", "event"], "outcomes table")
        return RawRead(
            str(path),
            "outcomes",
            problems=problems,
            lines=lines,
            records=records,
            outcomes=df.assign(line=line_no),
        )


def type_outcomes(df: pd.DataFrame, cfg: IngestConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Typed outcome rows (``source_id`` raw, ``time`` UTC) and rejected rows."""
    sid = df["patient_id"].astype(str).str.strip()
    ev = df["event"].astype(str).str.strip()
    t, why = times_of(df["time"].astype(str), cfg.naive_time)
    checks = [
        ((sid == "").to_numpy(), "patient_id", "missing field: patient_id"),
        ((ev == "").to_numpy(), "event", "missing field: event"),
        (why == Reason.MISSING_TIME, "time", "missing field: time"),
        (why == Reason.UNPARSEABLE_TIME, "time", "unparseable time: expected ISO 8601"),
        (
            why == Reason.NAIVE_TIME,
            "time",
            "naive time without UTC offset (ingest.naive_time: reject)",
        ),
    ]
    bad = np.zeros(len(df), dtype=bool)
    rej: list[dict] = []
    for mask, fld, reason in checks:
        new = mask & ~bad
        for ln, s in zip(df.loc[new, "line"], sid[new], strict=True):
            rej.append(
                {
                    "line": int(ln),
                    "field": fld,
                    "reason": reason,
                    "code": OUTCOME_KEY,
                    "source_id": s,
                }
            )
        bad |= mask
    out = pd.DataFrame({"source_id": sid, "time": t, "event": ev, "line": df["line"]})
    for c in df.columns:
        if c not in ("patient_id", "time", "event", "line"):
            out[c] = df[c]
    return out[~bad].reset_index(drop=True), _rejects(rej)


class CohortTable:
    name = "cohort"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        return "index_time" in set(header or [])

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        """Vocabulary columns become candidates at ``index_time`` (the same path as every
        observation); the rest stays in the cohort table, typed by :func:`type_cohort`."""
        df, line_no, lines, problems, records = table(path)
        require(path, df.columns, ["patient_id", "index_time"], "one-row-per-patient cohort table")
        df = df.assign(line=line_no)
        mapping, _ = column_mapping(
            [c for c in df.columns if c not in ("index_time", "line")], cfg.wide_columns, vocab, ()
        )
        rr = melt(str(path), "cohort", df, line_no, mapping, "index_time", cfg, "cohort")
        rr.problems, rr.lines, rr.records = problems, lines, records
        rr.cohort = df.drop(columns=[c for c in mapping if c in df.columns])
        return rr


#: outcome columns of a cohort, typed apart from the covariates
COHORT_OUTCOME = ("event", "event_observed", "time_to_event_h", "time_to_event_days")


def type_cohort(
    df: pd.DataFrame, cfg: IngestConfig
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """(typed cohort rows, rejected covariate cells, covariate cells read) of one cohort table.

    ``time`` = ``index_time``; ``time_to_event_days`` (from ``_h`` / 24 when given in hours);
    ``event`` 0/1 (``event_observed``, else a 0/1 ``event`` column); ``event_type`` the event
    text. Other columns: declared categorical (``ingest.cohort_categorical``) stay text; the
    rest must be numbers, and a cell that is not is refused naming the column.
    """
    t, why = times_of(df["index_time"].astype(str), cfg.naive_time)
    keep = (df["patient_id"].astype(str).str.strip() != "").to_numpy() & (why == 0)
    d = df.loc[keep].reset_index(drop=True)
    out = pd.DataFrame(
        {
            "source_id": d["patient_id"].str.strip(),
            "time": t[keep].reset_index(drop=True),
            "line": d["line"].to_numpy(),
        }
    )
    if "time_to_event_days" in d:
        out["time_to_event_days"] = pd.to_numeric(d["time_to_event_days"], errors="coerce")
    elif "time_to_event_h" in d:
        out["time_to_event_days"] = pd.to_numeric(d["time_to_event_h"], errors="coerce") / 24.0
    ev_text = d["event"].str.strip() if "event" in d else pd.Series("", index=d.index)
    ev_num = pd.to_numeric(ev_text, errors="coerce")
    if "event_observed" in d:
        out["event"] = pd.to_numeric(d["event_observed"], errors="coerce").fillna(0).astype(int)
        out["event_type"] = ev_text.where(ev_num.isna(), "")
    elif ev_num.notna().any():
        out["event"] = ev_num.fillna(0).astype(int)
    rej: list[dict] = []
    counts = {"read": int((~keep).sum()), "accepted": 0, "quarantined": int((~keep).sum())}
    for ln, sid, w in zip(
        df.loc[~keep, "line"], df.loc[~keep, "patient_id"], why[~keep], strict=True
    ):
        fld = "patient_id" if not str(sid).strip() else "index_time"
        reason = (
            "missing field: patient_id"
            if fld == "patient_id"
            else (f"unusable index_time ({Reason(int(w)).name.lower().replace('_', ' ')})")
        )
        rej.append(
            {
                "line": int(ln),
                "field": fld,
                "reason": reason,
                "code": COVARIATE_KEY,
                "source_id": str(sid).strip(),
            }
        )
    good_cells = np.zeros(len(d), dtype=np.int64)
    for c in d.columns:
        if c in ("patient_id", "index_time", "line", *COHORT_OUTCOME):
            continue
        text = d[c].astype(str).str.strip()
        present = (text != "").to_numpy()
        counts["read"] += int(present.sum())
        if c in cfg.cohort_categorical:
            out[c] = text.where(present, None)
            counts["accepted"] += int(present.sum())
            good_cells += present
            continue
        num = pd.to_numeric(text.where(present, None), errors="coerce")
        bad = present & num.isna().to_numpy()
        out[c] = num.astype(float)
        if c.startswith("cm_"):
            out[c] = out[c].fillna(0).astype(int)
        counts["accepted"] += int((present & ~bad).sum())
        good_cells += present & ~bad
        counts["quarantined"] += int(bad.sum())
        for ln, sid, v in zip(
            d.loc[bad, "line"], out.loc[bad, "source_id"], text[bad], strict=True
        ):
            rej.append(
                {
                    "line": int(ln),
                    "field": c,
                    "reason": f"non-numeric value {v!r} in cohort column {c!r}: expected a "
                    "number, or list the column in ingest.cohort_categorical",
                    "code": COVARIATE_KEY,
                    "source_id": sid,
                }
            )
    out["_cells"] = good_cells
    return out, _rejects(rej), counts
