"""``features.backend: dask``: the same feature code on a Dask cluster, partitioned by patient.

Every feature depends on one patient's rows only, and the prefix sums restart per patient, so
a partition of patients gives bit-identical rows to the single-process run. Compute goes to the
data: each task gets URLs (or shared paths) and the fsspec storage options (endpoint and region,
never credentials: the workers take those from their own environment), reads its patients'
observations, patients and outcomes itself, and writes its rows back as one part file of the
output dataset ``features.parquet/part-NNNNN.parquet``. The client reads only the patient ids
and gathers each part's metadata (rows, exclusions, labels per setting), never observations or
feature rows.

Partitions: for a Hive-partitioned observations dataset (``storage.observations_layout:
partitioned``) one task per patient bucket, reading only that bucket's folder; for a single
file, contiguous runs of sorted patient ids (row-group pruning on the sorted ``patient_id``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import storage
from core.vocabulary import Vocabulary
from features.build import BuildReport, build_feature_matrix_with_report, read_observations
from features.config import FeaturesConfig
from features.labels import EXCLUSION_REASONS

log = logging.getLogger(__name__)


def partition_patients(patient_ids: list[str] | np.ndarray, n_partitions: int) -> list[list[str]]:
    """Contiguous runs of sorted ids: matches the sort order of the observations file."""
    ids = np.unique(np.asarray(patient_ids, dtype=object).astype(str))
    parts = np.array_split(ids, min(max(n_partitions, 1), max(len(ids), 1)))
    return [list(p) for p in parts if len(p)]


@dataclass(frozen=True)
class PartitionTask:
    """What one task reads and writes: locations and ids, no data."""

    index: int
    source_dir: str  # the ingest output folder (patients, outcomes, observations)
    out_path: str  # this task's part file
    ids: list[str]
    bucket: int | None = None  # partitioned observations: read only this bucket's folder
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PartResult:
    """Metadata of one written part (what the client gathers)."""

    path: str
    rows: int
    excluded: dict[str, int]
    by_setting: dict[str, tuple[int, int]]  # setting -> (rows, positives)


def tasks_for(
    observations_dir: str | Path, out_path: str | Path, n_partitions: int
) -> list[PartitionTask]:
    """One task per bucket (partitioned observations) or per run of sorted patient ids."""
    source = str(observations_dir)
    obs = storage.join(source, "observations.parquet")
    # endpoint and region of the object store (the same environment serves both paths)
    opts = storage.storage_options(source) or storage.storage_options(out_path)
    pids = storage.read_parquet(storage.join(source, "patients.parquet"), columns=["patient_id"])
    ids = pids["patient_id"].astype(str).to_numpy()
    n_buckets = storage.bucket_count(obs)
    groups: list[tuple[int | None, list[str]]]
    if n_buckets is not None:
        bucket = storage.patient_bucket(ids, n_buckets)
        groups = [(int(b), sorted(set(ids[bucket == b]))) for b in np.unique(bucket).tolist()]
    else:
        groups = [(None, p) for p in partition_patients(ids, n_partitions)]
    return [
        PartitionTask(
            index=i,
            source_dir=source,
            out_path=str(storage.join(out_path, f"part-{i:05d}.parquet")),
            ids=group,
            bucket=b,
            options=opts,
        )
        for i, (b, group) in enumerate(groups)
    ]


def _read_for(task: PartitionTask, name: str) -> pd.DataFrame:
    return storage.read_parquet(
        storage.join(task.source_dir, f"{name}.parquet"),
        filters=[("patient_id", "in", task.ids)],
        options=task.options,
    )


def run_partition(task: PartitionTask, config: FeaturesConfig, vocab: Vocabulary) -> PartResult:
    """On a worker: read this partition's inputs, build its rows, write them; metadata back."""
    from features.build import write_features

    obs_path = storage.join(task.source_dir, "observations.parquet")
    filters: list[tuple[str, str, Any]] = (
        [(storage.BUCKET_COLUMN, "=", task.bucket)]
        if task.bucket is not None
        else [("patient_id", "in", task.ids)]
    )
    obs = read_observations(obs_path, filters=filters, options=task.options)
    patients, outcomes = _read_for(task, "patients"), _read_for(task, "outcomes")
    frame, report = build_feature_matrix_with_report(obs, patients, outcomes, config, vocab)
    del obs
    write_features(frame, task.out_path, task.options)
    counts = {k: (int(v["rows"]), int(v["positives"])) for k, v in report.by_setting.items()}
    return PartResult(task.out_path, report.rows, dict(report.excluded), counts)


def combine(parts: list[PartResult]) -> BuildReport:
    """The stage report from the parts' metadata (what ``prevalence_by_setting`` gives)."""
    excluded = {r: sum(p.excluded.get(r, 0) for p in parts) for r in EXCLUSION_REASONS}
    totals: dict[str, list[int]] = {}
    for p in parts:
        for name, (rows, pos) in p.by_setting.items():
            t = totals.setdefault(name, [0, 0])
            t[0] += rows
            t[1] += pos
    by_setting = {
        name: {"rows": r, "positives": p, "prevalence": float(p / r) if r else 0.0}
        for name, (r, p) in sorted(totals.items())
    }
    return BuildReport(rows=sum(p.rows for p in parts), excluded=excluded, by_setting=by_setting)


def build_on_cluster(
    observations_dir: str | Path,
    out_path: str | Path,
    config: FeaturesConfig,
    vocab: Vocabulary,
    client: Any,
) -> BuildReport:
    """Feature parts written to ``out_path`` (a dataset folder) by ``client``'s workers."""
    tasks = tasks_for(observations_dir, out_path, config.dask.n_partitions)
    storage.remove(out_path)
    storage.makedirs(out_path)
    futures = [client.submit(run_partition, t, config, vocab, pure=False) for t in tasks]
    log.info("submitted %d patient partitions", len(futures))
    parts: list[PartResult] = client.gather(futures)
    return combine(parts)


def dask_client(config: FeaturesConfig) -> tuple[Any, Any]:
    """(client, cluster-or-None): the configured scheduler, else a LocalCluster we own."""
    from distributed import Client, LocalCluster

    address = config.dask.address()
    if address:
        log.info("connecting to Dask scheduler %s", address)
        return Client(address), None
    cluster = LocalCluster(
        n_workers=config.dask.local_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
    )
    return Client(cluster), cluster


def run_dask(
    observations_dir: str | Path,
    out_dir: str | Path,
    config: FeaturesConfig,
    vocab: Vocabulary,
    client: Any = None,
) -> dict[str, Any]:
    """The stage on a Dask cluster (``client``, else the configured scheduler or a LocalCluster)."""
    from features.stage import FEATURES_FILE, input_paths, write_outputs

    paths = input_paths(observations_dir)
    source = _worker_visible(observations_dir)
    out_path = storage.join(_worker_visible(out_dir), FEATURES_FILE)
    storage.makedirs(out_dir)
    own = client is None
    cluster = None
    if own:
        client, cluster = dask_client(config)
    try:
        report = build_on_cluster(source, out_path, config, vocab, client)
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    columns = storage.parquet_columns(paths["patients"])
    return write_outputs(None, report, pd.DataFrame(columns=columns), out_dir, config, vocab)


def _worker_visible(path: str | Path) -> str:
    """URLs as they are; local paths absolute (workers may run in another directory)."""
    return str(path) if storage.is_url(path) else str(Path(path).resolve())
