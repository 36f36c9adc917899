"""PhysioNet/CinC 2019 PSV: a directory with one pipe-separated file per patient, hourly rows.

Everything a file holds is used: clinical columns become candidates (``ingest.psv_columns``;
others are counted as unmapped), demographics go to the patients table, the label column
becomes an outcome event by the rule in ``ingest.psv.label``. The patient id is the file stem.
Row time = anchor + ``ICULOS`` hours; the anchor comes from ``anchors.csv``
(``patient_file,anchor_time``) beside the files, else ``ingest.psv.anchor`` (an ISO time, or
``relative``: the documented epoch ``RELATIVE_EPOCH``, so no calendar dates are invented).

Speed: clean files (ASCII, the header's field count on every row, no quotes or blank lines)
of the same header are concatenated and parsed by one multi-threaded ``pyarrow.csv`` call as
float64; a file that is not clean, or holds a non-number, is read line by line on its own, so
its problems are found and named without slowing the rest.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from ingest.canonical import NAT_NS, Candidates, Reason
from ingest.config import RELATIVE_EPOCH, IngestConfig
from ingest.formats.wide import targets
from ingest.raw import Problem, RawRead, StructuralError, csv_table, require
from ingest.walk import problem_of

logger = logging.getLogger(__name__)
HOUR_NS = 3_600_000_000_000
NULLS = ["NaN", "nan", ""]


@dataclass
class Block:
    """Parsed rows of one or more files: float columns, odd text cells, file and line."""

    cols: dict[str, np.ndarray]
    text: dict[str, np.ndarray] = field(default_factory=dict)  # col -> text where not a number
    file: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    line: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class PsvRecords(Mapping[int, str]):
    """Global line number -> ``file.psv:line: text``, read from disk only when asked."""

    def __init__(
        self, files: list[Path], offsets: np.ndarray, datas: list[bytes] | None = None
    ) -> None:
        self.files, self.offsets, self.datas = files, offsets, datas
        self._cache: dict[int, list[str]] = {}

    def __getitem__(self, line: int) -> str:
        f = int(np.searchsorted(self.offsets, line, side="right")) - 1
        if f < 0 or f >= len(self.files):
            raise KeyError(line)
        lines = self._cache.get(f)
        if lines is None:
            if len(self._cache) > 256:
                self._cache.clear()
            data = self.datas[f] if self.datas is not None else self.files[f].read_bytes()
            raw = data.decode("utf-8", errors="replace")
            lines = self._cache[f] = raw.splitlines()
        k = line - int(self.offsets[f])
        text = lines[k - 1] if 0 < k <= len(lines) else ""
        return f"{self.files[f].name}:{k}: {text}"

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _split(data: bytes) -> tuple[bytes, bytes]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nl = data.find(b"\n")
    if nl < 0:
        return data.rstrip(b"\r"), b""
    return data[:nl].rstrip(b"\r"), data[nl + 1 :]


def _clean(body: bytes, ncols: int) -> bool:
    if not body.isascii() or b'"' in body or b"\r" in body or b"\n\n" in body:
        return False
    if body and not body.endswith(b"\n"):
        return False
    return body.count(b"|") == body.count(b"\n") * (ncols - 1) and not body.startswith(b"\n")


def _arrow_block(header: bytes, bodies: list[bytes]) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = [c.strip() for c in header.decode("ascii").split("|")]
    buf = b"".join([header, b"\n", *bodies])
    table = pacsv.read_csv(
        io.BytesIO(buf),
        read_options=pacsv.ReadOptions(use_threads=True, block_size=1 << 24),
        parse_options=pacsv.ParseOptions(delimiter="|"),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.float64() for n in names}, null_values=NULLS
        ),
    )
    return {
        n: table.column(i).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        for i, n in enumerate(names)
    }


def _slow_block(path: Path, fidx: int, problems: list[Problem], offset: int) -> Block:
    """One file line by line: bad lines become problems, non-numbers stay as text."""
    df, line_no, _, probs = csv_table(path, "|")
    for p in probs:
        rec = f"{path.name}:{p.line}: {p.record}"
        problems.append(Problem(offset + p.line, p.field, p.reason, rec, source_id=path.stem))
    cols: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    for c in df.columns:
        s = df[c].str.strip()
        num = pd.to_numeric(s.where(~s.isin(NULLS)), errors="coerce").to_numpy(float)
        cols[c] = num
        odd = np.isnan(num) & ~s.isin(NULLS).to_numpy()
        if odd.any():
            text[c] = np.where(odd, s.to_numpy(dtype=object), "")
    return Block(cols, text, np.full(len(df), fidx, np.int32), line_no.astype(np.int64))


def read_blocks(files: list[Path]) -> tuple[list[Block], list[Problem], np.ndarray, list[bytes]]:
    """Parse every file (fast path per header group, slow path per odd file)."""
    datas = [f.read_bytes() for f in files]
    nlines = np.array([d.count(b"\n") + (0 if d.endswith(b"\n") or not d else 1) for d in datas])
    offsets = np.concatenate([[0], np.cumsum(nlines + 1)[:-1]]).astype(np.int64)
    groups: dict[bytes, list[int]] = {}
    slow: list[int] = []
    for i, d in enumerate(datas):
        header, body = _split(d)
        ncols = header.count(b"|") + 1
        if header.isascii() and header.strip() and _clean(body, ncols):
            groups.setdefault(header, []).append(i)
        else:
            slow.append(i)
    blocks: list[Block] = []
    for header, idx in groups.items():
        bodies = [_split(datas[i])[1] for i in idx]
        try:
            cols = _arrow_block(header, bodies)
        except Exception:  # a non-number somewhere: find it file by file
            slow.extend(idx)
            continue
        rows = np.array([b.count(b"\n") for b in bodies])
        fidx = np.repeat(np.asarray(idx, dtype=np.int32), rows)
        within = np.arange(int(rows.sum())) - np.repeat(np.cumsum(rows) - rows, rows)
        blocks.append(Block(cols, {}, fidx, within.astype(np.int64) + 2))
    problems: list[Problem] = []
    for i in sorted(slow):
        if not datas[i].strip():
            raise StructuralError(f"{files[i]}: empty file (expected a PSV header line)")
        blocks.append(_slow_block(files[i], i, problems, int(offsets[i])))
    return blocks, problems, offsets, datas


def _anchors(d: Path, files: list[Path], cfg: IngestConfig) -> np.ndarray:
    """Anchor (UTC ns) per file: anchors.csv, else ``ingest.psv.anchor``."""
    table: dict[str, str] = {}
    f = d / "anchors.csv"
    if f.is_file():
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
        require(f, df.columns, ["patient_file", "anchor_time"], "PSV anchors table")
        table = dict(
            zip(df["patient_file"].str.strip(), df["anchor_time"].str.strip(), strict=True)
        )
    default = RELATIVE_EPOCH if cfg.psv.anchor == "relative" else cfg.psv.anchor
    out = np.empty(len(files), dtype=np.int64)
    parsed: dict[str, int] = {}
    for i, p in enumerate(files):
        a = table.get(p.stem, default)
        if a not in parsed:
            t = pd.to_datetime(a, utc=True, errors="coerce", format="ISO8601")
            if pd.isna(t):
                where = f if p.stem in table else "ingest.psv.anchor"
                raise StructuralError(f"{where}: anchor_time {a!r} for {p.stem} is not an ISO time")
            parsed[a] = int(t.value)
        out[i] = parsed[a]
    return out


def _merge(blocks: list[Block]) -> Block:
    names = list(dict.fromkeys(c for b in blocks for c in b.cols))
    cols = {
        c: np.concatenate([b.cols.get(c, np.full(len(b.file), np.nan)) for b in blocks])
        for c in names
    }
    text_cols = {c for b in blocks for c in b.text}
    text = {
        c: np.concatenate([b.text.get(c, np.full(len(b.file), "", dtype=object)) for b in blocks])
        for c in text_cols
    }
    return Block(
        cols,
        text,
        np.concatenate([b.file for b in blocks]),
        np.concatenate([b.line for b in blocks]),
    )


def read_psv(path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
    if path.is_dir():  # the walk's rules: no dangling or escaping links, regular files only
        files = sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() == ".psv" and problem_of(p, path) is None and p.is_file()
        )
    else:
        files = [path]
    d = path if path.is_dir() else path.parent
    if not cfg.psv_columns:
        raise StructuralError(
            f"{path}: ingest.psv_columns is empty (expected PSV column -> code/unit mapping)"
        )
    anchors = _anchors(d, files, cfg)
    blocks, problems, offsets, datas = read_blocks(files)
    b = _merge(blocks)
    hcol = cfg.psv.hours_column
    for blk in blocks:
        if hcol not in blk.cols and len(blk.file):
            raise StructuralError(
                f"{files[int(blk.file[0])]}: required column {hcol!r} absent (hours since ICU admission; ingest.psv.hours_column)"
            )
    hours = b.cols[hcol] if hcol in b.cols else np.zeros(0)
    glob_line = b.line + offsets[b.file]
    bad_hours = ~np.isfinite(hours) | (hours < 0)
    t_ns = np.where(
        bad_hours,
        NAT_NS,
        anchors[b.file] + np.round(np.nan_to_num(hours) * HOUR_NS).astype(np.int64),
    )
    rr = _candidates(b, cfg, vocab, t_ns, bad_hours, glob_line, files, hcol)
    rr.problems = problems
    rr.records = PsvRecords(files, offsets, datas)  # the bytes are freed with the read
    rr.derived_patients = _patients(b, cfg, t_ns, hours, files)
    rr.outcomes = _outcomes(b, cfg, t_ns, files, glob_line)
    return rr


def _candidates(
    b: Block,
    cfg: IngestConfig,
    vocab: Vocabulary,
    t_ns: np.ndarray,
    bad_hours: np.ndarray,
    glob_line: np.ndarray,
    files: list[Path],
    hcol: str,
) -> RawRead:
    used = {hcol, *cfg.psv.patient_columns}
    if cfg.psv.label is not None:
        used.add(cfg.psv.label.column)
    code_names: list[str] = []
    unit_names: list[str] = []
    col_names: list[str] = []
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("code", "unit", "num", "text", "t", "pid", "line", "col")
    }
    unmapped: dict[str, int] = {}
    any_text = bool(b.text)
    for col, arr in b.cols.items():
        if col in used:
            continue
        tx = b.text.get(col)
        present = ~np.isnan(arr) if tx is None else (~np.isnan(arr) | (tx != ""))
        n = int(present.sum())
        if col not in cfg.psv_columns:
            if n:
                unmapped[col] = n
            continue
        if not n:
            continue
        at = np.flatnonzero(present)
        col_names.append(col)
        for t in targets(cfg.psv_columns[col]):
            code_names.append(t.code)
            unit_names.append(t.unit or "")
            parts["code"].append(np.full(n, len(code_names) - 1, np.int32))
            parts["unit"].append(np.full(n, len(unit_names) - 1, np.int32))
            parts["col"].append(np.full(n, len(col_names) - 1, np.int32))
            parts["num"].append(arr[at])
            parts["text"].append(
                tx[at]
                if tx is not None
                else np.full(n, "", dtype=object)
                if any_text
                else np.zeros(0)
            )
            parts["t"].append(t_ns[at])
            parts["pid"].append(b.file[at])
            parts["line"].append(glob_line[at])
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    n = len(cat["num"])
    pre = (
        np.where(cat["t"] == NAT_NS, Reason.UNPARSEABLE_TIME, 0).astype(np.uint8)
        if n
        else np.zeros(0, np.uint8)
    )
    cand = Candidates(
        code=cat["code"].astype(np.int32),
        code_names=code_names,
        unit=cat["unit"].astype(np.int32),
        unit_names=unit_names,
        num=cat["num"].astype(np.float64),
        text=cat["text"].astype(object) if any_text else None,
        time_ns=cat["t"].astype(np.int64),
        pre=pre,
        column=cat["col"].astype(np.int32),
        column_names=col_names,
    )
    for i in np.flatnonzero(pre).tolist():
        cand.detail[i] = f"unparseable time: {hcol} is not a non-negative number of hours"
    rr = RawRead(
        str(files[0].parent) if files else "",
        "psv",
        cand=cand,
        pid=cat["pid"].astype(np.int32),
        pid_names=[f.stem for f in files],
        source=np.zeros(n, np.int32),
        source_names=[cfg.default_source.get("psv", "icu")],
        line=cat["line"].astype(np.int64),
    )
    rr.unmapped = unmapped
    return rr


def _patients(
    b: Block, cfg: IngestConfig, t_ns: np.ndarray, hours: np.ndarray, files: list[Path]
) -> pd.DataFrame:
    df = pd.DataFrame({"_f": b.file, "_t": np.where(t_ns == NAT_NS, np.nan, t_ns), "_h": hours})
    for src, dst in cfg.psv.patient_columns.items():
        if src in b.cols:
            df[dst] = b.cols[src]
    g = df.groupby("_f", sort=True)
    first = g.first()
    out = pd.DataFrame({"source_id": [files[int(i)].stem for i in first.index]})
    for dst in cfg.psv.patient_columns.values():
        if dst in first:
            out[dst] = first[dst].to_numpy()
    if "sex" in out:
        out["sex"] = np.select([out["sex"] == 0, out["sex"] == 1], ["F", "M"], "")
    out["setting"] = cfg.psv.setting
    tmin, tmax = g["_t"].min().to_numpy(), g["_t"].max().to_numpy()
    out["followup_start"] = pd.to_datetime(tmin, unit="ns", utc=True)
    out["followup_end"] = pd.to_datetime(tmax, unit="ns", utc=True)
    out["icu_los_hours"] = g["_h"].max().to_numpy()
    return out


def _outcomes(
    b: Block, cfg: IngestConfig, t_ns: np.ndarray, files: list[Path], glob_line: np.ndarray
) -> pd.DataFrame | None:
    lab = cfg.psv.label
    if lab is None or lab.column not in b.cols:
        return None
    pos = (b.cols[lab.column] == 1) & (t_ns != NAT_NS)
    if not pos.any():
        return pd.DataFrame(columns=["patient_id", "time", "event", "line"])
    df = pd.DataFrame({"f": b.file[pos], "t": t_ns[pos], "line": glob_line[pos]})
    first = df.sort_values(["f", "t"]).groupby("f", sort=True).first()
    onset = first["t"].to_numpy() + int(lab.offset_hours * HOUR_NS)
    return pd.DataFrame(
        {
            "patient_id": [files[int(i)].stem for i in first.index],
            "time": pd.to_datetime(onset, unit="ns", utc=True).astype(str),
            "event": lab.event,
            "line": first["line"].to_numpy(),
        }
    )


class PsvDirectory:
    name = "psv"
    directory = True

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        return any(p.suffix.lower() == ".psv" for p in path.iterdir())

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        return read_psv(path, cfg, vocab)


class PsvFile(PsvDirectory):
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        return path.suffix.lower() == ".psv"


class PsvAnchors:
    """``anchors.csv`` beside PSV files: read by the PSV format, not on its own."""

    name = "psv_anchors"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        return {"patient_file", "anchor_time"} <= set(header or [])

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        return RawRead(str(path), self.name)
