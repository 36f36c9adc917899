"""A tiny but real champion for service tests and the serving benchmark.

Synthetic patients -> the training feature code (``features.build.compute_features``) ->
LightGBM + calibration wrapped in ``RiskModel`` -> logged and registered with
``models.tracking`` (champion, and a second fit as challenger for shadow scoring).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

END = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
VITALS = ("heart_rate", "resp_rate", "spo2", "sbp", "body_temp")


def synthetic_cohort(
    n: int = 120, seed: int = 0, hours: int = 24
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(observations, patients, times, labels): sick patients breathe faster, desaturate."""
    from governance.pseudonym import DEMO_KEY, pseudonymise

    rng = np.random.default_rng(seed)
    obs: list[dict[str, Any]] = []
    pats: list[dict[str, Any]] = []
    labels = (rng.random(n) < 0.3).astype(int)
    for i in range(n):
        pid = pseudonymise(f"patient-{seed}-{i}", DEMO_KEY.encode())
        sick = labels[i] == 1
        base = {
            "heart_rate": rng.normal(95 if sick else 75, 8),
            "resp_rate": rng.normal(24 if sick else 15, 2),
            "spo2": rng.normal(92 if sick else 97, 1.5),
            "sbp": rng.normal(105 if sick else 125, 10),
            "body_temp": rng.normal(38.0 if sick else 36.8, 0.3),
        }
        for h in range(hours):
            t = END - timedelta(hours=hours - 1 - h)
            for code in VITALS:
                v = base[code] + rng.normal(0, 1.0)
                if code == "spo2":
                    v = min(v, 100.0)
                obs.append(
                    {
                        "patient_id": pid,
                        "time": t,
                        "code": code,
                        "value": float(v),
                        "source": "ward",
                    }
                )
            obs.append(
                {
                    "patient_id": pid,
                    "time": t,
                    "code": "consciousness",
                    "value": 0.0,
                    "source": "ward",
                }
            )
            obs.append(
                {
                    "patient_id": pid,
                    "time": t,
                    "code": "o2_support",
                    "value": float(sick and h % 2 == 0),
                    "source": "ward",
                }
            )
        pats.append(
            {
                "patient_id": pid,
                "setting": "ward",
                "age": float(rng.integers(30, 90)),
                "sex": "F" if i % 2 else "M",
                "followup_start": END - timedelta(days=3),
                "followup_end": END,
                "consent_care": True,
                "consent_model_training": True,
                "consent_research": True,
            }
        )
    observations = pd.DataFrame(obs)
    observations["time"] = pd.to_datetime(observations["time"], utc=True)
    patients = pd.DataFrame(pats)
    for c in ("followup_start", "followup_end"):
        patients[c] = pd.to_datetime(patients[c], utc=True)
    times = pd.DataFrame({"patient_id": patients["patient_id"], "time": pd.Timestamp(END)})
    return (
        observations.sort_values(["patient_id", "time", "code"]).reset_index(drop=True),
        patients,
        times,
        labels,
    )


def feature_frame(seed: int = 0, n: int = 120) -> pd.DataFrame:
    from core.vocabulary import load_vocabulary
    from features.build import compute_features
    from features.config import FeaturesConfig

    obs, patients, times, labels = synthetic_cohort(n, seed)
    frame = compute_features(obs, patients, times, FeaturesConfig(), load_vocabulary())
    lab = dict(zip(patients["patient_id"], labels, strict=True))
    frame["label"] = frame["patient_id"].map(lab).astype(int)
    return frame


def fit_risk_model(frame: pd.DataFrame, seed: int = 0, rounds: int = 40) -> Any:
    import lightgbm as lgb

    from models.pyfunc import Calibrator, RiskModel

    ids = {"patient_id", "time", "setting", "label"}
    names = [c for c in frame.columns if c not in ids and pd.api.types.is_numeric_dtype(frame[c])]
    X = frame[names].astype(float)
    y = frame["label"].to_numpy()
    params = {
        "objective": "binary",
        "num_leaves": 7,
        "min_data_in_leaf": 5,
        "learning_rate": 0.1,
        "verbose": -1,
        "seed": seed,
        "num_threads": 1,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
    }
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=rounds)
    model = RiskModel(booster=booster, feature_names=names)
    model.calibrator = Calibrator("sigmoid").fit(booster.predict(X, raw_score=True), y)
    model.metadata = {"thresholds": fitted_thresholds(model, frame).as_dict()}
    return model


def fitted_thresholds(model: Any, frame: pd.DataFrame) -> Any:
    """The thresholds train fits (``models.thresholds.fit_thresholds``), on this frame."""
    from models.metrics import Exposure
    from models.thresholds import fit_thresholds

    p = model.predict_proba(frame)
    return fit_thresholds(p, Exposure.of(frame[["patient_id", "time"]]), 10.0, 30.0)


def register_models(
    workdir: Path, model_name: str = "vitalrisk-deterioration", challenger: bool = True
) -> dict[str, Any]:
    """Train, log and register champion (and challenger); MLFLOW_TRACKING_URI must be set."""
    from models import tracking

    frame = feature_frame(seed=0)
    out: dict[str, Any] = {"frame": frame}
    for role, seed in [("champion", 0), ("challenger", 1)][: 2 if challenger else 1]:
        model = fit_risk_model(frame, seed=seed, rounds=40 if role == "champion" else 25)
        with tracking.start_run(run_name=f"test-{role}") as run:
            tracking.log_params({"training_data_hash": f"md5-test-{seed}"})
            tracking.log_metrics({"test_auroc": 0.9, "test_auprc": 0.8})
            uri = tracking.log_risk_model(model, frame.head(5), workdir / role)
        version = tracking.register_version(uri, model_name)
        tracking.set_alias(model_name, role, version, actor="tests", reason="fixture")
        out[role] = (version, model, run.info.run_id)
    return out
