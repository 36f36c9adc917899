"""What every format reader shares: the ``RawRead`` it returns, record-level problems, and
text/table helpers (UTF-8 per line, delimited files with their line numbers, Parquet as text).

A reader turns a file into *candidates* (``ingest.canonical.Candidates``: raw codes, values,
units and times, one per measurement) plus side tables (patients, outcomes, cohort) and the
count of values it could not map. Judging candidates happens once, in ``ingest.canonical``.
Structural problems (unreadable file, required column absent) raise ``StructuralError`` with
one message naming the file and what was expected.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ingest.canonical import Candidates, Reason, _index, from_text

logger = logging.getLogger(__name__)


class StructuralError(ValueError):
    """A file cannot be read at all as the format it claims; the message names the file."""


@dataclass
class Problem:
    """A record that yields no candidate (broken JSON line, wrong field count, encoding)."""

    line: int
    field: str
    reason: str
    record: str
    code: str = ""
    source_id: str = ""  # when known (a PSV file's stem): scrubbed from the record text


@dataclass
class RawRead:
    """What one reader found in one file (or PSV directory)."""

    file: str
    format: str
    cand: Candidates | None = None
    pid: np.ndarray | None = None  # int32 per candidate into pid_names ("" = missing)
    pid_names: list[str] = field(default_factory=list)
    source: np.ndarray | None = None  # int32 per candidate into source_names
    source_names: list[str] = field(default_factory=list)
    line: np.ndarray | None = None  # int64 per candidate
    problems: list[Problem] = field(default_factory=list)
    #: raw lines, to show a quarantined record as it was (1-based: lines[line - 1])
    lines: list[str] | None = None
    records: Mapping[int, str] = field(default_factory=dict)
    #: an authoritative patients table (consent lives here), or patient rows a data file
    #: carries (PSV demographics, FHIR Patient, HL7 PID): these only fill in gaps
    patients: pd.DataFrame | None = None
    derived_patients: pd.DataFrame | None = None
    outcomes: pd.DataFrame | None = None
    cohort: pd.DataFrame | None = None
    #: non-empty values of columns (or codes) the configuration does not map: name -> count
    unmapped: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return 0 if self.cand is None else len(self.cand)

    def record_text(self, line: int) -> str:
        try:
            return self.records[line]
        except KeyError:
            pass
        if self.lines is not None and 0 < line <= len(self.lines):
            return self.lines[line - 1]
        return ""


def text_read(
    file: str,
    fmt: str,
    source_id: Sequence[Any] | np.ndarray,
    time: Sequence[Any] | np.ndarray,
    code: Sequence[Any] | np.ndarray,
    value: Sequence[Any] | np.ndarray,
    unit: Sequence[Any] | np.ndarray | str,
    source: Sequence[Any] | np.ndarray | str,
    line: Sequence[int] | np.ndarray,
    naive: str,
    default_source: str,
    column: Sequence[Any] | np.ndarray | None = None,
    pre: np.ndarray | None = None,
    detail: dict[int, str] | None = None,
) -> RawRead:
    """A RawRead of text columns as found in a file (a missing patient id is a pre-reason)."""
    pid, pid_names = _index(source_id)
    p = np.zeros(len(pid), dtype=np.uint8) if pre is None else pre.astype(np.uint8, copy=True)
    if "" in pid_names:
        p[(pid == pid_names.index("")) & (p == 0)] = Reason.MISSING_PATIENT
    cand = from_text(code, value, unit, time, naive, pre=p, column=column)
    if detail:
        cand.detail.update(detail)
    if isinstance(source, str):
        src, src_names = np.zeros(len(pid), dtype=np.int32), [source.strip() or default_source]
    else:
        src, src_names = _index(source)
        src_names = [s or default_source for s in src_names]
    return RawRead(
        file,
        fmt,
        cand=cand,
        pid=pid,
        pid_names=pid_names,
        source=src,
        source_names=src_names,
        line=np.asarray(line, dtype=np.int64),
    )


class RowText(Mapping[int, str]):
    """Row n (1-based) of a table as comma-joined text, built only when asked for."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df

    def __getitem__(self, line: int) -> str:
        if not 0 < line <= len(self.df):
            raise KeyError(line)
        return ",".join(map(str, self.df.iloc[line - 1].tolist()))

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, len(self.df) + 1))

    def __len__(self) -> int:
        return len(self.df)


def read_lines(path: Path) -> tuple[list[str], list[Problem]]:
    """Decode a text file line by line; undecodable lines become problems, not failures."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        lines = data.decode("utf-8").split("\n")
        problems: list[Problem] = []
    except UnicodeDecodeError:
        lines, problems = [], []
        for i, raw in enumerate(data.split(b"\n"), start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                shown = raw.decode("utf-8", errors="replace")
                problems.append(
                    Problem(i, "encoding", "wrong encoding: line is not valid UTF-8", shown)
                )
                lines.append("")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if lines and lines[-1] == "":
        lines.pop()
    return lines, problems


def csv_table(
    path: Path, sep: str = ","
) -> tuple[pd.DataFrame, np.ndarray, list[str], list[Problem]]:
    """Parse a delimited file into strings, keeping each row's 1-based line number."""
    lines, problems = read_lines(path)
    if problems and problems[0].line == 1:
        raise StructuralError(f"{path}: header line is not valid UTF-8 (expected UTF-8 text)")
    if not lines or not lines[0].strip():
        raise StructuralError(f"{path}: empty file (expected a header line)")
    header = lines[0]
    n_fields = header.count(sep) + 1
    bad_lines = {p.line for p in problems}
    keep_no: list[int] = []
    keep: list[str] = [header]
    for i, ln in enumerate(lines[1:], start=2):
        if i in bad_lines or not ln.strip():
            continue
        if '"' not in ln and ln.count(sep) + 1 > n_fields:
            why = f"wrong number of fields: expected {n_fields}, got {ln.count(sep) + 1}"
            problems.append(Problem(i, "line", why, ln))
            continue
        keep_no.append(i)
        keep.append(ln)
    try:
        df = pd.read_csv(
            io.StringIO("\n".join(keep)),
            sep=sep,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise StructuralError(f"{path}: not a readable delimited file: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == len(keep_no):
        line_no = np.asarray(keep_no, dtype=np.int64)
    else:  # quoted newlines: fall back to row order
        logger.warning("%s: quoted multi-line fields; line numbers are approximate", path)
        line_no = np.arange(2, len(df) + 2, dtype=np.int64)
    return df, line_no, lines, problems


def require(path: Path, columns: Iterable[str], required: Iterable[str], what: str) -> None:
    cols = set(columns)
    req = list(required)
    missing = [c for c in req if c not in cols]
    if missing:
        raise StructuralError(
            f"{path}: required column(s) {missing} absent (a {what} needs {req}; found {sorted(cols)})"
        )


def table_from_parquet(path: Path) -> pd.DataFrame:
    """A Parquet table as stripped text (times as ISO), like a CSV read with dtype=str."""
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise StructuralError(f"{path}: not a readable Parquet file ({exc})") from None
    out = pd.DataFrame(index=df.index)
    for c in df.columns:
        s = df[c]
        if isinstance(s.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(s):
            out[str(c)] = s.map(lambda t: "" if pd.isna(t) else t.isoformat())
        else:
            out[str(c)] = s.map(
                lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
            )
    return out.reset_index(drop=True)


def table(
    path: Path,
) -> tuple[pd.DataFrame, np.ndarray, list[str] | None, list[Problem], Mapping[int, str]]:
    """Any table (CSV/TSV/TXT or Parquet) as text with line numbers and record text."""
    if path.suffix.lower() == ".parquet":
        df = table_from_parquet(path)
        return df, np.arange(1, len(df) + 1), None, [], RowText(df)
    df, line_no, lines, problems = csv_table(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    return df, line_no, lines, problems, {}


def header_columns(path: Path) -> list[str]:
    """Column names of a table file (first line of a delimited file, or a Parquet schema)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:
            raise StructuralError(f"{path}: not a readable Parquet file ({exc})") from None
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("rb") as fh:
        raw = fh.readline()
    if not raw.strip():
        raise StructuralError(f"{path}: empty file (expected a header line)")
    try:
        first = raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        raise StructuralError(
            f"{path}: header line is not valid UTF-8 (expected UTF-8 text)"
        ) from None
    return [c.strip() for c in first.split(sep)]
