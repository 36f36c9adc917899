"""MLflow of the team stack: runs in PostgreSQL, artifacts in the object store, via models.tracking."""

from __future__ import annotations

import json
import os

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from models import tracking
from models.pyfunc import Calibrator, RiskModel
from ops.services import pg_database, s3_client
from ops.settings import TeamSettings

pytestmark = pytest.mark.slow


def _tiny_model() -> tuple[RiskModel, pd.DataFrame]:
    """A real (tiny) LightGBM risk model: higher heart rate, higher risk."""
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"heart_rate": rng.normal(85, 15, 400), "spo2": rng.normal(95, 2, 400)})
    y = (X["heart_rate"] + rng.normal(0, 10, 400) > 95).astype(int)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_leaves": 4, "seed": 0},
        lgb.Dataset(X, y),
        num_boost_round=20,
    )
    model = RiskModel(
        booster=booster,
        calibrator=Calibrator(method="none"),
        feature_names=list(X.columns),
        metadata={"label_horizon_hours": 24},
    )
    return model, X.head(5)


def test_run_artifact_and_model_version_live_in_postgres_and_s3(
    team_client_env: TeamSettings, tmp_path
):
    import psycopg

    settings = team_client_env
    model, example = _tiny_model()
    with tracking.start_run(experiment="team-mode-test", run_name="tiny") as run:
        tracking.log_params({"num_leaves": 4})
        tracking.log_metrics({"auroc": 0.9})
        tracking.log_dict({"hello": "object store"}, "notes/hello.json")
        uri = tracking.log_risk_model(model, example, tmp_path / "work")
        run_id = run.info.run_id
    version = tracking.register_version(uri, "team-mode-test-model")
    tracking.set_alias("team-mode-test-model", "champion", version, "tester", "team-mode test")

    # the run and the registered version are rows of the session's PostgreSQL database
    with psycopg.connect(settings.pg_url, connect_timeout=5) as conn:
        (status,) = conn.execute(
            "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)
        ).fetchone()
        (n_versions,) = conn.execute(
            "SELECT count(*) FROM model_versions WHERE name = %s", ("team-mode-test-model",)
        ).fetchone()
    assert status == "FINISHED" and n_versions == 1
    assert pg_database(settings.pg_url).startswith("vitalrisk_test_")

    # the artifact is an object in the bucket, under the server's artifacts destination
    s3 = s3_client(settings, os.environ)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix="mlflow/").get("Contents", [])
    ]
    (note_key,) = [k for k in keys if k.endswith(f"{run_id}/artifacts/notes/hello.json")]
    body = s3.get_object(Bucket=settings.s3_bucket, Key=note_key)["Body"].read()
    assert json.loads(body) == {"hello": "object store"}
    assert any(k.endswith("booster.txt") for k in keys), "model artifacts not in the bucket"

    # and the registry serves the model back (through the server's artifact proxy)
    loaded, risk = tracking.load_by_alias("team-mode-test-model", "champion")
    assert loaded.version == version and loaded.run_id == run_id
    np.testing.assert_allclose(risk.predict_proba(example), model.predict_proba(example))
