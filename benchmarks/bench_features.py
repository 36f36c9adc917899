"""Features benchmark: 11.6 M wearable observations end to end, against polars in the same run.

Figures:
- ``obs_per_s``: observations / wall seconds of the whole ``features`` stage (read Parquet,
  prediction times, labels, every feature of the dictionary, write Parquet + dictionary),
  run in a fresh subprocess (``features.stage.run_local``, the CLI's code: streaming, compiled
  kernels loaded on a thread meanwhile) so that its time and peak memory are its own.
- ``cpu_seconds`` / ``obs_per_cpu_s``: user + system CPU of that subprocess, and the load
  average around it: the machine may be shared, and CPU time depends less on the tenants.
- ``peak_rss_mb``: peak RSS of that subprocess (``VmHWM``; interpreter and libraries included),
  against ``input_arrow_mb``, the observations table as Arrow holds it (all five columns).
- ``polars_*``: the statistics polars can compute too (``PEER_STATS`` of each window, plus
  the last value and its age: ``polars_statistics`` of them) at the same prediction times, in
  its fastest formulation we found (prefix sums + ``join_asof``, ``rolling_*_by`` for min/max),
  Parquet in, in a fresh subprocess; ``speedup_vs_polars`` = polars seconds / ours, where
  ours computes every feature (318 here), polars only those. ``polars_agreement``: counts,
  last values, min and max must agree exactly; sums, means and spreads to the relative
  difference shown (our output is float32: ~6e-8 is its rounding; ours are exact before it,
  ``features/arith.py``), and the windows where our spread is exactly 0 (constant values) but
  polars' is not, with polars' largest such value.
- ``serving_sized_call_ms``: per call for 1 / 4 / 8 serving-sized patients.

Environment knobs: ``BENCH_FEATURES_PATIENTS`` (default 2000), ``BENCH_FEATURES_DAYS`` (30),
``BENCH_FEATURES_REPEATS`` (2: each subprocess runs that many times, the fastest is reported,
all are listed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

T0 = pd.Timestamp("2026-01-05T00:00:00Z")
#: code -> (interval minutes, mean, sd) of the simulated wearable stream
STREAMS = {
    "heart_rate": (15, 78.0, 9.0),
    "spo2": (30, 96.0, 1.5),
    "resp_rate": (60, 16.0, 2.5),
    "steps": (60, 350.0, 300.0),
    "sleep_duration": (24 * 60, 7.0, 1.0),
}


def synthetic_wearable(n_patients: int, days: float, seed: int = 7) -> dict[str, pd.DataFrame]:
    """Home wearable cohort: canonical observations, patients and outcomes (vectorised)."""
    rng = np.random.default_rng(seed)
    start_ns = T0.value + rng.integers(0, 2 * 86400, n_patients) * 1_000_000_000
    end_ns = start_ns + int(days * 86400e9)
    pids = np.array([f"p_{i:020x}" for i in range(n_patients)], dtype=object)
    keys = sorted(STREAMS)
    parts_p, parts_t, parts_c, parts_v = [], [], [], []
    for ci, code in enumerate(keys):
        every, mu, sd = STREAMS[code]
        n = int(days * 1440 // every)
        p = np.repeat(np.arange(n_patients), n)
        k = np.tile(np.arange(n), n_patients)
        jitter = rng.integers(0, 60, p.size) if every < 1440 else 0
        t = start_ns[p] + (k * every * 60 + jitter) * 1_000_000_000
        level = rng.normal(mu, sd / 2, n_patients)[p]
        v = level + rng.normal(0, sd / 2, p.size)
        lo, hi = {
            "heart_rate": (30, 220),
            "spo2": (70, 100),
            "resp_rate": (5, 60),
            "steps": (0, 5000),
            "sleep_duration": (0, 14),
        }[code]
        v = np.clip(np.round(v, 1) if code != "steps" else np.round(v), lo, hi)
        parts_p.append(p)
        parts_t.append(t)
        parts_c.append(np.full(p.size, ci, dtype=np.int8))
        parts_v.append(v)
    p = np.concatenate(parts_p)
    t = np.concatenate(parts_t)
    c = np.concatenate(parts_c)
    v = np.concatenate(parts_v)
    order = np.lexsort((c, t, p))
    obs = pd.DataFrame(
        {
            "patient_id": pd.Categorical.from_codes(p[order], categories=pids),
            "time": pd.to_datetime(t[order], unit="ns", utc=True),
            "code": pd.Categorical.from_codes(c[order], categories=keys),
            "value": v[order],
            "source": pd.Categorical.from_codes(np.zeros(p.size, dtype=np.int8), ["wearable"]),
        }
    )
    patients = pd.DataFrame(
        {
            "patient_id": pids,
            "setting": "home",
            "age": rng.integers(25, 95, n_patients).astype(float),
            "sex": np.where(rng.random(n_patients) < 0.5, "F", "M"),
            "cm_copd": (rng.random(n_patients) < 0.2).astype(int),
            "cm_heart_failure": (rng.random(n_patients) < 0.15).astype(int),
            "followup_start": pd.to_datetime(start_ns, unit="ns", utc=True),
            "followup_end": pd.to_datetime(end_ns, unit="ns", utc=True),
            "consent_care": True,
            "consent_model_training": True,
            "consent_research": True,
        }
    )
    has = rng.random(n_patients) < 0.12
    ev_t = start_ns + (rng.uniform(0.2, 1.0, n_patients) * (end_ns - start_ns)).astype(np.int64)
    outcomes = pd.DataFrame(
        {
            "patient_id": pids[has],
            "time": pd.to_datetime(ev_t[has], unit="ns", utc=True),
            "event": "emergency_admission",
        }
    )
    return {"observations": obs, "patients": patients, "outcomes": outcomes}


def write_cohort(frames: dict[str, pd.DataFrame], out: Path) -> int:
    """Write like the ingest stage (plain string columns); returns the Arrow size of obs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    obs = frames["observations"]
    table = pa.Table.from_pandas(obs, preserve_index=False)
    table = table.cast(
        pa.schema(
            [
                ("patient_id", pa.string()),
                ("time", pa.timestamp("ns", tz="UTC")),
                ("code", pa.string()),
                ("value", pa.float64()),
                ("source", pa.string()),
            ]
        )
    )
    pq.write_table(table, out / "observations.parquet", row_group_size=1 << 20)
    nbytes = int(table.nbytes)
    del table
    frames["patients"].to_parquet(out / "patients.parquet", index=False)
    frames["outcomes"].to_parquet(out / "outcomes.parquet", index=False)
    return nbytes


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    over from the parent at fork, so a child of a big parent reports the parent's size."""
    return _rss_mb("VmHWM")


def child_run(obs_dir: str, out_dir: str) -> dict[str, Any]:
    """The timed end-to-end stage (run in a fresh process by :func:`main`)."""
    import resource

    from core.vocabulary import load_vocabulary
    from features.stage import run_local, tune_process

    tune_process()  # as the CLI does
    config = _config()
    vocab = load_vocabulary()
    rss0 = _rss_mb()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    summary = run_local(obs_dir, out_dir, config, vocab)
    secs = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": secs,
        "cpu_user_s": r1.ru_utime - r0.ru_utime,
        "cpu_sys_s": r1.ru_stime - r0.ru_stime,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss0,
        "loadavg_1min_before": load0,
        "loadavg_1min_after": os.getloadavg()[0],
        "summary": summary,
    }


def _config() -> Any:
    from features.config import FeaturesConfig

    params = Path(__file__).resolve().parent.parent / "params.yaml"
    try:
        from core.params import load_section

        return load_section(FeaturesConfig, "features", params)
    except Exception:  # params not written yet or invalid: the defaults
        return FeaturesConfig.model_validate({})


#: the statistics every peer engine computes (slope, baselines, NEWS2 and the rest are ours)
PEER_STATS = ("count", "sum", "mean", "std", "min", "max")


def peer_statistics(config: Any, vocab: Any, codes: list[str]) -> list[tuple[str, str, float]]:
    """(code, statistic, window hours) of the windows family's features that polars can
    compute too; plus ``last`` / ``hours_since`` (window 0)."""
    from features.families.windows import window_stats

    out: list[tuple[str, str, float]] = []
    for code in codes:
        out += [(code, "last", 0.0), (code, "hours_since", 0.0)]
        ws, st = window_stats(config, _Ctx(vocab), code)
        out += [(code, s, w) for w in ws for s in st if s in PEER_STATS]
    return out


class _Ctx:
    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab

    def spec(self, code: str) -> Any:
        return self.vocab.codes[code]


def polars_features(
    obs_path: Path, times: pd.DataFrame, stats: list[tuple[str, str, float]]
) -> Any:
    """The peer statistics at the prediction times with polars, its fastest formulation we
    found: per code, prefix sums of value, value^2 and count, each window's sums from two
    ``join_asof`` lookups ((t - w, t]: the prefix at t minus the prefix at t - w); min/max by
    ``rolling_min_by``/``rolling_max_by`` over the observations with the prediction times
    interleaved (null values), read at those rows. Returns (frame, seconds)."""
    import polars as pl

    t0 = time.perf_counter()
    obs = pl.read_parquet(obs_path, columns=["patient_id", "time", "code", "value"])
    q = (
        pl.from_pandas(times[["patient_id", "time"]])
        .with_columns(pl.col("time").dt.cast_time_unit("ns"))
        .sort(["patient_id", "time"])
    )
    out = q
    for code in sorted({c for c, _, _ in stats}):
        mine = [(s, w) for c, s, w in stats if c == code]
        o = (
            obs.filter(pl.col("code") == code)
            .select("patient_id", "time", "value")
            .sort(["patient_id", "time"])
            .with_columns(
                pl.col("value").cum_sum().over("patient_id").alias("s1"),
                (pl.col("value") ** 2).cum_sum().over("patient_id").alias("s2"),
                pl.int_range(1, pl.len() + 1).over("patient_id").alias("n"),
                pl.col("time").alias("t_obs"),
            )
        )
        hi = q.join_asof(o, on="time", by="patient_id", strategy="backward")
        cols = [
            hi["value"].alias(f"{code}_last"),
            ((hi["time"] - hi["t_obs"]).dt.total_nanoseconds() / 3.6e12).alias(
                f"{code}_hours_since"
            ),
        ]
        n_hi = hi["n"].fill_null(0)
        for w in sorted({w for _, w in mine if w}):
            lo = q.with_columns(
                pl.col("time") - pl.duration(nanoseconds=int(w * 3.6e12))
            ).join_asof(o, on="time", by="patient_id", strategy="backward")
            n = (n_hi - lo["n"].fill_null(0)).cast(pl.Float64)
            s1 = hi["s1"].fill_null(0.0) - lo["s1"].fill_null(0.0)
            s2 = hi["s2"].fill_null(0.0) - lo["s2"].fill_null(0.0)
            var = (s2 - s1 * s1 / n) / (n - 1)
            for s, ww in mine:
                if ww != w:
                    continue
                if s == "count":
                    cols.append(n.alias(f"{code}_count_{w:g}h"))
                elif s == "sum":
                    cols.append(s1.alias(f"{code}_sum_{w:g}h"))
                elif s == "mean":
                    cols.append((s1 / n).alias(f"{code}_mean_{w:g}h"))
                elif s == "std":
                    cols.append(var.clip(lower_bound=0).sqrt().alias(f"{code}_std_{w:g}h"))
        extremes = [(s, w) for s, w in mine if s in ("min", "max")]
        if extremes:  # one interleaved frame per code, every window's min/max read from it
            both = pl.concat(
                [
                    o.select("patient_id", "time", "value", pl.lit(False).alias("_q")),
                    q.select(
                        "patient_id",
                        "time",
                        pl.lit(None, pl.Float64).alias("value"),
                        pl.lit(True).alias("_q"),
                    ),
                ]
            ).sort(["patient_id", "time", "_q"])
            rolled = both.with_columns(
                getattr(pl.col("value"), f"rolling_{e}_by")("time", window_size=f"{int(w * 3600)}s")
                .over("patient_id")
                .alias(f"{code}_{e}_{w:g}h")
                for e, w in extremes
            ).filter(pl.col("_q"))
            cols += [rolled[f"{code}_{e}_{w:g}h"] for e, w in extremes]
        out = out.with_columns(cols)
    return out, time.perf_counter() - t0


def serving_sized_calls(config: Any, vocab: Any) -> dict[str, dict[str, float]]:
    """Milliseconds per call for 1 / 4 / 8 serving-sized patients, one query each.

    ``from_arrays``: ``features_from_arrays``, what ``/v1/score`` pays per batch (the service
    builds the arrays from the request); ``from_frames``: ``compute_feature_arrays`` on
    data-contract frames with string ids. ~170 observations of 7 vitals per patient over a
    day (the small-input path); best of 5 rounds of 60 calls.
    """
    from features.build import compute_feature_arrays, feature_inputs, features_from_arrays
    from tests.serving.factory import synthetic_cohort

    def best_ms(fn: Any) -> float:
        for _ in range(20):
            fn()
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(60):
                fn()
            rounds.append((time.perf_counter() - t) / 60 * 1000)
        return round(min(rounds), 3)

    obs, pats, times, _ = synthetic_cohort(n=8, seed=5)
    ids = list(dict.fromkeys(obs["patient_id"].tolist()))
    out: dict[str, dict[str, float]] = {"from_arrays": {}, "from_frames": {}}
    for n in (1, 4, 8):
        keep = set(ids[:n])
        o = obs[obs["patient_id"].isin(keep)]
        p = pats[pats["patient_id"].isin(keep)]
        q = times[times["patient_id"].isin(keep)]
        inputs = feature_inputs(o, p, q, config, vocab)
        out["from_arrays"][str(n)] = best_ms(
            lambda inputs=inputs: features_from_arrays(inputs, config, vocab)
        )
        out["from_frames"][str(n)] = best_ms(
            lambda o=o, p=p, q=q: compute_feature_arrays(o, p, q, config, vocab)
        )
    print(f"serving-sized calls, ms per call for 1/4/8 patients: {out}")
    return out


def polars_child(obs_dir: str, times_path: str, stats_json: str, out_path: str) -> dict[str, Any]:
    """The polars baseline, timed in a fresh process (as the stage): wall and CPU seconds."""
    import resource

    stats = [tuple(x) for x in json.loads(stats_json)]
    times = pd.read_parquet(times_path)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    frame, secs = polars_features(Path(obs_dir) / "observations.parquet", times, stats)  # type: ignore[arg-type]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    frame.write_parquet(out_path)
    return {
        "seconds": secs,
        "cpu_seconds": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "peak_rss_mb": peak_rss_mb(),
    }


def _run(fn: str, *args: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        "-c",
        f"import json,sys; from benchmarks.bench_features import {fn}; "
        f"print('RESULT'+json.dumps({fn}(*sys.argv[1:])))",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {fn} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return dict(json.loads(line[6:]))


def agreement(
    ours: pd.DataFrame, theirs: pd.DataFrame, stats: list[tuple[str, str, float]]
) -> dict[str, Any]:
    """How far polars is from our (exact) values on the shared statistics: counts, last,
    min and max must be equal; sums, means and spreads are compared relatively."""
    import polars as pl

    t = theirs.to_pandas() if isinstance(theirs, pl.DataFrame) else theirs
    worst: dict[str, float] = {}
    spread_zero: dict[str, list[float]] = {}
    unequal = 0
    for code, stat, w in stats:
        name = f"{code}_{stat}" if not w else f"{code}_{stat}_{w:g}h"
        a = ours[name].to_numpy(dtype=np.float64)
        b = t[name].to_numpy(dtype=np.float64)
        both = ~(np.isnan(a) | np.isnan(b))
        if stat in ("count", "last", "min", "max"):
            # (float32 output: compare in float32)
            unequal += int((a[both] != b[both].astype(np.float32)).sum())
            unequal += int((np.isnan(a) != np.isnan(b)).sum()) if stat != "count" else 0
        else:
            zero = both & (a == 0) & (b != 0)  # ours exactly 0 (a constant window), theirs not
            if zero.any():
                z = spread_zero.setdefault(stat, [0, 0.0])
                z[0] += int(zero.sum())
                z[1] = max(z[1], float(np.abs(b[zero]).max()))
            ok = both & ~zero
            rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1e-12)
            worst[stat] = max(worst.get(stat, 0.0), float(rel.max()) if len(rel) else 0.0)
    return {
        "cells_not_equal_count_last_min_max": unequal,
        "max_relative_difference": worst,
        "ours_exactly_0_theirs_not": {
            k: {"cells": n, "their_max": m} for k, (n, m) in spread_zero.items()
        },
    }


def main() -> dict[str, Any]:
    from core.vocabulary import load_vocabulary
    from features.labels import label_times, prediction_times

    n_pat = int(os.environ.get("BENCH_FEATURES_PATIENTS", "2000"))
    days = float(os.environ.get("BENCH_FEATURES_DAYS", "30"))
    config = _config()
    vocab = load_vocabulary()
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    serving_calls = serving_sized_calls(config, vocab)
    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp:
        d = Path(tmp)
        t = time.perf_counter()
        frames = synthetic_wearable(n_pat, days)
        n_obs = len(frames["observations"])
        arrow_bytes = write_cohort(frames, d / "obs")
        pats = frames["patients"]
        times, _ = label_times(prediction_times(pats, config), pats, frames["outcomes"], config)
        times[["patient_id", "time"]].to_parquet(d / "times.parquet", index=False)
        codes = sorted(STREAMS)
        del frames
        print(
            f"generated {n_obs:,} observations of {n_pat} patients in {time.perf_counter() - t:.1f}s"
        )

        runs = []
        for _ in range(int(os.environ.get("BENCH_FEATURES_REPEATS", "2"))):
            runs.append(_run("child_run", str(d / "obs"), str(d / "out")))
            print(
                f"stage run: {runs[-1]['seconds']:.2f}s, cpu {runs[-1]['cpu_user_s'] + runs[-1]['cpu_sys_s']:.2f}s"
            )
        child = min(runs, key=lambda r: r["seconds"])  # best of N: the machine is shared
        out_bytes = (d / "out" / "features.parquet").stat().st_size
        stats = peer_statistics(config, vocab, codes)
        polars_runs = [
            _run(
                "polars_child",
                str(d / "obs"),
                str(d / "times.parquet"),
                json.dumps(stats),
                str(d / "polars.parquet"),
            )
            for _ in range(int(os.environ.get("BENCH_FEATURES_REPEATS", "2")))
        ]
        pol = min(polars_runs, key=lambda r: r["seconds"])
        print(
            f"polars ({len(stats)} statistics): {pol['seconds']:.2f}s, cpu {pol['cpu_seconds']:.2f}s"
        )
        import polars as pl

        agree = agreement(
            pd.read_parquet(d / "out" / "features.parquet"),
            pl.read_parquet(d / "polars.parquet"),
            stats,
        )

    secs = child["seconds"]
    cpu = child["cpu_user_s"] + child["cpu_sys_s"]
    result = {
        "observations": n_obs,
        "patients": n_pat,
        "days": days,
        "feature_rows": child["summary"]["rows"],
        "n_features": child["summary"]["n_features"],
        "seconds": round(secs, 3),
        "seconds_all_runs": [round(r["seconds"], 3) for r in runs],
        "obs_per_s": round(n_obs / secs),
        "cpu_seconds": round(cpu, 3),
        "cpu_user_sys_s": [round(child["cpu_user_s"], 3), round(child["cpu_sys_s"], 3)],
        "obs_per_cpu_s": round(n_obs / cpu),
        "threads": os.cpu_count(),
        "loadavg_1min_before_after": [
            round(child["loadavg_1min_before"], 2),
            round(child["loadavg_1min_after"], 2),
        ],
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
        "peak_rss_mb_all_runs": [round(r["peak_rss_mb"], 1) for r in runs],
        "rss_before_mb": round(child["rss_before_mb"], 1),
        "input_arrow_mb": round(arrow_bytes / 2**20, 1),
        "peak_rss_over_input_arrow": round(child["peak_rss_mb"] / (arrow_bytes / 2**20), 2),
        "features_parquet_mb": round(out_bytes / 2**20, 1),
        "polars_statistics": len(stats),
        "polars_seconds": round(pol["seconds"], 3),
        "polars_seconds_all_runs": [round(r["seconds"], 3) for r in polars_runs],
        "polars_cpu_seconds": round(pol["cpu_seconds"], 3),
        "speedup_vs_polars": round(pol["seconds"] / secs, 2),
        "speedup_vs_polars_cpu": round(pol["cpu_seconds"] / cpu, 2),
        "polars_agreement": agree,
        "memory_measure": "VmHWM (peak RSS since exec) of the stage subprocess",
        "serving_sized_call_ms": serving_calls,
    }
    print(
        f"features: {n_obs / secs / 1e6:.2f} M obs/s ({secs:.2f}s, cpu {cpu:.2f}s), "
        f"{result['speedup_vs_polars']}x polars ({result['speedup_vs_polars_cpu']}x in CPU), "
        f"peak {result['peak_rss_over_input_arrow']}x the input's Arrow size"
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
