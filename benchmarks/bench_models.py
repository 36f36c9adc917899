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
- ``compiled``: a demo-sized champion (235 trees, 317 features, 15 leaves) scored by LightGBM
  and by its tl2cgen-compiled library (``models.compiled``; compile time, parity and the
  speed-up for 1 and 1,000 rows on one thread), and ``RiskModel.predict_proba`` on a one-row
  DataFrame against the array path (``predict_proba_matrix``) the service uses.
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


def compiled_scoring(repeats: int = 200) -> dict[str, Any]:
    """LightGBM vs compiled trees on a demo-sized champion (see the module docstring)."""
    import lightgbm as lgb

    from models.pyfunc import Calibrator, RiskModel

    rng = np.random.default_rng(1)
    X = rng.normal(size=(20000, 317))
    X[rng.random(X.shape) < 0.2] = np.nan
    y = (np.nan_to_num(X[:, :6]).sum(axis=1) + rng.normal(size=20000) > 3).astype(int)
    params = {"objective": "binary", "num_leaves": 15, "verbosity": -1, "seed": 2}
    booster = lgb.train(params, lgb.Dataset(X, label=y), num_boost_round=235)
    names = [f"f{i:03d}" for i in range(317)]
    model = RiskModel(booster=booster, feature_names=names, calibrator=Calibrator("none"))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ok = model.compile_trees(tmp)
        compile_s = time.perf_counter() - t
        out: dict[str, Any] = {"trees": booster.num_trees(), "features": 317, "compiled": ok}
        out["compile_seconds"] = round(compile_s, 1)
        if not ok:
            return out
        trees = model.compiled
        for n in (1, 1000):
            rows = X[:n]
            reps = repeats if n == 1 else max(10, repeats // 10)
            lgb_ms = _median_ms(
                lambda r=rows: booster.predict(r, raw_score=True, num_threads=1), reps
            )
            tl_ms = _median_ms(lambda r=rows: trees.raw_score(r), reps)
            out[f"lightgbm_{n}_rows_ms"] = lgb_ms
            out[f"compiled_{n}_rows_ms"] = tl_ms
            out[f"speedup_{n}_rows"] = round(lgb_ms / tl_ms, 2)
        out["bit_identical_1000_rows"] = bool(
            np.array_equal(trees.raw_score(X[:1000]), booster.predict(X[:1000], raw_score=True))
        )
        one = pd.DataFrame(X[:1], columns=names)
        out["predict_proba_frame_1_row_ms"] = _median_ms(lambda: model.predict_proba(one), repeats)
        out["predict_proba_matrix_1_row_ms"] = _median_ms(
            lambda: model.predict_proba_matrix(X[:1], threads=1), repeats
        )
    return out


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
    res["compiled"] = compiled_scoring()
    for k, v in res.items():
        print(f"{k:>22}: {v}")
    return res
