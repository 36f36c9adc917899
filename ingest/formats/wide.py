"""Wide tables (CSV/TSV/Parquet): ``patient_id,time`` plus one column per signal, mapped in
``ingest.wide_columns`` (or named by a vocabulary key). Other non-empty columns are counted
as unmapped, per column."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from core.vocabulary import Vocabulary
from ingest.config import ColumnMap, IngestConfig, WideColumn
from ingest.raw import RawRead, StructuralError, require, table, text_read

#: columns that are structure, never values
STRUCTURE = {"patient_id", "time", "source", "line"}


def targets(m: ColumnMap) -> list[WideColumn]:
    return m if isinstance(m, list) else [m]


def column_mapping(
    columns: Iterable[str], mapping: dict[str, ColumnMap], vocab: Vocabulary, skip: Iterable[str]
) -> tuple[dict[str, list[WideColumn]], list[str]]:
    """(column -> targets, unmapped columns) for the value columns of a wide table."""
    out: dict[str, list[WideColumn]] = {}
    unmapped: list[str] = []
    skipped = set(skip) | STRUCTURE
    for c in columns:
        if c in skipped:
            continue
        if c in mapping:
            out[c] = targets(mapping[c])
        elif vocab.resolve_code(c):
            out[c] = [WideColumn(code=c)]
        else:
            unmapped.append(c)
    return out, unmapped


def melt(
    rr_file: str,
    fmt: str,
    df,  # type: ignore[no-untyped-def]  # pandas frame of text
    line_no: np.ndarray,
    mapping: dict[str, list[WideColumn]],
    time_col: str,
    cfg: IngestConfig,
    default_source: str,
) -> RawRead:
    """One candidate per non-empty mapped cell (and target code), in line order."""
    ids, times, codes, values, units, cols, lines, srcs = [], [], [], [], [], [], [], []
    src = df["source"].to_numpy() if "source" in df else None
    for col, tgts in mapping.items():
        v = df[col].to_numpy()
        m = df[col].str.strip().ne("").to_numpy()
        if not m.any():
            continue
        for t in tgts:
            ids.append(df["patient_id"].to_numpy()[m])
            times.append(df[time_col].to_numpy()[m])
            codes.append(np.full(int(m.sum()), t.code, dtype=object))
            values.append(v[m])
            units.append(np.full(int(m.sum()), t.unit or "", dtype=object))
            cols.append(np.full(int(m.sum()), col, dtype=object))
            lines.append(line_no[m])
            srcs.append(src[m] if src is not None else np.full(int(m.sum()), "", dtype=object))

    def cat(parts):
        return np.concatenate(parts) if parts else np.array([], dtype=object)

    line_arr = np.concatenate(lines).astype(np.int64) if lines else np.array([], np.int64)
    order = np.argsort(line_arr, kind="stable")
    return text_read(
        rr_file,
        fmt,
        cat(ids)[order],
        cat(times)[order],
        cat(codes)[order],
        cat(values)[order],
        cat(units)[order],
        cat(srcs)[order],
        line_arr[order],
        cfg.naive_time,
        default_source,
        column=cat(cols)[order],
    )


def count_unmapped(df, columns: list[str]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    out: dict[str, int] = {}
    for c in columns:
        n = int(df[c].str.strip().ne("").sum())
        if n:
            out[c] = n
    return out


class WideTable:
    name = "wide"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        cols = set(header or [])
        return "time" in cols and any(c in cfg.wide_columns or vocab.resolve_code(c) for c in cols)

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        fmt = "wide_csv"
        df, line_no, lines, problems, records = table(path)
        require(path, df.columns, ["patient_id", "time"], "wide observation table")
        mapping, unmapped = column_mapping(df.columns, cfg.wide_columns, vocab, ())
        if not mapping:
            raise StructuralError(
                f"{path}: no observation columns (expected columns named in ingest.wide_columns or vocabulary keys)"
            )
        default = cfg.default_source.get(fmt, "wearable")
        rr = melt(str(path), fmt, df, line_no, mapping, "time", cfg, default)
        rr.problems, rr.lines, rr.records = problems, lines, records
        rr.unmapped = count_unmapped(df, unmapped)
        return rr
