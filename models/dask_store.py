"""``train.backend: dask`` near the data: the workers read the feature matrix themselves.

The client holds the row keys only (patient, time, setting, label, event time, NEWS2 and the
few columns the predictions file and the categorical encodings need; ``pipelines.train``
reads just those). Everything that needs the 300-odd feature columns runs on the workers,
each reading its partitions straight from the features stage's output (one file, or the Dask
stage's folder of part files; local and shared, or a URL through ``core.storage`` with the
endpoint and region as storage options and the credentials from the workers' environment):

* the fit (``lightgbm.dask`` on the training patients' rows),
* the raw score of every row the client holds (returned with its keys: one float per row,
  never a feature value), from which the client fits the calibrator and the alert threshold
  on the validation rows and writes the predictions file,
* in the same read, the MLflow input example (per-partition medians of the training rows,
  their median).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.config import TrainConfig
from models.pyfunc import RiskModel

KEYS = ["patient_id", "time"]


def dask_classifier(
    params: dict[str, Any], num_rounds: int, config: TrainConfig, client: Any
) -> Any:
    """The ``lightgbm.dask`` estimator of both Dask paths (LightGBM params, seed, rounds)."""
    from lightgbm.dask import DaskLGBMClassifier

    p = dict(params)
    for key in ("metric", "verbosity", "seed", "num_threads"):
        p.pop(key, None)
    return DaskLGBMClassifier(
        client=client,
        n_estimators=num_rounds,
        random_state=config.seed,
        verbose=-1,
        # LightGBM's socket timeout (minutes; default 120): a worker that never joins the
        # network ring fails the fit instead of hanging it
        time_out=10,
        **p,
    )


def prepared(
    part: pd.DataFrame, names: list[str], categories: dict[str, list[str]]
) -> pd.DataFrame:
    """A feature partition as the model's float matrix (the model's own ``prepare``)."""
    return RiskModel(feature_names=names, categories=categories).prepare(part)


def read_store(features_path: str, columns: list[str]) -> Any:
    """The features output as a Dask frame of ``columns``, read by the workers."""
    import dask.dataframe as dd

    from core import storage

    path = features_path if storage.is_url(features_path) else str(Path(features_path).resolve())
    opts = storage.storage_options(path)
    return dd.read_parquet(path, columns=columns, storage_options=opts or None)


def fit_from_store(
    features_path: str,
    train_ids: list[str],
    n_rows: int,
    names: list[str],
    categories: dict[str, list[str]],
    params: dict[str, Any],
    num_rounds: int,
    config: TrainConfig,
    client: Any,
) -> Any:
    """Distributed fit on the training patients' rows, each worker reading its partitions;
    the booster. ``n_rows`` (the split's training rows) checks that the file is the one the
    client read. lightgbm.dask has no early stopping: ``num_rounds`` trees are grown."""
    ddf = read_store(features_path, ["patient_id", "label", *names])
    ddf = ddf[ddf["patient_id"].isin(train_ids)]
    X = ddf.map_partitions(prepared, names, categories, meta=prepared(ddf._meta, names, categories))
    y = ddf["label"].astype("int64")
    # rows per partition (the workers read patient_id and label only): a check, and LightGBM
    # refuses empty partitions
    lengths = client.compute(y.map_partitions(len)).result().tolist()
    if sum(lengths) != n_rows:
        raise ValueError(
            f"{features_path}: the workers found {sum(lengths):,} training rows, the split has "
            f"{n_rows:,} (the file changed since it was read?)"
        )
    keep = [i for i, n in enumerate(lengths) if n]
    if len(keep) < len(lengths):
        X, y = X.partitions[keep], y.partitions[keep]
    clf = dask_classifier(params, num_rounds, config, client)
    clf.fit(X, y, categorical_feature=list(categories) or "auto")
    return clf.booster_


def _score_part(
    part: pd.DataFrame, model_text: str, names: list[str], categories: dict[str, list[str]]
) -> pd.DataFrame:
    import lightgbm as lgb

    model = RiskModel(
        booster=lgb.Booster(model_str=model_text), feature_names=names, categories=categories
    )
    raw = model.raw_score(part) if len(part) else np.empty(0)
    out = part[KEYS].reset_index(drop=True)
    out["raw_score"] = raw
    return out


def score_rows(
    features_path: str,
    keys: pd.DataFrame,
    booster: Any,
    names: list[str],
    categories: dict[str, list[str]],
    train_ids: list[str],
    client: Any,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Raw scores of the rows ``keys`` (patient_id, time: the rows the client holds, in its
    order) and the signature's input example, computed by the workers in one read of the
    features output. The workers return the keys and one score per row, matched to ``keys``
    exactly (an error otherwise), and per partition the medians of its training rows; the
    example is their median (no individual's row leaves the workers)."""
    import dask

    ddf = read_store(features_path, [*KEYS, *names])
    ddf = ddf[ddf["patient_id"].isin(sorted(set(keys["patient_id"].astype(str))))]
    text = dask.delayed(booster.model_to_string())
    meta = pd.DataFrame(
        {
            "patient_id": pd.Series(dtype=ddf._meta["patient_id"].dtype),
            "time": pd.Series(dtype=ddf._meta["time"].dtype),
            "raw_score": pd.Series(dtype=float),
        }
    )
    scores = ddf.map_partitions(_score_part, text, names, categories, meta=meta)
    train = ddf[ddf["patient_id"].isin(train_ids)]
    medians = train.map_partitions(
        _part_median, names, categories, meta=prepared(ddf._meta, names, categories)
    )
    # one compute: both results share the partitions' reads
    got, per_part = client.compute([scores, medians], sync=True)
    example = per_part.median().reindex(names).fillna(0.0).to_frame().T.reset_index(drop=True)
    return align_scores(keys, got, features_path), example


def align_scores(keys: pd.DataFrame, scored: pd.DataFrame, where: str) -> np.ndarray:
    """``scored``'s raw scores in the order of ``keys``: both sorted stably by (patient, time),
    which keeps the file's order within equal keys on both sides, then compared key by key."""
    want = keys[KEYS].reset_index(drop=True)
    if len(scored) != len(want):
        raise ValueError(
            f"{where}: the workers scored {len(scored):,} rows, this process holds "
            f"{len(want):,} (the file changed since it was read?)"
        )
    order = want.sort_values(KEYS, kind="stable").index.to_numpy()
    got = scored.sort_values(KEYS, kind="stable", ignore_index=True)
    a, b = want.iloc[order].reset_index(drop=True), got[KEYS]
    same = (a["patient_id"].astype(str).to_numpy() == b["patient_id"].astype(str).to_numpy()) & (
        pd.to_datetime(a["time"], utc=True).to_numpy()
        == pd.to_datetime(b["time"], utc=True).to_numpy()
    )
    if not same.all():
        raise ValueError(
            f"{where}: the rows the workers scored are not the rows this process read "
            f"({int((~same).sum()):,} differ; the file changed since it was read?)"
        )
    out = np.empty(len(want))
    out[order] = got["raw_score"].to_numpy(dtype=float)
    return out


def _part_median(part: pd.DataFrame, names: list[str], categories: dict[str, list[str]]) -> Any:
    return prepared(part, names, categories).median().to_frame().T
