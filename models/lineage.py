"""Lineage of a training run, built with ``governance.lineage`` (the one definition of names).

Why: a registered model must be traceable to the code (git commit), data (``data.dvc`` md5),
parameters (hash), feature matrix (md5) and consent filter that produced it. This adapter adds
the feature-file md5 and the pseudonym-key fingerprint and returns ``(record, tags)`` for
``models.tracking``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file (local or a URL); of a folder of part files, of their bytes in name order."""
    from core import storage

    h = hashlib.md5(usedforsecurity=False)
    files = storage.list_files(path, ".parquet") if storage.is_dir(path) else [path]
    for f in files:
        with storage.open_file(f) as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def _exists(path: str | Path) -> bool:
    from core import storage

    return storage.exists(path)


def params_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    from governance.lineage import canonical_hash

    return canonical_hash(obj)[:16]


def _key_fingerprint() -> str | None:
    try:
        from governance.pseudonym import get_key, key_fingerprint

        return key_fingerprint(get_key())
    except Exception as exc:  # production mode without a key: lineage still recorded
        log.warning("pseudonym key fingerprint unavailable: %s", exc)
        return None


def build_lineage(
    params: Mapping[str, Any],
    feature_dictionary: Mapping[str, Any] | None = None,
    features_path: str | Path | None = None,
    consent: Mapping[str, Any] | None = None,
    data_dvc: str | Path = "data.dvc",
    repo: str | Path = ".",
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(record, tags)``: the ``lineage.json`` record and its flat MLflow run tags."""
    from governance.lineage import TAG_FEATURES_MD5, collect_lineage, lineage_tags

    extra: dict[str, Any] = {}
    if features_path is not None and _exists(features_path):
        extra["features_md5"] = file_md5(features_path)
    record = collect_lineage(
        params=params,
        feature_dictionary=feature_dictionary,
        consent=consent,
        repo=repo,
        data_dvc=data_dvc,
        key_fingerprint=_key_fingerprint(),
        extra=extra,
    )
    tags = lineage_tags(record)
    if "features_md5" in extra:
        tags[TAG_FEATURES_MD5] = extra["features_md5"]
    return record, tags
