"""Reading the feature matrix with little memory (train, evaluate and register read it)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def read_features(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The feature matrix as the stages wrote it, one column at a time.

    Why: ``pd.read_parquet`` decodes every column at once and holds the Arrow table and the
    frame together; on 200 k x 312 float32 (268 MB) that peaked 765 MB above the process's
    size, reading column by column 366 MB (float columns stay the Arrow buffers: no copy).
    A file that stored a pandas index (not the stages' files) is read whole, so the index
    comes back as it was written. ``path`` may be a URL (core.storage), and a folder of part
    files (``features.backend: dask``): the parts are read in order and the rows sorted by
    patient and time, as the single-process stage writes them. ``columns``: only these (those
    the file has, in the file's order; ``train.backend: dask`` reads the row keys only).
    """
    from core import storage

    if storage.is_dir(path):
        return read_feature_parts(path, columns)
    pf = storage.parquet_file(path)
    meta = (pf.schema_arrow.metadata or {}).get(b"pandas")
    stored_index = meta is not None and any(
        not isinstance(i, dict) for i in json.loads(meta).get("index_columns", [])
    )
    if stored_index:
        frame = pf.read().to_pandas(split_blocks=True, self_destruct=True)
        return frame if columns is None else frame[[c for c in frame if c in set(columns)]]
    names = pf.schema_arrow.names
    if columns is not None:
        names = [c for c in names if c in set(columns)]
    cols = {
        name: pf.read(columns=[name]).to_pandas(split_blocks=True, self_destruct=True)[name]
        for name in names
    }
    return pd.DataFrame(cols, copy=False)


def feature_schema(path: str | Path) -> pd.DataFrame:
    """The matrix's columns and dtypes as an empty frame, from the Parquet footer alone (of
    the first part file for a folder): what selecting features needs, without reading rows."""
    from core import storage

    first = part_files(path)[0] if storage.is_dir(path) else path
    schema = storage.parquet_file(first).schema_arrow
    return schema.empty_table().to_pandas()


def read_feature_parts(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The Dask stage's part files as one frame in the stage's row order (patient, time)."""
    frames = [read_features(p, columns) for p in part_files(path)]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return frame.sort_values(["patient_id", "time"], kind="stable", ignore_index=True)


def part_files(path: str | Path) -> list[str]:
    """The part files of a feature dataset folder, in order (an error naming it if none)."""
    from core import storage

    parts = storage.list_files(path, ".parquet")
    if not parts:
        raise FileNotFoundError(f"{path}: no part files in the feature dataset")
    return parts
