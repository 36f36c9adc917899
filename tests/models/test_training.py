"""Training: patient-disjoint splits, determinism, early stopping, model behaviour."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.config import EvaluateConfig, SplitConfig, TrainConfig
from models.evaluate import evaluate_predictions
from models.splits import assign_splits, grouped_folds
from models.train import select_features, train_model

FAST = TrainConfig(cv_folds=0, n_estimators=200)


@pytest.mark.parametrize("method", ["patient", "temporal"])
def test_splits_are_patient_disjoint(frame, method):
    split = assign_splits(frame, SplitConfig(method=method), seed=1)
    per_patient = split.groupby(frame["patient_id"]).nunique()
    assert (per_patient == 1).all(), "a patient appears in two splits"
    assert set(split) == {"train", "val", "test"}
    n_test = frame.loc[split == "test", "patient_id"].nunique()
    assert n_test == pytest.approx(0.25 * frame["patient_id"].nunique(), abs=2)


def test_temporal_split_tests_on_later_patients(frame):
    split = assign_splits(frame, SplitConfig(method="temporal"), seed=1)
    first = frame.groupby("patient_id")["time"].min()
    pid_split = split.groupby(frame["patient_id"]).first()
    assert first[pid_split == "test"].min() >= first[pid_split != "test"].max()


def test_grouped_cv_folds_are_patient_disjoint(frame):
    for tr, te in grouped_folds(frame, 3, seed=0):
        assert not set(frame["patient_id"].iloc[tr]) & set(frame["patient_id"].iloc[te])


def test_feature_selection_excludes_ids_and_label(frame):
    names, cats = select_features(frame, TrainConfig())
    assert "label" not in names and "patient_id" not in names and "setting" not in names
    assert {"news2_total", "age", "sex_f", "resp_rate"} <= set(names)
    assert cats == {}
    with pytest.raises(ValueError, match="nope"):
        select_features(frame, TrainConfig(features=["nope"]))


def test_identical_metrics_on_rerun(frame):
    cfg = TrainConfig(cv_folds=2, n_estimators=150)
    a, b = train_model(frame, cfg), train_model(frame, cfg)
    assert a.model.booster.model_to_string() == b.model.booster.model_to_string()
    assert a.cv == b.cv and a.val_metrics == b.val_metrics and a.threshold == b.threshold
    ev = EvaluateConfig(bootstrap_reps=20, subgroup_bootstrap_reps=0)
    ma = evaluate_predictions(a.predictions(frame), ev, a.threshold, 10).metrics
    mb = evaluate_predictions(b.predictions(frame), ev, b.threshold, 10).metrics
    assert ma["model"] == mb["model"] and ma["delta"] == mb["delta"]
    c = train_model(frame, cfg.model_copy(update={"seed": 7}))
    assert c.model.booster.model_to_string() != a.model.booster.model_to_string()


def test_early_stopping_limits_trees(frame):
    r = train_model(frame, TrainConfig(cv_folds=0, n_estimators=2000, early_stopping_rounds=10))
    assert r.best_iteration < 2000
    assert r.model.booster.current_iteration() == r.best_iteration


def test_model_beats_chance_and_news2_on_informative_data():
    from tests.models.conftest import make_frame

    f = make_frame(n_patients=400, seed=5, signal=1.5)
    r = train_model(f, FAST)
    m = evaluate_predictions(
        r.predictions(f),
        EvaluateConfig(bootstrap_reps=0, subgroup_bootstrap_reps=0),
        r.threshold,
        10,
    )
    assert m.metrics["model"]["auroc"] > 0.7
    assert m.metrics["model"]["auroc"] > m.metrics["news2"]["auroc"]


@pytest.mark.parametrize(
    ("column", "worse", "used"),
    [
        ("resp_rate", +6.0, True),
        ("spo2", -5.0, True),
        ("heart_rate", +30.0, True),
        ("news2_total", +4.0, False),  # redundant with the vitals here: may be unused
    ],
)
def test_worse_vitals_do_not_lower_risk(frame, column, worse, used):
    """Directional behaviour: deteriorating one vital sign must not reduce predicted risk."""
    cfg = TrainConfig(
        cv_folds=0,
        n_estimators=200,
        monotone_constraints={"resp_rate": 1, "spo2": -1, "heart_rate": 1, "news2_total": 1},
    )
    r = _cached_model(frame, cfg)
    base = frame[r.split.to_numpy() == "test"].copy()
    bad = base.copy()
    bad[column] = bad[column] + worse
    p0, p1 = r.model.predict_proba(base), r.model.predict_proba(bad)
    assert np.all(p1 >= p0 - 1e-12), f"worse {column} lowered risk for {(p1 < p0).sum()} rows"
    if used:
        assert p1.mean() > p0.mean()


_CACHE: dict[str, object] = {}


def _cached_model(frame: pd.DataFrame, cfg: TrainConfig):  # type: ignore[no-untyped-def]
    key = cfg.model_dump_json()
    if key not in _CACHE:
        _CACHE[key] = train_model(frame, cfg)
    return _CACHE[key]


def test_unconstrained_model_is_directionally_right_on_average(frame):
    r = _cached_model(frame, FAST)
    base = frame[r.split.to_numpy() == "test"]
    bad = base.assign(resp_rate=base["resp_rate"] + 6, spo2=base["spo2"] - 4)
    assert r.model.predict_proba(bad).mean() > r.model.predict_proba(base).mean()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns="label"), "label"),
        (lambda f: f.assign(label=2), "0/1"),
        (lambda f: f.assign(label=0), "single class"),
    ],
)
def test_bad_frames_fail_clearly(frame, mutate, message):
    with pytest.raises(ValueError, match=message):
        train_model(mutate(frame), FAST)


def test_class_weighting_options(frame):
    for imbalance in ("none", "is_unbalance"):
        r = train_model(frame, FAST.model_copy(update={"imbalance": imbalance}))
        assert 0 < r.model.predict_proba(frame.head(20)).max() <= 1


def test_thresholds_are_fitted_with_the_model_and_travel_inside_it(frame):
    """Bands and the alert come from the model: ``high`` is the alert-budget threshold of the
    validation patients, ``low`` the wider watch budget's, both in the pickled metadata."""
    import pickle

    from models.metrics import Exposure, cadence_hours
    from models.thresholds import band_of, fit_thresholds, model_thresholds

    r = _cached_model(frame, FAST)
    t = model_thresholds(pickle.loads(pickle.dumps(r.model)).metadata)
    assert t is not None and t.high == r.threshold and 0 < t.low <= t.high
    va = frame[r.split.to_numpy() == "val"]
    p = r.model.predict_proba(va)
    exposure = Exposure.of(va[["patient_id", "time"]], cadence_hours(frame))
    assert exposure.rate(float((p >= t.high).sum())) <= FAST.alert_budget_per_100_patient_days
    assert exposure.rate(float((p >= t.low).sum())) <= FAST.watch_budget_per_100_patient_days
    assert band_of(t.high, t) == "high" and band_of(t.low, t) == "medium"
    # a narrower watch budget than the alert budget is refused by name
    with pytest.raises(ValueError, match="watch_budget"):
        TrainConfig(alert_budget_per_100_patient_days=10, watch_budget_per_100_patient_days=5)
    with pytest.raises(ValueError, match="watch_budget"):
        fit_thresholds(p, exposure, 10, 5)
