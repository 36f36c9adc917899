"""File-level driver of the ``features`` stage: Parquet in, features + dictionary out.

Kept out of ``build`` so the feature functions stay pure; the pipeline module, the Dask
backend and the benchmark all call these.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from core import storage
from core.vocabulary import Vocabulary
from features.build import (
    BuildReport,
    build_feature_matrix_with_report,
    feature_dictionary,
    read_observations,
    static_columns,
    write_features,
)
from features.config import FeaturesConfig
from features.labels import label_times, prediction_times
from features.streaming import NotStreamable, stream_features

log = logging.getLogger(__name__)

FEATURES_FILE = "features.parquet"
DICTIONARY_FILE = "feature_dictionary.json"
REPORT_FILE = "features_report.json"


def tune_process() -> None:
    """Process settings for big batches; called by entry points (CLI, benchmark), not on import.

    NumPy (and Arrow's default mimalloc pool) ask the kernel for transparent huge pages on
    large buffers; where THP defrag is ``madvise`` that triggers direct compaction on page
    faults, which measured here as about half of the stage's system time. Arrow gets the
    system allocator instead, and glibc keeps freed memory for reuse. Results do not change.
    """
    import ctypes
    import ctypes.util
    import sys

    import numpy as np
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    if sys.platform.startswith("linux"):
        # glibc: keep freed heap memory for reuse by the next chunk instead of returning it to
        # the kernel and faulting it in again (M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3),
        # and one arena for all threads (M_ARENA_MAX = -8): the streaming stage's reader,
        # workers and writer then reuse each other's freed chunks (measured: half the page
        # faults and system time)
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt(-3, 32 * 1024 * 1024)
            libc.mallopt(-1, 1 << 30)
            libc.mallopt(-8, 1)
        except (OSError, AttributeError):
            pass

    setter = getattr(getattr(np, "_core", None), "multiarray", None)
    fn = getattr(setter, "_set_madvise_hugepage", None)
    if fn is not None:
        fn(False)


def _warm_kernels() -> None:
    """Load the compiled kernels on a thread while the inputs are read (saves ~0.5 s)."""
    import threading

    def warm() -> None:
        from features.kernels import warm_up

        warm_up()

    threading.Thread(target=warm, name="warm-kernels", daemon=True).start()


def input_paths(observations_dir: str | Path) -> dict[str, str | Path]:
    """The ingest stage's files in ``observations_dir`` (a local folder or a URL);
    ``observations.parquet`` is one file or a Hive-partitioned dataset folder."""
    paths = {
        n: storage.join(observations_dir, f"{n}.parquet")
        for n in ("observations", "patients", "outcomes")
    }
    missing = [str(p) for p in paths.values() if not storage.exists(p)]
    if missing:
        raise FileNotFoundError(f"missing input file(s): {', '.join(missing)}")
    return paths


def read_side_tables(observations_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patients and outcomes (small tables, read whole)."""
    paths = input_paths(observations_dir)
    return storage.read_parquet(paths["patients"]), storage.read_parquet(paths["outcomes"])


def write_outputs(
    frame: pd.DataFrame | None,
    report: BuildReport,
    patients: pd.DataFrame,
    out_dir: str | Path,
    config: FeaturesConfig,
    vocab: Vocabulary,
) -> dict[str, Any]:
    """Features (unless already written: ``frame=None``), dictionary and report."""
    storage.makedirs(out_dir)
    if frame is not None:
        features_path = storage.join(out_dir, FEATURES_FILE)
        storage.remove(features_path)  # a partitioned output of an earlier Dask run
        write_features(frame, features_path)
    doc = feature_dictionary(config, vocab, static_columns(config, patients.columns))
    storage.write_text(storage.join(out_dir, DICTIONARY_FILE), json.dumps(doc, indent=2))
    summary = {
        "rows": report.rows,
        "excluded": report.excluded,
        "by_setting": report.by_setting,
        "n_features": len(doc["features"]),
        "backend": config.backend,
    }
    storage.write_text(storage.join(out_dir, REPORT_FILE), json.dumps(summary, indent=2))
    return summary


def run_local(
    observations_dir: str | Path, out_dir: str | Path, config: FeaturesConfig, vocab: Vocabulary
) -> dict[str, Any]:
    """Read, build (one process) and write; returns the summary.

    Streams the observations (``features.streaming``) when their rows are grouped by
    patient and the prediction times do not depend on them; else reads the whole table.
    """
    paths = input_paths(observations_dir)
    _warm_kernels()
    patients, outcomes = read_side_tables(observations_dir)
    try:
        times = prediction_times(patients, config)
    except ValueError:  # e.g. each_observation, or patients without follow-up times
        times = None
    if times is not None:
        labelled, excluded = label_times(times, patients, outcomes, config)
        storage.makedirs(out_dir)
        features_path = storage.join(out_dir, FEATURES_FILE)
        try:
            if storage.is_dir(paths["observations"]):
                raise NotStreamable("a partitioned dataset (rows grouped by bucket, not patient)")
            storage.remove(features_path)  # a partitioned output of an earlier Dask run
            rows, by_setting = stream_features(
                paths["observations"], patients, labelled, config, vocab, features_path
            )
        except NotStreamable as exc:
            log.info("%s: %s; reading the whole table", paths["observations"], exc)
        else:
            report = BuildReport(rows=rows, excluded=excluded, by_setting=by_setting)
            return write_outputs(None, report, patients, out_dir, config, vocab)
    obs = read_observations(paths["observations"])
    log.info("read %d observations of %d patients", len(obs), len(patients))
    frame, report = build_feature_matrix_with_report(obs, patients, outcomes, config, vocab)
    del obs
    return write_outputs(frame, report, patients, out_dir, config, vocab)


def run(
    observations_dir: str | Path, out_dir: str | Path, config: FeaturesConfig, vocab: Vocabulary
) -> dict[str, Any]:
    """The stage on the configured backend."""
    if config.backend == "dask":
        from features.dask_backend import run_dask

        return run_dask(observations_dir, out_dir, config, vocab)
    return run_local(observations_dir, out_dir, config, vocab)
