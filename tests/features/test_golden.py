"""Golden features: the stage's output on a stored demo-style cohort, bit for bit.

The fixture (``tests/features/golden``, made by ``make_golden.py`` before the feature engine
was split into families) holds the inputs, a copy of the vocabulary, two feature configs and
the expected rows. Any change of a feature value, the sign of a zero, a NaN position, a
column name or order, a label or an exclusion count fails here, with the first cells that
differ named. Both executors are covered: the stage's batch (many queries per chunk) and
one patient per call (the few-queries path serving takes).

One deliberate exception: the window moment statistics (mean, sum, std, slope and what is
derived from them: baseline mean/std, deviation, z-score, activity totals and ratios, sleep
vs baseline) became exact (``features/arith.py``): the fixture's values carried prefix-sum
rounding (a constant window's std was ~1e-7, slopes up to 1e-8 off). A cell of those
columns may differ from the fixture only if the new value is within 1e-9 relative of a
long-double reference computed here from the raw rows, and no further from it than the
fixture's value was (give or take the rounding of the last steps, a few units in the last
place).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.vocabulary import load_vocabulary
from features.build import build_feature_matrix_with_report, compute_features
from features.config import FeaturesConfig

GOLDEN = Path(__file__).resolve().parent / "golden"
ID_COLS = ["patient_id", "time", "setting", "label"]


@pytest.fixture(scope="module")
def golden() -> dict:
    return {
        "obs": pd.read_parquet(GOLDEN / "observations.parquet"),
        "pats": pd.read_parquet(GOLDEN / "patients.parquet"),
        "outs": pd.read_parquet(GOLDEN / "outcomes.parquet"),
        "vocab": load_vocabulary(GOLDEN / "vocabulary.yaml"),
        "configs": json.loads((GOLDEN / "configs.json").read_text()),
        "meta": json.loads((GOLDEN / "meta.json").read_text()),
    }


#: features whose values come from window moment sums (they became exact; see above)
MOMENT_SUFFIXES = ("baseline_mean", "baseline_std", "dev_baseline", "z_baseline")
MOMENT_SUFFIXES += ("total_24h", "baseline_daily", "ratio_baseline", "last_night_vs_baseline")


def moment_feature(name: str, codes: list[str]) -> tuple[str, str] | None:
    """(code, rest) if ``name`` is a moment statistic of a code, else None."""
    for c in sorted(codes, key=len, reverse=True):
        if name.startswith(c + "_"):
            rest = name[len(c) + 1 :]
            stat = rest.split("_")[0]
            if rest.endswith(MOMENT_SUFFIXES) or (
                stat in ("mean", "sum", "std", "slope") and rest.endswith("h")
            ):
                return c, rest
    return None


class Reference:
    """Long-double window statistics straight from the raw rows (ties kept, exact
    duplicates dropped, as the feature code does)."""

    def __init__(self, obs: pd.DataFrame, config: FeaturesConfig) -> None:
        o = obs.drop_duplicates(["patient_id", "code", "time", "value"])
        self.rows = {
            k: (g["time"].astype("int64").to_numpy(), g["value"].to_numpy(dtype=np.float64))
            for k, g in o.groupby(["patient_id", "code"], sort=False)
        }
        self.b = config.section("baseline")

    def window(self, pid: str, code: str, t: int, hours: float, until: float = 0.0) -> dict:
        ts, vs = self.rows.get((pid, code), (np.zeros(0, np.int64), np.zeros(0)))
        h = 3_600_000_000_000
        sel = (ts > t - round(hours * h)) & (ts <= t - round(until * h))
        v = vs[sel].astype(np.longdouble)
        x = (ts[sel] - t).astype(np.longdouble) / np.longdouble(h)
        n = len(v)
        out = {"n": n, "sum": v.sum(), "mean": np.longdouble(np.nan)}
        out["std"] = out["slope"] = np.longdouble(np.nan)
        if n:
            out["mean"] = v.mean()
        if n > 1:
            d = v - out["mean"]
            out["std"] = np.sqrt((d * d).sum() / (n - 1))
            dx = x - x.mean()
            if (dx * dx).sum() > 0:
                out["slope"] = (dx * d).sum() / (dx * dx).sum()
            # what an exact answer from these doubles is good to: the values' last place
            out["std_scale"] = abs(v).max()
            out["slope_scale"] = abs(v).max() / max(x.max() - x.min(), 1e-300)
        return out

    def value(
        self, pid: str, code: str, t: int, rest: str, night: float
    ) -> tuple[np.longdouble, np.longdouble]:
        """(reference value, the magnitude its last rounding steps work at)."""
        b = self.b
        if rest.split("_")[0] in ("mean", "sum", "std", "slope"):
            stat, w = rest.split("_")
            win = self.window(pid, code, t, float(w[:-1]))
            return win[stat], win.get(f"{stat}_scale", abs(win[stat]))
        base = self.window(pid, code, t, b.start_days * 24, b.end_days * 24)
        nan = np.longdouble(np.nan)
        enough = base["n"] >= b.min_count
        bmean, bstd = (base["mean"], base["std"]) if enough else (nan, nan)
        recent = self.window(pid, code, t, b.compare_hours)["mean"]
        dev = recent - bmean
        total = self.window(pid, code, t, 24.0)["sum"]
        daily = base["sum"] / np.longdouble(b.start_days - b.end_days) if enough else nan
        r, scale = {  # a difference of two means is only as exact as the means
            "baseline_mean": (bmean, abs(bmean)),
            "baseline_std": (bstd, base.get("std_scale", abs(bstd))),
            "dev_baseline": (dev, abs(recent) + abs(bmean)),
            "z_baseline": (
                dev / bstd if bstd > 0 else nan,
                (abs(recent) + abs(bmean)) / bstd if bstd > 0 else nan,
            ),
            "total_24h": (total, abs(total)),
            "baseline_daily": (daily, abs(daily)),
            "ratio_baseline": (total / daily if daily > 0 else nan, abs(total / daily)),
            "last_night_vs_baseline": (
                np.longdouble(night) - bmean,
                abs(np.longdouble(night)) + abs(bmean),
            ),
        }[rest]
        return r, scale


def differing_cells(got: pd.DataFrame, want: pd.DataFrame) -> dict[str, np.ndarray]:
    """Rows per column whose float64 bits differ (NaN equals NaN whatever its payload)."""
    out: dict[str, np.ndarray] = {}
    for name in want.columns:
        if name in ID_COLS:
            continue
        a = got[name].to_numpy(dtype=np.float64)
        b = want[name].to_numpy(dtype=np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        bad = np.flatnonzero((a.view(np.int64) != b.view(np.int64)) & ~both_nan)
        if len(bad):
            out[name] = bad
    return out


def assert_golden(
    got: pd.DataFrame, want: pd.DataFrame, obs: pd.DataFrame, config: FeaturesConfig
) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for c in ID_COLS:
        if c in want:
            np.testing.assert_array_equal(got[c].to_numpy(), want[c].to_numpy(), err_msg=c)
    codes = sorted(set(obs["code"]))
    diff = differing_cells(got, want)
    strict = {n: r for n, r in diff.items() if moment_feature(n, codes) is None}
    shown = [
        f"{n}[{r[0]}]: {got[n].iloc[r[0]]!r} != {want[n].iloc[r[0]]!r}" for n, r in strict.items()
    ]
    assert not strict, f"{len(strict)} columns differ from the golden features, e.g. {shown[:10]}"
    ref = Reference(obs, config)
    worse: list[str] = []
    for name, rows in diff.items():
        code, rest = moment_feature(name, codes)  # type: ignore[misc]
        night = got.get(f"{code}_last_night")
        for i in rows.tolist():
            pid, t = got["patient_id"].iloc[i], int(got["time"].iloc[i].value)
            r, scale = ref.value(pid, code, t, rest, np.nan if night is None else night.iloc[i])
            new, old = got[name].iloc[i], want[name].iloc[i]
            err_new = abs(np.longdouble(new) - r)
            err_old = abs(np.longdouble(old) - r)
            ulps = 8 * np.spacing(np.float64(scale))  # rounding of the last steps
            if not (err_new <= 1e-9 * abs(r) + ulps and err_new <= max(err_old, ulps)):
                worse.append(f"{name}[{i}]: new {new!r} old {old!r} reference {r!r}")
    assert not worse, f"{len(worse)} changed cells are not corrections, e.g. {worse[:5]}"


@pytest.mark.parametrize("name", ["params", "variant"])
def test_stage_rows_are_the_golden_bits(golden, name):
    config = FeaturesConfig.model_validate(golden["configs"][name])
    frame, report = build_feature_matrix_with_report(
        golden["obs"], golden["pats"], golden["outs"], config, golden["vocab"]
    )
    want = pd.read_parquet(GOLDEN / f"expected_{name}.parquet")
    assert_golden(frame, want, golden["obs"], config)
    assert report.rows == golden["meta"]["reports"][name]["rows"]
    assert report.excluded == golden["meta"]["reports"][name]["excluded"]


@pytest.mark.parametrize("name", ["params", "variant"])
def test_one_patient_per_call_is_the_golden_bits(golden, name):
    config = FeaturesConfig.model_validate(golden["configs"][name])
    want = pd.read_parquet(GOLDEN / f"serving_{name}.parquet")
    obs, pats = golden["obs"], golden["pats"]
    got = pd.concat(
        [
            compute_features(
                obs[obs["patient_id"] == pid],
                pats,
                want.iloc[[i]][["patient_id", "time"]],
                config,
                golden["vocab"],
            )
            for i, pid in enumerate(want["patient_id"])
        ],
        ignore_index=True,
    )
    assert_golden(got, want, obs, config)


def test_float32_output_is_the_cast_of_the_float64_output(golden):
    """The stage writes float32: the same values, rounded once."""
    frames = [
        build_feature_matrix_with_report(
            golden["obs"],
            golden["pats"],
            golden["outs"],
            FeaturesConfig.model_validate(dict(golden["configs"]["params"], dtype=dtype)),
            golden["vocab"],
        )[0]
        for dtype in ("float32", "float64")
    ]
    feats = [c for c in frames[0].columns if c not in ID_COLS]
    a = frames[0][feats].to_numpy()
    assert a.dtype == np.float32
    b = frames[1][feats].to_numpy(dtype=np.float64).astype(np.float32)
    same = (a.view(np.int32) == b.view(np.int32)) | (np.isnan(a) & np.isnan(b))
    assert same.all(), f"{int((~same).sum())} float32 cells differ"
