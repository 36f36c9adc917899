"""Scan every file under a folder for raw patient identifiers (bytes, decompressed, parquet).

Raw bytes catch plain text, JSON, HTML, SQLite pages and pickles; compressed files are
decompressed first; Parquet string columns are also read back with pandas because Snappy or
dictionary pages can hide a string from a byte search.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd


def _pattern(raw_ids: Iterable[str]) -> re.Pattern[bytes]:
    ids = sorted({str(r) for r in raw_ids if str(r)}, key=len, reverse=True)
    if not ids:
        raise ValueError("no raw identifiers to scan for")
    return re.compile(b"|".join(re.escape(i.encode("utf-8")) for i in ids))


def _decompressed(name: str, data: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    try:
        if data[:2] == b"\x1f\x8b":
            out.append((f"{name}!gunzip", gzip.decompress(data)))
        elif data[:3] == b"BZh":
            out.append((f"{name}!bunzip2", bz2.decompress(data)))
        elif data[:6] == b"\xfd7zXZ\x00":
            out.append((f"{name}!unxz", lzma.decompress(data)))
        elif data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                out.extend((f"{name}!{n}", zf.read(n)) for n in zf.namelist())
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile, ValueError):
        pass
    return out


def _parquet_strings(path: Path) -> Iterable[str]:
    frame = pd.read_parquet(path)
    for col in frame.columns:
        s = frame[col]
        if s.dtype == object or isinstance(s.dtype, pd.StringDtype | pd.CategoricalDtype):
            yield from s.dropna().astype(str).unique()
    yield from map(str, frame.columns)
    yield from map(str, frame.index.astype(str).unique()[:100000])


def scan(root: Path, raw_ids: Iterable[str], exclude: Iterable[Path] = ()) -> list[str]:
    """``file: match`` for every raw identifier found under ``root`` (file names included)."""
    pat = _pattern(raw_ids)
    skip = [p.resolve() for p in exclude]
    hits: list[str] = []
    n_files = 0
    for path in sorted(root.rglob("*")):
        rp = path.resolve()
        if any(rp == s or s in rp.parents for s in skip):
            continue
        if m := pat.search(str(path.relative_to(root)).encode()):
            hits.append(f"{path}: file name contains {m.group().decode()}")
        if not path.is_file():
            continue
        n_files += 1
        data = path.read_bytes()
        queue = [(str(path), data)]
        while queue:
            name, blob = queue.pop()
            if m := pat.search(blob):
                hits.append(f"{name}: {m.group().decode()}")
            queue.extend(_decompressed(name, blob))
        if path.suffix == ".parquet":
            for value in _parquet_strings(path):
                if m := pat.search(value.encode("utf-8", "replace")):
                    hits.append(f"{path} (parquet value): {m.group().decode()}")
                    break
    if n_files == 0:
        raise AssertionError(f"{root}: nothing to scan")
    return hits
