"""One-row-per-patient cohorts: censoring -> label at horizon, categorical covariates, same path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.cohort import label_at_horizon
from models.config import EvaluateConfig, TrainConfig
from models.evaluate import evaluate_predictions
from models.train import train_model
from tests.models.conftest import pseudonym

T0 = pd.Timestamp("2026-03-01 08:00", tz="UTC")


def test_labels_from_time_to_event_by_hand():
    cohort = pd.DataFrame(
        {
            "patient_id": [pseudonym(i) for i in range(6)],
            "time": [T0] * 6,
            "time_to_event_days": [5.0, 30.0, 45.0, 10.0, 30.0, 60.0],
            "event": [1, 1, 1, 0, 0, 0],
            "creatinine": [1.0, 2.0, 1.1, 0.9, 1.3, 0.8],
        }
    )
    res = label_at_horizon(cohort, horizon_days=30)
    got = dict(zip(res.frame["patient_id"], res.frame["label"], strict=True))
    assert got == {
        pseudonym(0): 1,  # event at day 5
        pseudonym(1): 1,  # event exactly at the horizon
        pseudonym(2): 0,  # event after the horizon
        pseudonym(4): 0,  # censored at the horizon: event-free through it
        pseudonym(5): 0,  # censored after the horizon
    }
    assert pseudonym(3) not in got  # censored at day 10: outcome at 30 days unknown
    assert (res.n_positive, res.n_negative, res.n_excluded_censored) == (2, 3, 1)
    assert "time_to_event_days" not in res.frame.columns and "event" not in res.frame.columns
    assert res.event_times[pseudonym(0)] == T0 + pd.Timedelta(days=5)
    assert list(res.frame.columns[:3]) == ["patient_id", "time", "label"]
    assert "event" in cohort.columns  # input not mutated


def test_cohort_rejects_duplicates_and_missing_columns():
    c = pd.DataFrame(
        {"patient_id": ["a", "a"], "time": [T0, T0], "time_to_event_days": [1, 2], "event": [0, 1]}
    )
    with pytest.raises(ValueError, match="one row per patient"):
        label_at_horizon(c, 30)
    with pytest.raises(ValueError, match="event"):
        label_at_horizon(c.drop(columns="event"), 30)


def _categorical_split_features(dump: dict) -> set[int]:
    found: set[int] = set()

    def walk(node: dict) -> None:
        if "split_feature" in node:
            if node.get("decision_type") == "==":
                found.add(node["split_feature"])
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in dump["tree_info"]:
        walk(tree["tree_structure"])
    return found


def make_cohort(n: int = 1500, seed: int = 0) -> pd.DataFrame:
    """Labs, static and categorical covariates; survival outcome with censoring."""
    rng = np.random.default_rng(seed)
    admission = rng.choice(["elective", "emergency", "transfer"], n, p=[0.5, 0.35, 0.15])
    lactate = rng.lognormal(0.3, 0.4, n)
    age = rng.normal(68, 12, n)
    hazard = 0.004 * np.exp(
        0.9 * (admission == "emergency") + 1.4 * (admission == "transfer") + 0.8 * (lactate - 1.4)
    )
    tte = rng.exponential(1 / hazard)
    censor = rng.uniform(5, 120, n)
    return pd.DataFrame(
        {
            "patient_id": [pseudonym(i, "cohort") for i in range(n)],
            "time": T0 + pd.to_timedelta(rng.integers(0, 24 * 200, n), unit="h"),
            "setting": "ward",
            "admission_type": admission,
            "lactate": lactate,
            "creatinine": rng.lognormal(0, 0.3, n),
            "age": age,
            "sex_f": rng.integers(0, 2, n).astype(float),
            "news2_total": np.clip(np.round(rng.normal(2, 1.5, n) + (lactate - 1.4)), 0, 20),
            "time_to_event_days": np.minimum(tte, censor),
            "event": (tte <= censor).astype(int),
        }
    )


def test_cohort_trains_and_evaluates_with_categorical_covariate():
    labelled = label_at_horizon(make_cohort(), horizon_days=30)
    frame = labelled.frame
    assert labelled.n_excluded_censored > 0 and frame["label"].sum() > 30
    cfg = TrainConfig(
        categorical_features=["admission_type"],
        cv_folds=0,
        min_child_samples=20,
        n_estimators=300,
    )
    r = train_model(frame, cfg)
    model = r.model
    assert "admission_type" in model.feature_names
    assert model.categories["admission_type"] == ["elective", "emergency", "transfer"]
    # LightGBM treats it as categorical: category-set splits ("==") on that feature
    cat_idx = model.feature_names.index("admission_type")
    assert _categorical_split_features(model.booster.dump_model()) == {cat_idx}
    # string categories score directly; an unseen category is treated as missing, not a crash
    probe = frame.head(3).assign(admission_type=["transfer", "elective", "unknown-ward"])
    p = model.predict_proba(probe)
    assert np.all((p >= 0) & (p <= 1))
    high = frame.head(200).assign(admission_type="transfer")
    low = frame.head(200).assign(admission_type="elective")
    assert model.predict_proba(high).mean() > model.predict_proba(low).mean()

    ev = evaluate_predictions(
        r.predictions(frame),
        EvaluateConfig(bootstrap_reps=30, subgroup_bootstrap_reps=20),
        r.threshold,
        10.0,
        labelled.event_times,
    ).metrics
    assert ev["exposure_unit"] == "patients"  # no cadence: burden per 100 patients
    assert ev["n_rows"] == ev["n_patients"]
    assert ev["model"]["auroc"] > 0.6
    assert ev["model"]["auroc_ci_low"] < ev["model"]["auroc"] < ev["model"]["auroc_ci_high"]
    lead = ev["alerts"]["model_at_budget"]
    assert "alerts_per_100_patients" in lead
    if lead["lead_time_n"]:
        assert lead["lead_time_hours_median"] > 0  # event days after the single prediction


def test_cohort_through_the_cli(mlflow_env, monkeypatch):
    import json

    import yaml

    from pipelines.cli import main

    monkeypatch.chdir(mlflow_env)
    make_cohort(n=1200, seed=1).to_parquet("cohort.parquet")
    params = {
        "train": {
            "cohort_horizon_days": 30,
            "categorical_features": ["admission_type"],
            "cv_folds": 0,
            "min_child_samples": 20,
        },
        "evaluate": {"bootstrap_reps": 10, "subgroup_bootstrap_reps": 0},
    }
    (mlflow_env / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--features", "cohort.parquet", "--out", "model"]) == 0
    run = json.loads((mlflow_env / "model" / "run.json").read_text())
    assert "admission_type" in run["feature_names"]
    assert "event_time" not in run["feature_names"]
    assert run["metadata"]["label"]["excluded_censored_before_horizon"] > 0
    args = ["evaluate", "--model-dir", "model", "--metrics", "m.json", "--plots", "pl"]
    assert main([*args, "--figures", "fig", "--card", "card.md"]) == 0
    metrics = json.loads((mlflow_env / "m.json").read_text())
    assert metrics["exposure_unit"] == "patients"
    rule = metrics["alerts"]["model_at_budget"]
    if rule["lead_time_n"]:
        assert rule["lead_time_hours_median"] > 0  # exact event times from the cohort
    # a cohort without the outcome columns fails with one clear line
    make_cohort(n=50).drop(columns="event").to_parquet("bad.parquet")
    assert main(["train", "--features", "bad.parquet", "--out", "model2"]) == 2
