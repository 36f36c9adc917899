"""Models benchmark: training, evaluation (with patient bootstrap) and scoring latency.

Figures on a synthetic feature matrix shaped like the features stage output (N patients x
rows per patient, ``BENCH_MODELS_FEATURES`` float features; default 2000 x 50 x 100 = 100k rows):
- ``train_seconds`` / ``train_rows_per_s``: ``models.train.train_model`` (patient split,
  early stopping, sigmoid calibration, 3-fold grouped CV), one thread, deterministic.
- ``evaluate_seconds``: ``models.evaluate.evaluate_predictions`` with 200 patient-bootstrap
  replicates (model vs NEWS2, alert rules, subgroups, plot data).
- ``score_1_row_ms`` / ``score_1000_rows_ms``: ``RiskModel.predict_proba`` (median of repeats);
  ``contrib_1_row_ms``: ``RiskModel.contributions`` (SHAP via pred_contrib) for one row.
- ``log_model_seconds`` / ``load_model_seconds``: MLflow pyfunc log + load on a SQLite store.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd


def synthetic(n_patients: int, rows: int, n_features: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_patients * rows
    pid = np.repeat([f"p_{i:020x}" for i in range(n_patients)], rows)
    frail = np.repeat(rng.normal(size=n_patients), rows)
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    time_ = t0 + pd.to_timedelta(np.tile(np.arange(rows), n_patients), unit="h")
    z = frail * 0.6 + rng.normal(scale=0.8, size=n)
    X = rng.normal(size=(n, n_features)).astype("float32")
    X[:, :5] += z[:, None].astype("float32") * np.array([1.0, 0.8, -0.6, 0.5, 0.3], "float32")
    f = pd.DataFrame(X, columns=[f"f{i:03d}" for i in range(n_features)])
    news2 = np.clip(np.round(2 + 2 * z + rng.normal(size=n)), 0, 20)
    label = (rng.random(n) < 1 / (1 + np.exp(-(-4.5 + 1.4 * z)))).astype(int)
    head = pd.DataFrame(
        {
            "patient_id": pid,
            "time": time_,
            "setting": "ward",
            "label": label,
            "news2_total": news2,
            "age": np.repeat(rng.normal(65, 14, n_patients), rows),
            "sex_f": np.repeat(rng.integers(0, 2, n_patients), rows).astype(float),
        }
    )
    return pd.concat([head, f], axis=1)


def _median_ms(fn: Any, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(out), 3)


def main() -> dict[str, Any]:
    from models.config import EvaluateConfig, TrainConfig
    from models.evaluate import evaluate_predictions
    from models.train import train_model

    n_pat = int(os.environ.get("BENCH_MODELS_PATIENTS", 2000))
    rows = int(os.environ.get("BENCH_MODELS_ROWS", 50))
    n_feat = int(os.environ.get("BENCH_MODELS_FEATURES", 100))
    frame = synthetic(n_pat, rows, n_feat)
    res: dict[str, Any] = {"rows": len(frame), "patients": n_pat, "features": n_feat + 3}

    t = time.perf_counter()
    r = train_model(frame, TrainConfig(cv_folds=3))
    res["train_seconds"] = round(time.perf_counter() - t, 2)
    res["train_rows_per_s"] = round(len(frame) / res["train_seconds"])
    res["trees"] = r.best_iteration
    preds = r.predictions(frame)

    t = time.perf_counter()
    ev = evaluate_predictions(preds, EvaluateConfig(bootstrap_reps=200), r.threshold, 10.0)
    res["evaluate_seconds"] = round(time.perf_counter() - t, 2)
    res["test_auroc_model"] = round(ev.metrics["model"]["auroc"], 4)
    res["test_auroc_news2"] = round(ev.metrics["news2"]["auroc"], 4)

    one, thousand = frame.head(1), frame.head(1000)
    r.model.predict_proba(one)
    res["score_1_row_ms"] = _median_ms(lambda: r.model.predict_proba(one), 200)
    res["score_1000_rows_ms"] = _median_ms(lambda: r.model.predict_proba(thousand), 20)
    res["contrib_1_row_ms"] = _median_ms(lambda: r.model.contributions(one), 100)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlruns.db"
        from models import tracking

        tracking.ensure_experiment("bench")
        t = time.perf_counter()
        with tracking.start_run("bench"):
            uri = tracking.log_risk_model(r.model, frame.head(5), tmp)
        res["log_model_seconds"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        tracking.load_model(uri)
        res["load_model_seconds"] = round(time.perf_counter() - t, 2)
    for k, v in res.items():
        print(f"{k:>22}: {v}")
    return res
