"""Readers for raw observation files: long CSV/Parquet, wide CSV, FHIR R4, PhysioNet PSV, tables.

Each reader turns one source into *raw candidates* (strings as found, one row per
measurement, with file and line) plus the record-level problems it met while reading (broken
JSON, wrong encoding, too many fields). Interpretation (codes, units, times, ranges) happens
once, vectorised, in ``ingest.cleaning`` so every format is judged by the same rules.

Structural problems (missing file, required column absent, unknown format) raise
``StructuralError`` with one message naming the file and what was expected.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from ingest.config import IngestConfig

logger = logging.getLogger(__name__)

#: columns of a raw candidate frame (all text except ``line``)
RAW_COLUMNS = ["source_id", "time", "code", "value", "unit", "source", "line"]
LONG_REQUIRED = ["patient_id", "time", "code", "value"]
CSV_SUFFIXES = {".csv", ".tsv", ".txt"}


class StructuralError(ValueError):
    """A file cannot be read at all as the format it claims; the message names the file."""


@dataclass
class Problem:
    line: int
    field: str
    reason: str
    record: str
    code: str = ""


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


@dataclass
class RawRead:
    """What one reader found in one file (or PSV directory)."""

    file: str
    format: str
    observations: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RAW_COLUMNS))
    problems: list[Problem] = field(default_factory=list)
    #: raw lines, to show a quarantined record as it was (1-based: lines[line - 1])
    lines: list[str] | None = None
    patients: pd.DataFrame | None = None
    outcomes: pd.DataFrame | None = None
    cohort: pd.DataFrame | None = None
    #: extra per-record raw text for non line-based sources (line -> text)
    records: Mapping[int, str] = field(default_factory=dict)

    def record_text(self, line: int) -> str:
        if line in self.records:
            return self.records[line]
        if self.lines is not None and 0 < line <= len(self.lines):
            return self.lines[line - 1]
        return ""


# -- text helpers ---------------------------------------------------------------------------


def _read_lines(path: Path) -> tuple[list[str], list[Problem]]:
    """Decode a text file line by line; undecodable lines become problems, not failures."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
        lines = text.split("\n")
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


def _csv_table(
    path: Path, sep: str = ","
) -> tuple[pd.DataFrame, np.ndarray, list[str], list[Problem]]:
    """Parse a delimited file into strings, keeping each row's 1-based line number."""
    lines, problems = _read_lines(path)
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
            problems.append(
                Problem(
                    i,
                    "line",
                    f"wrong number of fields: expected {n_fields}, got {ln.count(sep) + 1}",
                    ln,
                )
            )
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


def _require(path: Path, columns: Iterable[str], required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in set(columns)]
    if missing:
        raise StructuralError(
            f"{path}: required column(s) {missing} absent (a {what} needs {list(required)}; found {list(columns)})"
        )


def _raw_frame(**cols: Any) -> pd.DataFrame:
    df = pd.DataFrame(cols)
    for c in RAW_COLUMNS:
        if c not in df:
            df[c] = ""
    return df[RAW_COLUMNS]


# -- format detection -------------------------------------------------------------------------


def header_columns(path: Path, sep: str = ",") -> list[str]:
    with path.open("rb") as fh:
        raw = fh.readline()
    try:
        first = raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        raise StructuralError(
            f"{path}: header line is not valid UTF-8 (expected UTF-8 text)"
        ) from None
    return [c.strip() for c in first.split(sep)]


def classify_table(columns: list[str], cfg: IngestConfig, vocab: Vocabulary) -> str | None:
    cols = set(columns)
    if {"code", "value"} <= cols or ({"code", "value"} & cols and "time" in cols):
        return "long"  # a long table missing one of code/value gets a required-column error
    if {"patient_file", "anchor_time"} <= cols:
        return "psv_anchors"
    if "index_time" in cols:
        return "cohort"
    if "followup_start" in cols or any(c.startswith("consent_") for c in cols):
        return "patients"
    if "event" in cols and "time" in cols:
        return "outcomes"
    if "time" in cols and any(c in cfg.wide_columns or vocab.resolve_code(c) for c in cols):
        return "wide"
    return None


EXPECTED_FORMATS = (
    "long CSV/Parquet (patient_id,time,code,value[,unit,source]), wide CSV (patient_id,time + "
    "mapped columns), patients CSV (patient_id, consent_*), outcomes CSV (patient_id,time,event), "
    "cohort CSV (patient_id,index_time,...), FHIR .ndjson/.json, PhysioNet .psv"
)


def detect_format(path: Path, cfg: IngestConfig, vocab: Vocabulary) -> str:
    """Format name for one file, from its extension and (for tables) its header."""
    suffix = path.suffix.lower()
    if suffix in (".ndjson", ".jsonl"):
        return "fhir_ndjson"
    if suffix == ".json":
        return "fhir_json"
    if suffix == ".psv":
        return "psv"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        cols = pq.read_schema(path).names
        kind = classify_table(cols, cfg, vocab)
        if kind is None:
            raise StructuralError(f"{path}: unknown format; expected one of: {EXPECTED_FORMATS}")
        return f"{kind}_parquet"
    if suffix in CSV_SUFFIXES:
        if path.stat().st_size == 0:
            raise StructuralError(f"{path}: empty file (expected a header line)")
        kind = classify_table(header_columns(path, "\t" if suffix == ".tsv" else ","), cfg, vocab)
        if kind is None:
            raise StructuralError(
                f"{path}: unknown format (header not recognised); expected one of: {EXPECTED_FORMATS}"
            )
        return f"{kind}_csv"
    raise StructuralError(
        f"{path}: unknown format {suffix or '(no extension)'!r}; expected one of: {EXPECTED_FORMATS}"
    )


def expand_inputs(
    inputs: Iterable[str | Path], cfg: IngestConfig, vocab: Vocabulary
) -> tuple[list[tuple[Path, str]], list[str]]:
    """(path, format) units to read, in a stable order, plus skipped files of directories.

    A directory stands for every recognised file inside it (recursively); a directory holding
    ``.psv`` files is one PSV source. Explicitly named files must be recognised.
    """
    units: list[tuple[Path, str]] = []
    skipped: list[str] = []

    def walk(d: Path) -> Iterator[tuple[Path, str]]:
        entries = sorted(d.iterdir())
        if any(e.suffix.lower() == ".psv" for e in entries if e.is_file()):
            yield d, "psv_dir"
        for e in entries:
            if e.is_dir():
                yield from walk(e)
            elif e.suffix.lower() == ".psv" or e.name.startswith("."):
                continue
            else:
                try:
                    fmt = detect_format(e, cfg, vocab)
                except StructuralError:
                    skipped.append(str(e))
                    continue
                if fmt == "psv_anchors_csv":
                    continue
                yield e, fmt

    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise StructuralError(
                f"{p}: file or directory not found (expected an input file or directory)"
            )
        if p.is_dir():
            units.extend(walk(p))
        else:
            units.append((p, detect_format(p, cfg, vocab)))
    return units, skipped


# -- readers -----------------------------------------------------------------------------------


def read_long_csv(path: Path, cfg: IngestConfig, sep: str = ",") -> RawRead:
    df, line_no, lines, problems = _csv_table(path, sep)
    _require(path, df.columns, LONG_REQUIRED, "long observation table")
    src = df["source"] if "source" in df else cfg.default_source.get("long_csv", "unknown")
    obs = _raw_frame(
        source_id=df["patient_id"].to_numpy(),
        time=df["time"].to_numpy(),
        code=df["code"].to_numpy(),
        value=df["value"].to_numpy(),
        unit=df["unit"].to_numpy() if "unit" in df else "",
        source=src.to_numpy() if isinstance(src, pd.Series) else src,
        line=line_no,
    )
    return RawRead(str(path), "long_csv", obs, problems, lines)


def _table_from_parquet(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path)
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


def read_long_parquet(path: Path, cfg: IngestConfig) -> RawRead:
    df = _table_from_parquet(path)
    _require(path, df.columns, LONG_REQUIRED, "long observation table")
    obs = _raw_frame(
        source_id=df["patient_id"].to_numpy(),
        time=df["time"].to_numpy(),
        code=df["code"].to_numpy(),
        value=df["value"].to_numpy(),
        unit=df["unit"].to_numpy() if "unit" in df else "",
        source=df["source"].to_numpy()
        if "source" in df
        else cfg.default_source.get("long_parquet", "unknown"),
        line=np.arange(1, len(df) + 1),  # row number (1-based)
    )
    cols = [c for c in ["patient_id", "time", "code", "value", "unit", "source"] if c in df]
    records = RowText(df[cols])
    return RawRead(str(path), "long_parquet", obs, [], None, records=records)


def wide_mapping(
    columns: Iterable[str], cfg: IngestConfig, vocab: Vocabulary
) -> dict[str, tuple[str, str]]:
    """Column -> (code, unit) for the value columns of a wide table."""
    out: dict[str, tuple[str, str]] = {}
    for c in columns:
        if c in cfg.wide_columns:
            m = cfg.wide_columns[c]
            out[c] = (m.code, m.unit or "")
        elif c not in ("patient_id", "time", "source") and vocab.resolve_code(c):
            out[c] = (c, "")
    return out


def read_wide_csv(path: Path, cfg: IngestConfig, vocab: Vocabulary, sep: str = ",") -> RawRead:
    if path.suffix.lower() == ".parquet":
        df = _table_from_parquet(path)
        line_no = np.arange(1, len(df) + 1)
        lines: list[str] | None = None
        problems: list[Problem] = []
    else:
        df, line_no, lines, problems = _csv_table(path, sep)
    _require(path, df.columns, ["patient_id", "time"], "wide observation table")
    mapping = wide_mapping(df.columns, cfg, vocab)
    if not mapping:
        raise StructuralError(
            f"{path}: no observation columns (expected columns named in ingest.wide_columns or vocabulary keys)"
        )
    parts = []
    src = (
        df["source"].to_numpy()
        if "source" in df
        else np.full(len(df), cfg.default_source.get("wide_csv", "wearable"), dtype=object)
    )
    for col, (code, unit) in mapping.items():
        vals = df[col].to_numpy()
        m = df[col].str.strip().ne("").to_numpy()
        if not m.any():
            continue
        parts.append(
            _raw_frame(
                source_id=df["patient_id"].to_numpy()[m],
                time=df["time"].to_numpy()[m],
                code=code,
                value=vals[m],
                unit=unit,
                source=src[m],
                line=line_no[m],
            )
        )
    obs = pd.concat(parts, ignore_index=True) if parts else _raw_frame()
    obs = obs.sort_values("line", kind="stable").reset_index(drop=True)
    records: Mapping[int, str] = RowText(df) if lines is None else {}
    return RawRead(str(path), "wide_csv", obs, problems, lines, records=records)


# -- FHIR -------------------------------------------------------------------------------------


def _fhir_validator(kind: str) -> Any:
    if kind == "Observation":
        from fhir.resources.R4B.observation import Observation

        return Observation
    if kind == "Patient":
        from fhir.resources.R4B.patient import Patient

        return Patient
    return None


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            e = errors()[0]
            return f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}"
        except Exception:  # pragma: no cover - defensive
            pass
    return str(exc).splitlines()[0][:200]


def _codings(concept: Any) -> list[str]:
    if not isinstance(concept, dict):
        return []
    return [
        str(c.get("code", ""))
        for c in concept.get("coding", []) or []
        if isinstance(c, dict) and c.get("code")
    ]


def _value_of(res: dict) -> tuple[Any, str] | None:
    if "valueQuantity" in res and isinstance(res["valueQuantity"], dict):
        q = res["valueQuantity"]
        return q.get("value", ""), str(q.get("code") or q.get("unit") or "")
    if "valueCodeableConcept" in res and isinstance(res["valueCodeableConcept"], dict):
        cc = res["valueCodeableConcept"]
        codes = _codings(cc)
        return (codes[0] if codes else cc.get("text", "")), ""
    for k in ("valueInteger", "valueDecimal", "valueString"):
        if k in res:
            return res[k], ""
    if "valueBoolean" in res:
        return ("true" if res["valueBoolean"] else "false"), ""
    return None


def _resolve_codes(codes: list[str], vocab: Vocabulary) -> str:
    for c in codes:
        if c in vocab.panels or vocab.resolve_code(c):
            return c
    return codes[0] if codes else ""


def fhir_resource_rows(
    res: Any, line: int, vocab: Vocabulary, cfg: IngestConfig, validate: bool
) -> tuple[list[dict], list[Problem], dict | None]:
    """Raw candidate rows, problems and a patient row (for Patient resources) of one resource."""
    text = ""  # the caller shows the raw line / entry (RawRead.record_text)
    if not isinstance(res, dict) or "resourceType" not in res:
        return (
            [],
            [Problem(line, "resourceType", "not a FHIR resource (no resourceType)", text)],
            None,
        )
    kind = res["resourceType"]
    if kind not in ("Observation", "Patient"):
        return (
            [],
            [
                Problem(
                    line,
                    "resourceType",
                    f"unsupported resourceType {kind!r} (expected Observation or Patient)",
                    text,
                )
            ],
            None,
        )
    if validate:
        model = _fhir_validator(kind)
        try:
            model.model_validate(res)
        except Exception as exc:
            return (
                [],
                [Problem(line, "resource", f"invalid FHIR R4 {kind}: {_first_error(exc)}", text)],
                None,
            )
    if kind == "Patient":
        pid = res.get("id") or next(
            (i.get("value") for i in res.get("identifier", []) if isinstance(i, dict)), ""
        )
        if not pid:
            return [], [Problem(line, "id", "missing field: Patient.id", text)], None
        sex = {"female": "F", "male": "M"}.get(str(res.get("gender", "")).lower(), "")
        return (
            [],
            [],
            {"patient_id": str(pid), "sex": sex, "birth_date": str(res.get("birthDate", ""))},
        )
    subject = res.get("subject")
    ref = str(subject.get("reference", "")) if isinstance(subject, dict) else ""
    sid = ref.rsplit("/", 1)[-1] if ref else ""
    period = res.get("effectivePeriod")
    time = (
        res.get("effectiveDateTime")
        or res.get("effectiveInstant")
        or (period.get("start") if isinstance(period, dict) else None)
        or res.get("issued")
        or ""
    )
    src = cfg.default_source.get("fhir", "ward")
    cats = [c for cat in res.get("category", []) or [] for c in _codings(cat)]
    if "laboratory" in cats:
        src = "lab"
    base = {"source_id": sid, "time": str(time), "source": src, "line": line}
    code = _resolve_codes(_codings(res.get("code")), vocab)
    rows: list[dict] = []
    if code in vocab.panels:
        comps = res.get("component")
        if not isinstance(comps, list) or not comps:
            why = f"missing field: component (panel {code} without components)"
            return [], [Problem(line, "component", why, text, code)], None
        for comp in comps:
            ccode = (
                _resolve_codes(_codings(comp.get("code")), vocab) if isinstance(comp, dict) else ""
            )
            val = _value_of(comp) if isinstance(comp, dict) else None
            v, u = val if val is not None else ("", "")
            rows.append({**base, "code": ccode, "value": v, "unit": u})
        return rows, [], None
    val = _value_of(res)
    v, u = val if val is not None else ("", "")
    rows.append({**base, "code": code, "value": v, "unit": u})
    return rows, [], None


def _fhir_read(
    path: Path,
    fmt: str,
    resources: list[tuple[int, object]],
    problems: list[Problem],
    lines: list[str] | None,
    cfg: IngestConfig,
    vocab: Vocabulary,
    records: dict[int, str] | None = None,
) -> RawRead:
    """Rows, problems and Patient rows of numbered FHIR resources (ndjson line or Bundle entry)."""
    rows: list[dict] = []
    patients: list[dict] = []
    for i, res in resources:
        r, p, pat = fhir_resource_rows(res, i, vocab, cfg, cfg.fhir_validate)
        rows.extend(r)
        problems.extend(p)
        if pat:
            pat["line"] = i
            patients.append(pat)
    obs = _raw_frame(**{c: [r[c] for r in rows] for c in RAW_COLUMNS}) if rows else _raw_frame()
    return RawRead(
        str(path),
        fmt,
        obs,
        problems,
        lines,
        patients=pd.DataFrame(patients) if patients else None,
        records=records if records is not None else {},
    )


def read_fhir_ndjson(path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
    lines, problems = _read_lines(path)
    bad = {p.line for p in problems}
    resources: list[tuple[int, object]] = []
    for i, ln in enumerate(lines, start=1):
        if i in bad or not ln.strip():
            continue
        try:
            resources.append((i, json.loads(ln)))
        except json.JSONDecodeError as exc:
            problems.append(
                Problem(i, "json", f"broken JSON line: {exc.msg} at column {exc.colno}", ln)
            )
    return _fhir_read(path, "fhir_ndjson", resources, problems, lines, cfg, vocab)


def read_fhir_json(path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
    """A Bundle (entries' resources) or a single resource; records are numbered by entry."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise StructuralError(f"{path}: not UTF-8 (expected a FHIR JSON Bundle)") from None
    except json.JSONDecodeError as exc:
        raise StructuralError(
            f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); expected a FHIR Bundle"
        ) from None
    if not isinstance(doc, dict) or "resourceType" not in doc:
        raise StructuralError(f"{path}: expected a FHIR Bundle or resource with resourceType")
    if doc["resourceType"] == "Bundle":
        entries = doc.get("entry") or []
        resources = [e.get("resource") if isinstance(e, dict) else e for e in entries]
    else:
        resources = [doc]
    numbered = list(enumerate(resources, start=1))
    records = {i: json.dumps(res, separators=(",", ":"))[:2000] for i, res in numbered}
    return _fhir_read(path, "fhir_json", numbered, [], None, cfg, vocab, records)


# -- PhysioNet PSV ---------------------------------------------------------------------------------


def _psv_anchors(d: Path) -> dict[str, str]:
    f = d / "anchors.csv"
    if not f.is_file():
        return {}
    df = pd.read_csv(f, dtype=str, keep_default_na=False)
    _require(f, df.columns, ["patient_file", "anchor_time"], "PSV anchors table")
    return dict(zip(df["patient_file"].str.strip(), df["anchor_time"].str.strip(), strict=True))


def read_psv(path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
    """A PhysioNet-2019-style directory (or one .psv file): one file per patient, hourly rows.

    Row time = anchor + ICULOS hours, with the anchor from ``anchors.csv`` beside the files
    (``patient_file,anchor_time``) or ``ingest.psv_anchor``. The patient id is the file stem.
    """
    files = sorted(path.glob("*.psv")) if path.is_dir() else [path]
    d = path if path.is_dir() else path.parent
    anchors = _psv_anchors(d)
    mapping = {c: (m.code, m.unit or "") for c, m in cfg.psv_columns.items()}
    if not mapping:
        raise StructuralError(
            f"{path}: ingest.psv_columns is empty (expected PSV column -> code/unit mapping)"
        )
    parts: list[pd.DataFrame] = []
    problems: list[Problem] = []
    records: dict[int, str] = {}
    offset = 0
    src = cfg.default_source.get("psv", "ward")
    for f in files:
        stem = f.stem
        anchor = anchors.get(stem) or cfg.psv_anchor
        if not anchor:
            raise StructuralError(
                f"{f}: no time anchor (expected {d / 'anchors.csv'} with patient_file,anchor_time or ingest.psv_anchor)"
            )
        a = pd.to_datetime(anchor, utc=True, errors="coerce", format="ISO8601")
        if pd.isna(a):
            raise StructuralError(
                f"{d / 'anchors.csv'}: anchor_time {anchor!r} for {stem} is not an ISO time"
            )
        df, line_no, lines, probs = _csv_table(f, "|")
        _require(f, df.columns, ["ICULOS"], "PhysioNet PSV file")
        for p in probs:
            records[offset + p.line] = f"{f.name}:{p.line}: {p.record}"
            problems.append(
                Problem(offset + p.line, p.field, p.reason, f"{f.name}:{p.line}: {p.record}")
            )
        hours = pd.to_numeric(df["ICULOS"], errors="coerce")
        times = (
            (a + pd.to_timedelta(hours, unit="h"))
            .map(lambda t: "" if pd.isna(t) else t.isoformat())
            .to_numpy()
        )
        bad_h = hours.isna().to_numpy()
        for i in np.flatnonzero(bad_h):
            times[i] = f"ICULOS={df['ICULOS'].iat[i]!r}"
        for ln_i, ln in enumerate(lines, start=1):
            records[offset + ln_i] = f"{f.name}:{ln_i}: {ln}"
        for col, (code, unit) in mapping.items():
            if col not in df:
                continue
            vals = df[col].to_numpy().astype(str)
            m = ~df[col].str.strip().isin(["", "NaN", "nan"]).to_numpy()
            if not m.any():
                continue
            parts.append(
                _raw_frame(
                    source_id=stem,
                    time=times[m],
                    code=code,
                    value=vals[m],
                    unit=unit,
                    source=src,
                    line=line_no[m] + offset,
                )
            )
        offset += len(lines) + 1
    obs = (
        pd.concat(parts, ignore_index=True)
        .sort_values("line", kind="stable")
        .reset_index(drop=True)
        if parts
        else _raw_frame()
    )
    return RawRead(str(path), "psv", obs, problems, None, records=records)


# -- tables -----------------------------------------------------------------------------------


def _table(
    path: Path, fmt: str
) -> tuple[pd.DataFrame, np.ndarray, list[str] | None, list[Problem], Mapping[int, str]]:
    if fmt.endswith("_parquet"):
        df = _table_from_parquet(path)
        return df, np.arange(1, len(df) + 1), None, [], RowText(df)
    df, line_no, lines, problems = _csv_table(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    return df, line_no, lines, problems, {}


def read_patients(path: Path, fmt: str) -> RawRead:
    df, line_no, lines, problems, records = _table(path, fmt)
    _require(path, df.columns, ["patient_id"], "patients table")
    df = df.assign(line=line_no)
    return RawRead(
        str(path), "patients", problems=problems, lines=lines, patients=df, records=records
    )


def read_outcomes(path: Path, fmt: str) -> RawRead:
    df, line_no, lines, problems, records = _table(path, fmt)
    _require(path, df.columns, ["patient_id", "time", "event"], "outcomes table")
    return RawRead(
        str(path),
        "outcomes",
        problems=problems,
        lines=lines,
        outcomes=df.assign(line=line_no),
        records=records,
    )


def read_cohort(path: Path, fmt: str) -> RawRead:
    df, line_no, lines, problems, records = _table(path, fmt)
    _require(path, df.columns, ["patient_id", "index_time"], "one-row-per-patient cohort table")
    return RawRead(
        str(path),
        "cohort",
        problems=problems,
        lines=lines,
        cohort=df.assign(line=line_no),
        records=records,
    )


def read_unit(path: Path, fmt: str, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
    """Dispatch one (path, format) unit from ``expand_inputs`` to its reader."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    if fmt == "long_csv":
        return read_long_csv(path, cfg, sep)
    if fmt == "long_parquet":
        return read_long_parquet(path, cfg)
    if fmt in ("wide_csv", "wide_parquet"):
        return read_wide_csv(path, cfg, vocab, sep)
    if fmt == "fhir_ndjson":
        return read_fhir_ndjson(path, cfg, vocab)
    if fmt == "fhir_json":
        return read_fhir_json(path, cfg, vocab)
    if fmt in ("psv", "psv_dir"):
        return read_psv(path, cfg, vocab)
    if fmt.startswith("patients_"):
        return read_patients(path, fmt)
    if fmt.startswith("outcomes_"):
        return read_outcomes(path, fmt)
    if fmt.startswith("cohort_"):
        return read_cohort(path, fmt)
    raise StructuralError(
        f"{path}: unsupported format {fmt!r}; expected one of: {EXPECTED_FORMATS}"
    )
