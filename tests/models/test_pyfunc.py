"""The logged pyfunc returns calibrated probabilities (not labels) after a real MLflow round trip."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from models import tracking
from models.config import TrainConfig
from models.pyfunc import RiskModel
from models.train import train_model


@pytest.fixture(scope="module")
def trained(frame):
    return train_model(frame, TrainConfig(cv_folds=0))


def test_roundtrip_through_sqlite_store(trained, frame, mlflow_env):
    model = trained.model
    with tracking.start_run(run_name="t") as run:
        uri = tracking.log_risk_model(model, frame.head(5), mlflow_env / "work")
    # artifacts land beside the DB, not in ./mlruns of the cwd
    assert (mlflow_env / "mlartifacts").is_dir()
    exp = mlflow.get_experiment(run.info.experiment_id)
    assert exp.artifact_location.startswith((mlflow_env / "mlartifacts").as_uri())

    pf = mlflow.pyfunc.load_model(uri)
    X = frame.head(200)
    p = np.asarray(pf.predict(X[model.feature_names]))
    assert p.shape == (200,)
    assert np.all((p >= 0) & (p <= 1))
    assert len(np.unique(p)) > 2, "pyfunc must return probabilities, not 0/1 labels"
    np.testing.assert_allclose(p, model.predict_proba(X), rtol=1e-9)

    py = pf.unwrap_python_model()
    assert isinstance(py, RiskModel)
    assert py.feature_names == model.feature_names
    contrib = py.contributions(X)
    assert contrib.shape == (200, len(model.feature_names) + 1)
    # SHAP contributions + bias add up to the raw margin the calibrator maps
    np.testing.assert_allclose(contrib.sum(axis=1), py.raw_score(X), rtol=1e-6, atol=1e-6)
    assert py.metadata["threshold"] == pytest.approx(trained.threshold)


def test_registry_alias_load(trained, frame, mlflow_env):
    with tracking.start_run(run_name="t"):
        uri = tracking.log_risk_model(trained.model, frame.head(5), mlflow_env / "w")
    version = tracking.register_version(uri, "m")
    with pytest.raises(LookupError):
        tracking.load_by_alias("m", "champion")
    tracking.set_alias("m", "champion", version, "tester", "because")
    info, model = tracking.load_by_alias("m", "champion")
    assert info.version == version and info.alias == "champion"
    assert info.tags["champion.actor"] == "tester"
    assert info.tags["champion.reason"] == "because"
    p = model.predict_proba(frame.head(50))
    np.testing.assert_allclose(p, trained.model.predict_proba(frame.head(50)))


def test_missing_feature_column_is_named(trained, frame):
    with pytest.raises(ValueError, match="resp_rate"):
        trained.model.predict_proba(frame.drop(columns="resp_rate").head())


def test_calibrated_probabilities_match_event_rate(trained, frame):
    """scale_pos_weight inflates raw scores; after calibration the mean risk ~ prevalence."""
    test = frame[trained.split.to_numpy() == "test"]
    p = trained.model.predict_proba(test)
    raw = 1 / (1 + np.exp(-trained.model.raw_score(test)))
    prevalence = test["label"].mean()
    assert abs(p.mean() - prevalence) < 0.03
    assert raw.mean() > p.mean() + 0.1, "uncalibrated scores should be inflated by the weighting"
