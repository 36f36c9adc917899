"""Monitoring benchmark: alarm quality over seeded resamples, and scale.

1. Detection / false-alarm rates: for each of ``SEEDS`` seeds, a fresh current sample from
   the training distribution (any verdict other than ``ok`` is a false alarm) and each drifted
   variant of the simulator (detected = verdict warn/retrain AND the verdict's top drifted
   signal is the shifted one: heart_rate, age, spo2). Production sample sizes
   (reference 20,000 rows, current window 5,000 predictions), default params.
2. Simulator cohorts (``simulator``): the same rates on the simulator's own feature matrices
   (``vitalrisk simulate`` raw files -> ``ingest`` -> ``build_feature_matrix``) with the
   repository's ``monitor`` params (patient unit, tests within each care setting). Large
   pools are simulated once and cached (``benchmarks.monitoring_pools``): a 3,000-patient
   reference pool and 3,000-patient current pools without drift and with each drift (the
   same simulator seeds, so the hr_offset pool is the fresh pool plus the wearable offset).
   Per window size (100, 300, 1,000 patients: the power curve) and seed, one seeded
   resample of patients, the same patients in every variant.
3. Scale: 1,000,000 logged predictions (all from the wearable-offset variant) with ~100 features in the SQLite prediction log
   against a 100,000-row reference, through the whole ``monitor_log`` path (chunked log read,
   exact quality counts, sampled Evidently drift report, HTML) in a fresh subprocess whose
   wall time and peak RSS are measured.

Run: ``nice python -m benchmarks.run monitoring`` (writes benchmarks/results/monitoring.json).
Env ``BENCH_MONITORING_SEEDS`` / ``BENCH_MONITORING_ROWS`` shrink it for a quick look;
``BENCH_MONITORING_PARTS=rates``, ``=simulator`` or ``=scale`` runs one part;
``BENCH_MONITORING_POOL_PATIENTS`` / ``BENCH_MONITORING_SIM_REFERENCE`` size the pools,
``BENCH_MONITORING_SIM_WINDOWS`` (``100,300,1000``) the windows,
``BENCH_MONITORING_SIM_VARIANTS`` picks variants, ``BENCH_MONITORING_SIM_OFFSETS`` (e.g.
``2,5``) adds wearable offsets in bpm at the largest window, ``BENCH_MONITORING_POOL_DIR``
keeps the pools (default: the temp dir; first run ~15 min to simulate them).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from core.vocabulary import load_vocabulary
from monitoring import monitor as mon
from monitoring import prediction_log as plog
from monitoring import synthetic as syn
from monitoring.config import MonitorConfig

logger = logging.getLogger(__name__)

SEEDS = int(os.environ.get("BENCH_MONITORING_SEEDS", "20"))
SCALE_ROWS = int(os.environ.get("BENCH_MONITORING_ROWS", "1000000"))
REFERENCE_ROWS = 100_000
RATE_REFERENCE = 20_000
RATE_CURRENT = 5_000
RATE_WINDOWS = (4, 24)
EXPECTED = {"hr_offset": "heart_rate", "older": "age", "spo2_missing": "spo2"}


def _named(summary: dict, expected: str) -> bool:
    """Does the verdict point at the shifted signal (a vocabulary code, or a feature)?"""
    if expected in summary["features"]:  # e.g. age: the largest effect comes first
        return summary["drifted_features"][:1] == [expected]
    by_code = summary["drifted_signals"]
    return bool(by_code) and max(by_code, key=by_code.get) == expected


def rates(vocab) -> dict:
    config = MonitorConfig(reference_size=RATE_REFERENCE, current_size=RATE_CURRENT)
    reference = syn.feature_frame(RATE_REFERENCE, seed=10_000, codes=(), windows=RATE_WINDOWS)
    monitor = mon.FrameMonitor(reference, config, vocab)
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    for kind in ["none", *EXPECTED]:
        alarms, named, verdicts = 0, 0, {"ok": 0, "warn": 0, "retrain": 0}
        for seed in range(SEEDS):
            cur = syn.feature_frame(
                RATE_CURRENT, seed=seed, drift=kind, codes=(), windows=RATE_WINDOWS
            )
            s = monitor.evaluate(cur, report=True).summary
            verdicts[s["verdict"]] += 1
            alarms += s["verdict"] != "ok"
            if kind != "none" and s["verdict"] != "ok" and _named(s, EXPECTED[kind]):
                named += 1
        row: dict = {"runs": SEEDS, "verdicts": verdicts}
        if kind == "none":
            row["false_alarm_rate"] = alarms / SEEDS
        else:
            row["detection_rate"] = alarms / SEEDS
            row["detected_and_named_rate"] = named / SEEDS
        out[kind] = row
        print(f"  {kind:13s} {row}")
    return {
        "seeds": SEEDS,
        "reference_rows": RATE_REFERENCE,
        "current_rows": RATE_CURRENT,
        "features": len(reference.columns) - 2,
        "by_variant": out,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------- simulator cohorts
SIM_VARIANTS = tuple(
    v
    for v in os.environ.get(
        "BENCH_MONITORING_SIM_VARIANTS", "none,hr_offset,older,spo2_missing"
    ).split(",")
    if v
)
SIM_EXPECTED = {"hr_offset": "heart_rate", "older": "age", "spo2_missing": "spo2"}
#: patients simulated per pool (reference pool and one current pool per variant)
SIM_POOL_PATIENTS = int(os.environ.get("BENCH_MONITORING_POOL_PATIENTS", "3000"))
SIM_REFERENCE_PATIENTS = int(os.environ.get("BENCH_MONITORING_SIM_REFERENCE", "3000"))
#: current-window sizes (patients) of the resamples: the power curve
SIM_WINDOWS = tuple(
    int(x) for x in os.environ.get("BENCH_MONITORING_SIM_WINDOWS", "100,300,1000").split(",")
)
#: extra wearable offsets (bpm) for the power curve vs offset size, at the largest window
SIM_OFFSETS = tuple(
    float(x) for x in os.environ.get("BENCH_MONITORING_SIM_OFFSETS", "").split(",") if x
)


def sim_config(params: str | Path = "params.yaml") -> MonitorConfig:
    """The ``monitor`` params, with every row of the cohorts used."""
    from core.params import load_section

    config = load_section(MonitorConfig, "monitor", params)
    return config.model_copy(update={"reference_size": 10**7, "current_size": 10**7})


def _sim_named(summary: dict, expected: str) -> bool:
    """The shifted signal is among the drifted ones and no other signal outnumbers it."""
    if expected in summary["features"]:  # a single feature (age)
        return expected in summary["drifted_features"]
    by_code = summary["drifted_signals"]
    return expected in by_code and by_code[expected] == max(by_code.values())


def _resample(patients: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Seeded patient resample of one window (the same patients in every variant pool)."""
    return np.random.default_rng(seed).choice(patients, size, replace=False)


def _rates(runs: list[dict], kind: str) -> dict:
    verdicts = {v: sum(r["verdict"] == v for r in runs) for v in ("ok", "warn", "retrain")}
    alarms = sum(r["verdict"] != "ok" for r in runs)
    row: dict = {"runs": len(runs), "verdicts": verdicts}
    if kind == "none":
        row["false_alarm_rate"] = alarms / len(runs)
        row["false_alarm_features"] = sorted({c for r in runs for c in r["drifted_features"]})
    else:
        row["detection_rate"] = alarms / len(runs)
        row["detected_and_named_rate"] = sum(
            r["named"] and r["verdict"] != "ok" for r in runs
        ) / len(runs)
        counts: dict[str, int] = {}
        for r in runs:
            for code in r["drifted_signals"]:
                counts[code] = counts.get(code, 0) + 1
        row["signals_flagged"] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:6])
        segs: dict[str, int] = {}
        for r in runs:
            for name in r["segments_drifted"]:
                segs[name] = segs.get(name, 0) + 1
        row["segments_with_drift"] = segs
    return row


def _run_pool(
    ref: mon.FrameMonitor, pool: pd.DataFrame, kind: str, sizes: tuple[int, ...], label: str
) -> dict[int, dict]:
    patients = np.sort(pool["patient_id"].unique())
    pid = pool["patient_id"].to_numpy()
    out: dict[int, dict] = {}
    for size in sizes:
        if size > len(patients):
            logger.warning("window %d > pool %d patients: skipped", size, len(patients))
            continue
        runs = []
        t0 = time.perf_counter()
        for seed in range(SEEDS):
            chosen = _resample(patients, size, 1000 + seed)
            s = ref.evaluate(pool[np.isin(pid, chosen)]).summary
            runs.append(
                {
                    "verdict": s["verdict"],
                    "drifted_features": s["drifted_features"],
                    "drifted_signals": s["drifted_signals"],
                    "segments_drifted": [k for k, v in s["segments"].items() if v["drifted"]],
                    "named": kind != "none" and _sim_named(s, SIM_EXPECTED[kind]),
                }
            )
        row = _rates(runs, kind)
        row["seconds_per_run"] = round((time.perf_counter() - t0) / SEEDS, 1)
        out[size] = row
        print(f"  {label:13s} window {size:5d} patients: {row}", flush=True)
    return out


def simulator_rates() -> dict:
    """Alarm rates on the simulator's own cohorts (simulate -> ingest -> features).

    Reference: a pool of ``SIM_REFERENCE_PATIENTS`` training-distribution patients. Current:
    per seed, a resample of ``size`` patients (every window size of ``SIM_WINDOWS``) from a
    pool of fresh patients, without drift (any verdict but ``ok`` is a false alarm) and with
    each drift (the same patients: detected = warn/retrain; named = the shifted signal is
    among the drifted ones and no other signal has more drifted features). Pools are
    simulated once and cached (``benchmarks.monitoring_pools``).
    """
    from benchmarks import monitoring_pools as pools

    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    config = sim_config()
    vocab = load_vocabulary()
    ref = mon.FrameMonitor(
        pd.read_parquet(pools.reference_pool(SIM_REFERENCE_PATIENTS)), config, vocab
    )
    t_ref = time.perf_counter() - t0
    out: dict[str, dict] = {}
    for kind in SIM_VARIANTS:
        pool = pd.read_parquet(pools.current_pool(kind, SIM_POOL_PATIENTS))
        out[kind] = {str(k): v for k, v in _run_pool(ref, pool, kind, SIM_WINDOWS, kind).items()}
        del pool
    by_offset: dict[str, dict] = {}
    for bpm in SIM_OFFSETS:
        pool = pd.read_parquet(
            pools.current_pool(
                "hr_offset",
                SIM_POOL_PATIENTS,
                simulate={"hr_offset_bpm": bpm},
                name=f"hr_offset_{bpm:g}",
            )
        )
        size = max(SIM_WINDOWS)
        by_offset[f"{bpm:g}"] = _run_pool(ref, pool, "hr_offset", (size,), f"hr +{bpm:g}")[size]
        del pool
    logging.disable(logging.NOTSET)
    hr, fresh = out.get("hr_offset", {}), out.get("none", {})
    reached = [
        int(k)
        for k, v in hr.items()
        if k in fresh
        and v["detected_and_named_rate"] >= 0.8
        and fresh[k]["false_alarm_rate"] <= 0.05
    ]
    return {
        "seeds": SEEDS,
        "reference_patients": int(ref.reference["patient_id"].nunique()),
        "reference_rows": len(ref.reference),
        "pool_patients": SIM_POOL_PATIENTS,
        "window_patients": list(SIM_WINDOWS),
        "features": len(ref.kinds),
        "drift_unit": config.drift.unit,
        "segment_by": config.segment_by,
        "numerical_test": config.drift.numerical.model_dump(),
        "binary_test": config.drift.binary.model_dump(),
        "by_variant": out,
        "hr_offset_by_bpm_at_largest_window": by_offset,
        "min_window_hr_offset_detected_80pct": min(reached) if reached else None,
        "seconds_reference": round(t_ref, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _write_big_log(path: Path, rows: int, chunk: int = 100_000) -> int:
    """``rows`` predictions with every feature of the synthetic matrix, JSON-encoded by polars."""
    plog.ensure_tables(path)
    start = pd.Timestamp("2026-11-01", tz="UTC")
    span = 7 * 24 * 3600
    n_feat = 0
    with closing(sqlite3.connect(path)) as con:
        con.execute("PRAGMA synchronous=OFF")
        for i, lo in enumerate(range(0, rows, chunk)):
            n = min(chunk, rows - lo)
            f = syn.feature_frame(n, seed=50_000 + i, drift="hr_offset")
            prob = f.pop("probability").to_numpy()
            f = f.drop(columns=["label"])
            n_feat = len(f.columns)
            num = [c for c in f.columns if c != "setting"]
            f[num] = f[num].astype("float32")
            text = pl.from_pandas(f).select(pl.struct(pl.all()).struct.json_encode()).to_series()
            ts = start + pd.to_timedelta(np.linspace(lo, lo + n - 1, n) * span / rows, unit="s")
            con.executemany(
                "INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?)",
                zip(
                    (f"r{lo + j}" for j in range(n)),
                    (t.isoformat() for t in ts),
                    (f"p_{(lo + j) % 50_000:020x}" for j in range(n)),
                    ["vitalrisk-deterioration"] * n,
                    ["1"] * n,
                    ["champion"] * n,
                    prob.tolist(),
                    f["news2_total"].astype(float).tolist(),
                    text.to_list(),
                    strict=True,
                ),
            )
            con.commit()
    return n_feat


SCALE_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import pandas as pd
from core.vocabulary import load_vocabulary
from monitoring import monitor as mon
from monitoring import evidently_reports as er
from monitoring.config import MonitorConfig
t_import = time.perf_counter() - t0
runs = []
for i in range(2):  # first run also builds the log's covering index; second = steady state
    t1 = time.perf_counter()
    ref = pd.read_parquet(sys.argv[1])
    res = mon.monitor_log(ref, sys.argv[2], MonitorConfig(window_days=30), load_vocabulary())
    er.save_html(res.snapshots["drift"], sys.argv[3])
    runs.append(round(time.perf_counter() - t1, 2))
s = res.summary
# the params' patient unit: the window sample is balanced over patients, which reads every
# window row's patient_id from the log (50,000 patients here: one row each of 20,000)
from monitoring.config import DriftConfig, DriftTest
cfg = MonitorConfig(
    window_days=30, segment_by=["setting"],
    drift=DriftConfig(unit="patient", numerical=DriftTest(method="ks", threshold=1e-4)),
)
ref = pd.read_parquet(sys.argv[1])
ref["patient_id"] = [f"q{i % 20000}" for i in range(len(ref))]
t2 = time.perf_counter()
res2 = mon.monitor_log(ref, sys.argv[2], cfg, load_vocabulary())
er.save_html(res2.snapshots["drift"], sys.argv[3])
t_patient = round(time.perf_counter() - t2, 2)
print(json.dumps({
    "seconds_steady_run_patient_unit": t_patient,
    "patient_unit_sampled_rows": res2.summary["window"]["sampled_rows"],
    "patient_unit_verdict": res2.summary["verdict"],
    "seconds_first_run_incl_imports_and_index": round(t_import + runs[0], 2),
    "seconds_steady_run": runs[1],
    "seconds_imports": round(t_import, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "rows_in_window": s["window"]["rows"],
    "sampled_rows": s["window"]["sampled_rows"],
    "reference_rows_used": s["reference_rows"],
    "monitored_features": s["monitored_features"],
    "verdict": s["verdict"],
    "drifted_signals": s["drifted_signals"],
}))
"""


def scale() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_monitoring_") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        ref = syn.feature_frame(REFERENCE_ROWS, seed=1).drop(columns=["label"])
        ref.to_parquet(d / "reference.parquet")
        n_feat = _write_big_log(d / "predictions.sqlite", SCALE_ROWS)
        build = time.perf_counter() - t0
        size_mb = (d / "predictions.sqlite").stat().st_size / 2**20
        print(
            f"  built {SCALE_ROWS:,} logged predictions x {n_feat} features ({size_mb:.0f} MB) in {build:.0f} s"
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                SCALE_CHILD,
                str(d / "reference.parquet"),
                str(d / "predictions.sqlite"),
                str(d / "r.html"),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(
            {
                "logged_predictions": SCALE_ROWS,
                "features_logged": n_feat,
                "reference_rows": REFERENCE_ROWS,
                "log_size_mb": round(size_mb),
                "seconds_building_inputs": round(build, 1),
                "under_60s": result["seconds_first_run_incl_imports_and_index"] < 60,
            }
        )
        print(f"  scale: {result}")
        return result


def main() -> dict:
    parts = os.environ.get("BENCH_MONITORING_PARTS", "rates,simulator,scale").split(",")
    out: dict = {}
    if "rates" in parts:
        print(f"monitoring: alarm rates over {SEEDS} seeds per variant")
        out["rates"] = rates(load_vocabulary())
    if "simulator" in parts:
        print(
            f"monitoring: alarm rates on simulator cohorts, {SEEDS} seeded resamples per variant "
            f"and window ({SIM_WINDOWS} patients from {SIM_POOL_PATIENTS}-patient pools vs a "
            f"{SIM_REFERENCE_PATIENTS}-patient reference)"
        )
        out["simulator"] = simulator_rates()
    if "scale" in parts:
        print(f"monitoring: scale test ({SCALE_ROWS:,} logged predictions)")
        out["scale"] = scale()
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
