"""Training and evaluation at real-data scale: 650 k rows x 312 float32 features, ~1% positives.

The shape of the features stage's output on a PhysioNet-2019-sized cohort (20,000 ICU
patients, hourly rows). Each part runs in a fresh subprocess, so its peak memory is its own:

- ``train``: ``models.train.train_model`` with the project's params (patient split, early
  stopping, 3-fold grouped CV, sigmoid calibration) on the table read from Parquet as the
  train stage does, then the predictions table of every row. Figures: wall and CPU seconds
  (``getrusage``; wall within 1.5x CPU and under 120 s is the target), peak RSS against the
  table's in-memory size (target < 3x).
- ``evaluate``: ``models.evaluate.evaluate_predictions`` on those predictions with 200
  patient-bootstrap replicates (target < 20 s).

Knobs: ``BENCH_SCALE_PATIENTS`` (20000), ``BENCH_SCALE_ROWS`` (650000),
``BENCH_SCALE_FEATURES`` (312), ``BENCH_SCALE_THREADS`` (2: LightGBM threads; results are
deterministic for a given thread count; children run with ``OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def synthetic_table(n_patients: int, n_rows: int, n_features: int, seed: int = 3) -> pd.DataFrame:
    """Hourly rows per patient, float32 features (a few informative, most noise, some NaN),
    ~1% positive rows (the last hours before an event of ~6% of patients)."""
    rng = np.random.default_rng(seed)
    per = rng.multinomial(n_rows - n_patients, np.full(n_patients, 1 / n_patients)) + 1
    pid = np.repeat(np.array([f"p_{i:020x}" for i in range(n_patients)], dtype=object), per)
    start = np.repeat(rng.integers(0, 90 * 24, n_patients), per)
    hour = np.arange(n_rows) - np.repeat(np.cumsum(per) - per, per)
    t = pd.to_datetime((1_767_225_600 + (start + hour) * 3600) * 1_000_000_000, utc=True).as_unit(
        "ns"
    )
    frail = np.repeat(rng.normal(size=n_patients), per).astype(np.float32)
    event = np.repeat(rng.random(n_patients) < 0.06, per)
    to_end = np.repeat(per, per) - hour
    label = (event & (to_end <= 6)).astype(np.int64)
    z = frail + np.where(event, 1.5 / np.maximum(to_end, 1), 0).astype(np.float32)
    X = rng.standard_normal((n_rows, n_features), dtype=np.float32)
    X[:, :8] += z[:, None] * np.linspace(1.0, 0.3, 8, dtype=np.float32)
    X[rng.random((n_rows, n_features)) < 0.05] = np.nan
    cols = {f"f{j:03d}": X[:, j] for j in range(n_features - 3)}
    head = {
        "patient_id": pid,
        "time": t,
        "setting": np.where(np.repeat(np.arange(n_patients) % 4 == 0, per), "home", "ward"),
        "label": label,
        "news2_total": np.clip(np.round(2 + 2 * z + rng.normal(size=n_rows)), 0, 20).astype(
            np.float32
        ),
        "age": np.repeat(rng.normal(65, 14, n_patients), per).astype(np.float32),
        "sex_f": np.repeat(rng.integers(0, 2, n_patients), per).astype(np.float32),
    }
    return pd.DataFrame({**head, **cols}, copy=False)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(part: str, table: str, preds: str) -> dict[str, Any]:
    """One timed part in this (fresh) process."""
    from models.config import EvaluateConfig, TrainConfig

    params = _params()
    out: dict[str, Any] = {}
    if part == "train":
        from models.train import train_model

        config = TrainConfig.model_validate(
            {
                **params.get("train", {}),
                "num_threads": int(os.environ.get("BENCH_SCALE_THREADS", 2)),
            }
        )
        from features.io import read_features

        c0, t0 = _cpu(), time.perf_counter()
        frame = read_features(table)
        out["read_seconds"] = time.perf_counter() - t0
        result = train_model(frame, config)
        result.predictions(frame).to_parquet(preds, index=False)
        out.update(
            seconds=time.perf_counter() - t0,
            cpu_seconds=_cpu() - c0,
            trees=result.best_iteration,
            cv=result.cv,
            val=result.val_metrics,
        )
    else:
        from models.evaluate import evaluate_predictions

        config = EvaluateConfig.model_validate(
            {**params.get("evaluate", {}), "bootstrap_reps": 200}
        )
        pred = pd.read_parquet(preds)
        c0, t0 = _cpu(), time.perf_counter()
        ev = evaluate_predictions(pred, config, float(pred["prob"].quantile(0.99)), 10.0)
        out.update(
            seconds=time.perf_counter() - t0,
            cpu_seconds=_cpu() - c0,
            test_auroc=ev.metrics["model"]["auroc"],
            test_auroc_ci=[
                ev.metrics["model"].get("auroc_ci_low"),
                ev.metrics["model"].get("auroc_ci_high"),
            ],
        )
    from benchmarks.bench_features import peak_rss_mb

    out["peak_rss_mb"] = peak_rss_mb()  # (VmHWM: ru_maxrss would include the parent's)
    out["loadavg_1min"] = os.getloadavg()[0]
    return out


def _params() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text()) or {}


def _run_child(part: str, table: Path, preds: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-c",
        "import json,sys; from benchmarks.bench_train_scale import child; "
        "print('RESULT'+json.dumps(child(*sys.argv[1:]), default=str))",
        part,
        str(table),
        str(preds),
    ]
    # OpenMP threads that spin while they wait lose badly on a shared machine: measured
    # 2.5x slower per tree with 2 threads than with 1 under load; passive waiting avoids it
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{part} child failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return dict(json.loads(line[6:]))


def main() -> dict[str, Any]:
    n_pat = int(os.environ.get("BENCH_SCALE_PATIENTS", 20_000))
    n_rows = int(os.environ.get("BENCH_SCALE_ROWS", 650_000))
    n_feat = int(os.environ.get("BENCH_SCALE_FEATURES", 312))
    with tempfile.TemporaryDirectory(prefix="bench_train_scale_") as tmp:
        d = Path(tmp)
        t = time.perf_counter()
        frame = synthetic_table(n_pat, n_rows, n_feat)
        table_mb = frame.memory_usage(deep=True).sum() / 2**20
        feature_mb = frame.select_dtypes("float32").memory_usage().sum() / 2**20
        frame.to_parquet(d / "features.parquet", index=False)
        positives = float(frame["label"].mean())
        del frame
        print(
            f"table: {n_rows:,} rows x {n_feat} features, {table_mb:.0f} MB in memory, "
            f"{positives:.2%} positive ({time.perf_counter() - t:.1f}s to make)"
        )
        train = _run_child("train", d / "features.parquet", d / "predictions.parquet")
        print(
            f"train: {train['seconds']:.1f}s wall, {train['cpu_seconds']:.1f}s CPU, "
            f"peak {train['peak_rss_mb']:.0f} MB = {train['peak_rss_mb'] / table_mb:.2f}x table"
        )
        evaluate = _run_child("evaluate", d / "features.parquet", d / "predictions.parquet")
        print(
            f"evaluate (200 bootstrap reps): {evaluate['seconds']:.1f}s wall, "
            f"{evaluate['cpu_seconds']:.1f}s CPU, peak {evaluate['peak_rss_mb']:.0f} MB"
        )
    print(json.dumps({"train": train, "evaluate": evaluate}, default=str))
    return {
        "rows": n_rows,
        "features": n_feat,
        "patients": n_pat,
        "positive_share": round(positives, 4),
        "table_in_memory_mb": round(table_mb, 1),
        "float32_features_mb": round(feature_mb, 1),
        "train": train,
        "train_peak_over_table": round(train["peak_rss_mb"] / table_mb, 2),
        "train_wall_over_cpu": round(train["seconds"] / max(train["cpu_seconds"], 1e-9), 2),
        "evaluate": evaluate,
        "measured": "each part in a fresh subprocess; machine possibly shared (loadavg given)",
    }


if __name__ == "__main__":
    main()
