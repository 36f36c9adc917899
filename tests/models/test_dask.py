"""``train.backend: dask``: lightgbm.dask on a 2-worker LocalCluster, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from models.config import TrainConfig
from models.train import train_model

pytest.importorskip("distributed")


def test_dask_training_on_local_cluster(frame, mlflow_env):
    from distributed import Client, LocalCluster

    from models import tracking

    cfg = TrainConfig(backend="dask", dask_workers=2, n_estimators=60, cv_folds=0)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
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
