"""Shared file IO of the model stages (train, evaluate, register, tune): read the feature
matrix and dictionary with errors that name the file and what was expected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import UserError


def read_features(
    path: str | Path, cohort: bool = False, columns: list[str] | None = None
) -> pd.DataFrame:
    """The feature matrix; ``cohort=True`` expects ``time_to_event_days``/``event``, not ``label``.

    ``path``: a file, the Dask stage's folder of part files, local or a URL (core.storage).
    ``columns``: only these (the file's columns among them).
    """
    from core import storage

    p = path if storage.is_url(path) else Path(path)
    if not storage.exists(p):
        raise UserError(f"{p}: feature matrix not found (run `dvc repro features` first)")
    try:
        from features.io import read_features as read_frame

        frame = read_frame(p, columns)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{p}: not a readable parquet file: {exc}") from None
    needed = ("time_to_event_days", "event") if cohort else ("label",)
    missing = [c for c in ("patient_id", "time", *needed) if c not in frame.columns]
    if missing:
        raise UserError(f"{p}: missing column(s) {missing}; expected the features contract")
    if "news2_total" not in frame.columns:
        raise UserError(f"{p}: missing column 'news2_total' (the NEWS2 baseline)")
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame


def feature_schema(path: str | Path) -> pd.DataFrame:
    """The matrix's columns and dtypes (an empty frame) from the Parquet footer."""
    from core import storage
    from features.io import feature_schema as schema_of

    try:
        return schema_of(path if storage.is_url(path) else Path(path))
    except Exception as exc:
        raise UserError(f"{path}: not a readable parquet file: {exc}") from None


def read_json(path: str | Path | None, what: str) -> dict[str, Any] | None:
    from core import storage

    if path is None:
        return None
    p = path if storage.is_url(path) else Path(path)
    if not storage.exists(p) or storage.is_dir(p):
        raise UserError(f"{p}: {what} not found")
    try:
        data = json.loads(storage.read_text(p))
    except ValueError as exc:
        raise UserError(f"{p}: {what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: {what} must be a JSON object")
    return data


def read_optional_parquet(path: str | Path | None) -> pd.DataFrame | None:
    from core import storage

    if path is None or not storage.exists(path) or storage.is_dir(path):
        return None
    return storage.read_parquet(path)
