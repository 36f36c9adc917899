"""``features.backend: dask``: the same feature code on a Dask cluster, partitioned by patient.

Every feature depends on one patient's rows only, and the prefix sums restart per patient, so
a partition of patients gives bit-identical rows to the single-process run. Each task reads
its own patients' rows from the Parquet input (row-group pruning on the sorted
``patient_id``), so observations never pass through the client; the input path must be
readable by the workers (shared filesystem or object store URL).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from features.build import BuildReport, build_feature_matrix_with_report, read_observations
from features.config import FeaturesConfig
from features.labels import EXCLUSION_REASONS, prevalence_by_setting

log = logging.getLogger(__name__)


def partition_patients(patient_ids: list[str] | np.ndarray, n_partitions: int) -> list[list[str]]:
    """Contiguous runs of sorted ids: matches the sort order of the observations file."""
    ids = np.unique(np.asarray(patient_ids, dtype=object).astype(str))
    parts = np.array_split(ids, min(max(n_partitions, 1), max(len(ids), 1)))
    return [list(p) for p in parts if len(p)]


def _partition_task(
    observations_path: str,
    ids: list[str],
    patients: pd.DataFrame,
    outcomes: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
) -> tuple[pd.DataFrame, BuildReport]:
    obs = read_observations(observations_path, filters=[("patient_id", "in", ids)])
    return build_feature_matrix_with_report(obs, patients, outcomes, config, vocab)


def combine(results: list[tuple[pd.DataFrame, BuildReport]]) -> tuple[pd.DataFrame, BuildReport]:
    frames = [f for f, _ in results if len(f)]
    frame = (
        pd.concat(frames, ignore_index=True) if frames else results[0][0].iloc[0:0]
    ).sort_values(["patient_id", "time"], kind="stable", ignore_index=True)
    excluded = {r: sum(rep.excluded.get(r, 0) for _, rep in results) for r in EXCLUSION_REASONS}
    by_setting = prevalence_by_setting(frame["setting"].to_numpy(), frame["label"].to_numpy())
    return frame, BuildReport(rows=len(frame), excluded=excluded, by_setting=by_setting)


def build_on_cluster(
    observations_path: str | Path,
    patients: pd.DataFrame,
    outcomes: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
    client: Any,
) -> tuple[pd.DataFrame, BuildReport]:
    """Feature matrix built by ``client`` (a ``distributed.Client``), one task per partition."""
    parts = partition_patients(patients["patient_id"].to_numpy(), config.dask.n_partitions)
    pid = patients["patient_id"].astype(str)
    oid = outcomes["patient_id"].astype(str)
    futures = []
    for ids in parts:
        keep = set(ids)
        futures.append(
            client.submit(
                _partition_task,
                str(observations_path),
                ids,
                patients[pid.isin(keep)],
                outcomes[oid.isin(keep)],
                config,
                vocab,
                pure=False,
            )
        )
    log.info("submitted %d patient partitions", len(futures))
    return combine(client.gather(futures))


def run_dask(
    observations_dir: str | Path, out_dir: str | Path, config: FeaturesConfig, vocab: Vocabulary
) -> dict[str, Any]:
    """The stage on a Dask cluster: the configured scheduler, or a LocalCluster if none."""
    from distributed import Client, LocalCluster

    from features.stage import input_paths, read_side_tables, write_outputs

    paths = input_paths(observations_dir)
    patients, outcomes = read_side_tables(observations_dir)
    address = config.dask.address()
    if address:
        log.info("connecting to Dask scheduler %s", address)
        with Client(address) as client:
            frame, report = build_on_cluster(
                Path(paths["observations"]).resolve(), patients, outcomes, config, vocab, client
            )
    else:
        with (
            LocalCluster(
                n_workers=config.dask.local_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            frame, report = build_on_cluster(
                Path(paths["observations"]).resolve(), patients, outcomes, config, vocab, client
            )
    return write_outputs(frame, report, patients, out_dir, config, vocab)
