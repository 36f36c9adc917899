"""``train.backend: dask``: lightgbm.dask on a 2-worker LocalCluster, end to end."""

from __future__ import annotations

import numpy as np
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
    reloaded = tracking.load_model(uri)
    np.testing.assert_allclose(reloaded.predict_proba(test), p)


def test_workers_read_the_feature_parts_themselves(frame, tmp_path, client, monkeypatch):
    """``features_path``: the features stage's part files; the training rows never leave this
    process (``from_pandas`` is off), the workers read them; the same split and calibration."""
    import dask.dataframe as dd

    from features.build import write_features
    from features.io import read_features

    parts = tmp_path / "features.parquet"
    parts.mkdir()
    ids = sorted(frame["patient_id"].unique())
    for i, chunk in enumerate(np.array_split(np.array(ids, dtype=object), 3)):
        write_features(frame[frame["patient_id"].isin(chunk)], parts / f"part-{i:05d}.parquet")
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
