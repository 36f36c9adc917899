"""``train.backend: dask``: lightgbm.dask on a 2-worker LocalCluster, end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.config import TrainConfig
from models.train import train_model

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        yield client


def write_parts(frame, tmp_path):
    """The frame as the Dask features stage writes it: a folder of 3 part files."""
    from features.build import write_features

    parts = tmp_path / "features.parquet"
    parts.mkdir()
    ids = sorted(frame["patient_id"].unique())
    for i, chunk in enumerate(np.array_split(np.array(ids, dtype=object), 3)):
        write_features(frame[frame["patient_id"].isin(chunk)], parts / f"part-{i:05d}.parquet")
    return parts, ids


def test_dask_training_on_local_cluster(frame, mlflow_env, client):
    from models import tracking

    cfg = TrainConfig(backend="dask", dask_workers=2, n_estimators=60, cv_folds=0)
    r = train_model(frame, cfg, client=client)
    assert r.best_iteration == 60
    test = frame[r.split.to_numpy() == "test"]
    p = r.model.predict_proba(test)
    assert p.shape == (len(test),) and np.all((p >= 0) & (p <= 1)) and len(np.unique(p)) > 2
    from models.metrics import auroc

    assert auroc(test["label"].to_numpy(), p) > 0.6
    # the distributed booster logs and reloads like a local one
    with tracking.start_run(run_name="dask"):
        uri = tracking.log_risk_model(r.model, test.head(5), mlflow_env / "w")
    import sys

    path = list(sys.path)
    reloaded = tracking.load_model(uri)
    np.testing.assert_allclose(reloaded.predict_proba(test), p)
    # MLflow's code folder (a partial copy of models/) is not left on sys.path, where Dask
    # workers and other processes started later would import it instead of the project
    assert sys.path == path


def test_workers_read_the_feature_parts_themselves(frame, tmp_path, client, monkeypatch):
    """``features_path``: the features stage's part files; the training rows never leave this
    process (``from_pandas`` is off), the workers read them; the same split and calibration."""
    import dask.dataframe as dd

    from features.build import write_features
    from features.io import read_features

    parts, ids = write_parts(frame, tmp_path)
    read = read_features(parts)
    assert len(read) == len(frame)

    def refuse(*args, **kwargs):
        raise AssertionError("training rows sent from the client")

    monkeypatch.setattr(dd, "from_pandas", refuse)
    cfg = TrainConfig(backend="dask", dask_workers=2, n_estimators=40, cv_folds=0)
    r = train_model(read, cfg, client=client, features_path=str(parts))
    assert r.best_iteration == 40 and r.model.metadata["n_train_rows"] > 0
    test = read[r.split.to_numpy() == "test"]
    from models.metrics import auroc

    assert auroc(test["label"].to_numpy(), r.model.predict_proba(test)) > 0.6
    # a file that lost rows since the client read it: stop, naming the file
    short = read[read["patient_id"] != ids[0]]
    lost = tmp_path / "short.parquet"
    write_features(short, lost)
    with pytest.raises(ValueError, match=r"short\.parquet: the workers found"):
        train_model(read, cfg, client=client, features_path=str(lost))


def test_client_reads_only_the_row_keys_and_the_workers_score(frame, tmp_path, client, monkeypatch):
    """Near the data: this process holds the row keys, the label and NEWS2 (no feature
    column); the workers fit, score every row and compute the input example. Their scores
    are the booster's own on the full matrix, in this process's row order."""
    import dask.dataframe as dd

    from features.io import feature_schema, read_features
    from pipelines.train import key_columns

    parts, ids = write_parts(frame, tmp_path)
    full = read_features(parts)
    cfg = TrainConfig(backend="dask", dask_workers=2, n_estimators=30, cv_folds=0)
    keys = read_features(parts, columns=key_columns(cfg))
    assert set(keys.columns) <= {*key_columns(cfg)} and "news2_total" in keys
    assert len(keys.columns) < 10 < len(full.columns)

    def refuse(*args, **kwargs):
        raise AssertionError("rows sent from the client")

    monkeypatch.setattr(dd, "from_pandas", refuse)
    # consent or any filter on the client: the workers score exactly the rows it kept
    keys = keys[keys["patient_id"] != ids[1]].reset_index(drop=True)
    r = train_model(
        keys, cfg, client=client, features_path=str(parts), schema=feature_schema(parts)
    )
    kept = full[full["patient_id"] != ids[1]].reset_index(drop=True)
    assert r.model.feature_names == train_model_names(kept, cfg)
    assert r.scored is not None and len(r.scored) == len(keys)
    np.testing.assert_array_equal(r.scored, r.model.raw_score(kept))
    preds = r.predictions(keys)
    assert len(preds) == len(keys) and preds["prob"].between(0, 1).all()
    assert r.example is not None and list(r.example.columns) == r.model.feature_names
    assert len(r.example) == 1 and np.isfinite(r.example.to_numpy()).all()
    # the calibrator was fitted on the validation rows' worker scores
    va = r.split.to_numpy() == "val"
    np.testing.assert_allclose(
        r.model.predict_proba(kept[va]), r.model.calibrator.transform(r.scored[va])
    )
    # rows that are not in the file (it changed since it was read): stop, naming it
    extra = keys.copy()
    extra.loc[0, "time"] = extra.loc[0, "time"] + pd.Timedelta(minutes=1)
    with pytest.raises(ValueError, match=r"features\.parquet: the rows the workers scored"):
        train_model(
            extra, cfg, client=client, features_path=str(parts), schema=feature_schema(parts)
        )


def train_model_names(frame, cfg):
    from models.train import select_features

    return select_features(frame, cfg)[0]
