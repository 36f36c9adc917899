"""Monitoring benchmark: alarm quality over seeded resamples, and scale.

1. Detection / false-alarm rates: for each of ``SEEDS`` seeds, a fresh current sample from
   the training distribution (any verdict other than ``ok`` is a false alarm) and each drifted
   variant of the simulator (detected = verdict warn/retrain AND the verdict's top drifted
   signal is the shifted one: heart_rate, age, spo2). Production sample sizes
   (reference 20,000 rows, current window 5,000 predictions), default params.
2. Simulator cohorts (``simulator``): the same rates on the simulator's own feature matrices
   (``vitalrisk simulate`` raw files -> ``ingest`` -> ``build_feature_matrix``, via
   ``pipelines.monitor.simulated_features``) with the repository's ``monitor`` params: one
   300-patient baseline cohort as the reference, and per seed a fresh 100-patient cohort
   with no drift and with each drift (the same seed gives the same patients in every
   variant). Cohorts are simulated in ``BENCH_MONITORING_WORKERS`` processes (2).
3. Scale: 1,000,000 logged predictions (all from the wearable-offset variant) with ~100 features in the SQLite prediction log
   against a 100,000-row reference, through the whole ``monitor_log`` path (chunked log read,
   exact quality counts, sampled Evidently drift report, HTML) in a fresh subprocess whose
   wall time and peak RSS are measured.

Run: ``nice python -m benchmarks.run monitoring`` (writes benchmarks/results/monitoring.json).
Env ``BENCH_MONITORING_SEEDS`` / ``BENCH_MONITORING_ROWS`` shrink it for a quick look;
``BENCH_MONITORING_PARTS=rates``, ``=simulator`` or ``=scale`` runs one part;
``BENCH_MONITORING_SIM_PATIENTS`` / ``BENCH_MONITORING_SIM_REFERENCE`` size the cohorts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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

from features.vocabulary import load_vocabulary
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


def _evaluate(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    config: MonitorConfig,
    vocab,
    report: bool = True,
) -> dict:
    kinds = mon.column_kinds(reference, config.exclude)
    codes = mon.feature_codes(kinds, vocab)
    ranges = mon.vocabulary_ranges(codes, vocab, config.quality.range_stats)
    cats = mon.reference_categories(reference, kinds)
    cw = mon.collect_current([current], len(current), kinds, ranges, cats, config)
    return mon.evaluate(reference, cw, kinds, codes, ranges, cats, config, report=report).summary


def rates(vocab) -> dict:
    config = MonitorConfig(reference_size=RATE_REFERENCE, current_size=RATE_CURRENT)
    reference = syn.feature_frame(RATE_REFERENCE, seed=10_000, codes=(), windows=RATE_WINDOWS)
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    for kind in ["none", *EXPECTED]:
        alarms, named, verdicts = 0, 0, {"ok": 0, "warn": 0, "retrain": 0}
        for seed in range(SEEDS):
            cur = syn.feature_frame(
                RATE_CURRENT, seed=seed, drift=kind, codes=(), windows=RATE_WINDOWS
            )
            s = _evaluate(reference, cur, config, vocab)
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
SIM_VARIANTS = ("none", "hr_offset", "older", "spo2_missing")
SIM_EXPECTED = {"hr_offset": "heart_rate", "older": "age", "spo2_missing": "spo2"}
SIM_REFERENCE_PATIENTS = int(os.environ.get("BENCH_MONITORING_SIM_REFERENCE", "300"))
SIM_CURRENT_PATIENTS = int(os.environ.get("BENCH_MONITORING_SIM_PATIENTS", "100"))
SIM_WORKERS = int(os.environ.get("BENCH_MONITORING_WORKERS", "2"))
_SIM: dict = {}


def sim_config(params: str | Path = "params.yaml") -> MonitorConfig:
    """The ``monitor`` params, with every row of the small cohorts used."""
    from pipelines.params import load_section

    config = load_section(MonitorConfig, "monitor", params)
    return config.model_copy(update={"reference_size": 10**7, "current_size": 10**7})


def _sim_init(reference_path: str, tmp: str) -> None:
    logging.disable(logging.WARNING)
    _SIM.update(
        reference=pd.read_parquet(reference_path),
        tmp=Path(tmp),
        config=sim_config(),
        vocab=load_vocabulary(),
    )


def _sim_one(task: tuple[str, int]) -> dict:
    from pipelines.monitor import simulated_features

    kind, seed = task
    t0 = time.perf_counter()
    raw = _SIM["tmp"] / f"raw_{kind}_{seed}"
    cur = simulated_features("params.yaml", kind, SIM_CURRENT_PATIENTS, seed, raw)
    shutil.rmtree(raw, ignore_errors=True)
    t1 = time.perf_counter()
    s = _evaluate(_SIM["reference"], cur, _SIM["config"], _SIM["vocab"], report=False)
    return {
        "kind": kind,
        "seed": seed,
        "verdict": s["verdict"],
        "drifted_features": s["drifted_features"],
        "drifted_signals": s["drifted_signals"],
        "named": kind != "none" and _sim_named(s, SIM_EXPECTED[kind]),
        "seconds_simulate": round(t1 - t0, 1),
        "seconds_monitor": round(time.perf_counter() - t1, 1),
    }


def _sim_named(summary: dict, expected: str) -> bool:
    """The shifted signal is among the drifted ones and no other signal outnumbers it."""
    if expected in summary["features"]:  # a single feature (age)
        return expected in summary["drifted_features"]
    by_code = summary["drifted_signals"]
    return expected in by_code and by_code[expected] == max(by_code.values())


def simulator_rates() -> dict:
    """Alarm rates on the simulator's own cohorts (simulate -> ingest -> features).

    Reference: the features of one baseline cohort (seed 0). Current: per seed, a fresh cohort
    of new patients from the training distribution (any verdict but ``ok`` is a false alarm)
    and the same seed with each drift (detected = warn/retrain; named = the shifted signal is
    among the drifted ones and no other signal has more drifted features).
    """
    from concurrent.futures import ProcessPoolExecutor

    from pipelines.monitor import simulated_features

    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_monitoring_sim_") as tmp:
        reference = simulated_features(
            "params.yaml",
            "none",
            SIM_REFERENCE_PATIENTS,
            0,
            Path(tmp) / "raw_reference",
            purpose="model_training",
        )
        ref_path = Path(tmp) / "reference.parquet"
        reference.to_parquet(ref_path)
        t_ref = time.perf_counter() - t0
        tasks = [(k, 1000 + i) for i in range(SEEDS) for k in SIM_VARIANTS]
        with ProcessPoolExecutor(
            SIM_WORKERS, initializer=_sim_init, initargs=(str(ref_path), tmp)
        ) as pool:
            runs = list(pool.map(_sim_one, tasks))
    logging.disable(logging.NOTSET)
    out: dict[str, dict] = {}
    for kind in SIM_VARIANTS:
        rs = [r for r in runs if r["kind"] == kind]
        verdicts = {v: sum(r["verdict"] == v for r in rs) for v in ("ok", "warn", "retrain")}
        alarms = sum(r["verdict"] != "ok" for r in rs)
        row: dict = {"runs": len(rs), "verdicts": verdicts}
        if kind == "none":
            row["false_alarm_rate"] = alarms / len(rs)
            row["false_alarm_features"] = sorted({c for r in rs for c in r["drifted_features"]})
        else:
            row["detection_rate"] = alarms / len(rs)
            row["detected_and_named_rate"] = sum(
                r["named"] and r["verdict"] != "ok" for r in rs
            ) / len(rs)
            row["signals_flagged"] = dict(
                sorted(
                    {
                        code: sum(code in r["drifted_signals"] for r in rs)
                        for r0 in rs
                        for code in r0["drifted_signals"]
                    }.items(),
                    key=lambda kv: -kv[1],
                )[:8]
            )
        out[kind] = row
        print(f"  {kind:13s} {row}")
    config = sim_config()
    return {
        "seeds": SEEDS,
        "reference_patients": SIM_REFERENCE_PATIENTS,
        "reference_rows": len(reference),
        "current_patients": SIM_CURRENT_PATIENTS,
        "features": len(reference.columns) - 3,
        "drift_unit": config.drift.unit,
        "calibration_splits": config.drift.calibration_splits,
        "noise_margin": config.drift.noise_margin,
        "by_variant": out,
        "seconds_reference": round(t_ref, 1),
        "seconds_simulate_mean": round(float(np.mean([r["seconds_simulate"] for r in runs])), 1),
        "seconds_monitor_mean": round(float(np.mean([r["seconds_monitor"] for r in runs])), 1),
        "workers": SIM_WORKERS,
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
from features.vocabulary import load_vocabulary
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
print(json.dumps({
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
            f"monitoring: alarm rates on simulator cohorts, {SEEDS} seeds per variant "
            f"({SIM_CURRENT_PATIENTS} patients vs a {SIM_REFERENCE_PATIENTS}-patient reference)"
        )
        out["simulator"] = simulator_rates()
    if "scale" in parts:
        print(f"monitoring: scale test ({SCALE_ROWS:,} logged predictions)")
        out["scale"] = scale()
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
