"""Window arithmetic on tiny hand-made frames, checked against direct computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import compute_features, features_for_patient
from features.config import FeaturesConfig

from .conftest import T0

H = pd.Timedelta(hours=1)


def _obs(rows: list[tuple[str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "time": pd.Series([T0 + h * H for _, h, _ in rows], dtype="datetime64[ns, UTC]"),
            "code": [c for c, _, _ in rows],
            "value": [v for _, _, v in rows],
        }
    )


def _feat(rows, at_hours: float, config: FeaturesConfig, vocab) -> pd.Series:
    out = features_for_patient(
        _obs(rows), {"age": 70, "sex": "F"}, T0 + at_hours * H, config, vocab
    )
    assert len(out) == 1
    return out.iloc[0]


@pytest.fixture(scope="module")
def cfg64() -> FeaturesConfig:
    return FeaturesConfig(dtype="float64")


def test_basic_window_stats(cfg64, vocab):
    rows = [("heart_rate", h, v) for h, v in [(-80, 50), (-20, 60), (-10, 70), (-3, 80), (-1, 100)]]
    f = _feat(rows, 0, cfg64, vocab)
    assert f["heart_rate_last"] == 100
    assert f["heart_rate_hours_since"] == pytest.approx(1.0)
    assert f["heart_rate_count_4h"] == 2
    assert f["heart_rate_mean_4h"] == pytest.approx(90)
    assert f["heart_rate_min_12h"] == 70 and f["heart_rate_max_12h"] == 100
    assert f["heart_rate_std_12h"] == pytest.approx(np.std([70, 80, 100], ddof=1))
    assert f["heart_rate_slope_12h"] == pytest.approx(
        np.polyfit([-10, -3, -1], [70, 80, 100], 1)[0]
    )
    assert f["heart_rate_count_72h"] == 4  # -80 h is outside (t - 72 h, t]
    assert f["heart_rate_missing"] == 0 and f["heart_rate_per_hour"] == pytest.approx(4 / 24)


def test_window_is_left_open_right_closed(cfg64, vocab):
    # exactly 4 h before: excluded; exactly at t: included
    f = _feat([("heart_rate", -4, 50), ("heart_rate", 0, 90)], 0, cfg64, vocab)
    assert f["heart_rate_count_4h"] == 1 and f["heart_rate_mean_4h"] == 90
    assert f["heart_rate_count_12h"] == 2


def test_single_observation_and_empty_windows(cfg64, vocab):
    f = _feat([("heart_rate", -30, 75)], 0, cfg64, vocab)
    assert f["heart_rate_last"] == 75 and f["heart_rate_hours_since"] == pytest.approx(30)
    assert f["heart_rate_count_4h"] == 0 and np.isnan(f["heart_rate_mean_4h"])
    assert np.isnan(f["heart_rate_min_24h"]) and np.isnan(f["heart_rate_max_24h"])
    assert f["heart_rate_count_72h"] == 1 and f["heart_rate_mean_72h"] == 75
    assert np.isnan(f["heart_rate_std_72h"]) and np.isnan(f["heart_rate_slope_72h"])
    assert f["heart_rate_missing"] == 1 and f["heart_rate_per_hour"] == 0
    # never-measured code: NaN values, zero counts, flagged missing
    assert np.isnan(f["lactate_last"]) and f["lactate_count_24h"] == 0 and f["lactate_missing"] == 1


def test_nan_values_are_not_observations(cfg64, vocab):
    rows = [("heart_rate", -2, 80), ("heart_rate", -1, float("nan"))]
    f = _feat(rows, 0, cfg64, vocab)
    assert f["heart_rate_last"] == 80 and f["heart_rate_count_4h"] == 1


def test_duplicates_count_once_and_ties_are_order_free(cfg64, vocab):
    dup = [("heart_rate", -2, 80), ("heart_rate", -2, 80), ("heart_rate", -1, 90)]
    f = _feat(dup, 0, cfg64, vocab)
    assert f["heart_rate_count_4h"] == 2
    a = _feat([("heart_rate", -1, 70), ("heart_rate", -1, 90)], 0, cfg64, vocab)
    b = _feat([("heart_rate", -1, 90), ("heart_rate", -1, 70)], 0, cfg64, vocab)
    pd.testing.assert_series_equal(a, b)
    assert a["heart_rate_last"] == 90  # ties at one time: the larger value is "last"


def test_gaps_and_lookback(cfg64, vocab):
    # older than lookback (168 h): not used at all, even as "last"
    f = _feat([("heart_rate", -200, 60)], 0, cfg64, vocab)
    assert np.isnan(f["heart_rate_last"]) and np.isnan(f["heart_rate_hours_since"])


def test_baseline_activity_sleep(cfg64, vocab):
    rows = []
    for d in range(1, 8):  # daily steps 1000 at -d days + 1 h, baseline window (t-7d, t-1d]
        rows.append(("steps", -24 * d + 1, 1000.0))
    rows.append(("steps", -2, 500.0))
    rows += [("sleep_duration", -24 * d + 8, 7.0) for d in range(1, 8)]
    rows.append(("sleep_duration", -3, 5.0))
    rows += [("heart_rate", -24 * d, 60.0 + d) for d in range(1, 8)]
    rows.append(("heart_rate", -1, 90.0))
    f = _feat(rows, 0, cfg64, vocab)
    # steps: last 24 h = 1000 (at -23 h) + 500; baseline daily = 6 values of 1000 over 6 days
    assert f["steps_total_24h"] == 1500
    assert f["steps_baseline_daily"] == pytest.approx(1000)
    assert f["steps_ratio_baseline"] == pytest.approx(1.5)
    assert f["sleep_duration_last_night"] == 5.0
    assert f["sleep_duration_last_night_vs_baseline"] == pytest.approx(5.0 - 7.0)
    base = [60.0 + d for d in range(1, 7)]  # -24 h is exactly t-1d: inside (t-7d, t-1d]
    assert f["heart_rate_baseline_mean"] == pytest.approx(np.mean(base))
    # recent window (t-24h, t] excludes the value at exactly -24 h
    assert f["heart_rate_dev_baseline"] == pytest.approx(90.0 - np.mean(base))
    assert f["heart_rate_z_baseline"] == pytest.approx(
        f["heart_rate_dev_baseline"] / np.std(base, ddof=1)
    )


def test_baseline_needs_min_count(cfg64, vocab):
    f = _feat([("heart_rate", -48, 60), ("heart_rate", -1, 80)], 0, cfg64, vocab)
    assert np.isnan(f["heart_rate_baseline_mean"]) and np.isnan(f["heart_rate_z_baseline"])


def test_against_brute_force(cohort, vocab):
    obs, pats, _ = cohort
    cfg = FeaturesConfig(dtype="float64")
    rng = np.random.default_rng(1)
    pids = pats["patient_id"].to_numpy()
    times = pd.DataFrame(
        {
            "patient_id": rng.choice(pids, 60),
            "time": T0 + pd.to_timedelta(rng.uniform(0, 10 * 24, 60), unit="h"),
        }
    )
    f = compute_features(obs, pats, times, cfg, vocab)
    assert len(f) == len(times.drop_duplicates())
    for _, r in f.iterrows():
        for code in ("heart_rate", "spo2", "consciousness"):
            g = obs[(obs.patient_id == r.patient_id) & (obs.code == code)]
            for w in (4, 24, 72):
                x = g[(g.time > r.time - w * H) & (g.time <= r.time)]["value"]
                assert r[f"{code}_count_{w}h"] == len(x) if code != "consciousness" else True
                if code == "consciousness":
                    assert (
                        np.isnan(r[f"{code}_max_{w}h"])
                        if x.empty
                        else r[f"{code}_max_{w}h"] == x.max()
                    )
                    continue
                if x.empty:
                    assert np.isnan(r[f"{code}_mean_{w}h"])
                    continue
                assert r[f"{code}_mean_{w}h"] == pytest.approx(x.mean(), rel=1e-9)
                assert r[f"{code}_min_{w}h"] == x.min() and r[f"{code}_max_{w}h"] == x.max()
                if len(x) > 1:
                    assert r[f"{code}_std_{w}h"] == pytest.approx(x.std(), rel=1e-12, abs=1e-13)
