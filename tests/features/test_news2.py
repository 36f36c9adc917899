"""NEWS2 sub-scores against the RCP 2017 chart, boundary by boundary, both SpO2 scales."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import features_for_patient
from features.news2 import (
    news2_scores,
    score_consciousness,
    score_heart_rate,
    score_oxygen,
    score_resp_rate,
    score_sbp,
    score_spo2_scale1,
    score_spo2_scale2,
    score_temperature,
)

from .conftest import T0


def _one(fn, x, *args):
    return float(fn(np.array([x], dtype=float), *[np.array([a], dtype=float) for a in args])[0])


@pytest.mark.parametrize(
    ("rr", "score"),
    [(4, 3), (8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3), (40, 3)],
)
def test_resp_rate(rr, score):
    assert _one(score_resp_rate, rr) == score


@pytest.mark.parametrize(
    ("spo2", "score"), [(85, 3), (91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)]
)
def test_spo2_scale1(spo2, score):
    assert _one(score_spo2_scale1, spo2) == score


@pytest.mark.parametrize(
    ("spo2", "oxygen", "score"),
    [
        (80, 0, 3), (83, 1, 3), (84, 0, 2), (85, 0, 2), (86, 0, 1), (87, 1, 1),
        (88, 0, 0), (92, 1, 0), (93, 0, 0), (97, 0, 0), (100, 0, 0),  # on air >= 93: 0
        (93, 1, 1), (94, 1, 1), (95, 1, 2), (96, 1, 2), (97, 1, 3), (100, 1, 3),
    ],
)  # fmt: skip
def test_spo2_scale2(spo2, oxygen, score):
    assert _one(score_spo2_scale2, spo2, oxygen) == score


@pytest.mark.parametrize(
    ("sbp", "score"),
    [(70, 3), (90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)],
)
def test_sbp(sbp, score):
    assert _one(score_sbp, sbp) == score


@pytest.mark.parametrize(
    ("hr", "score"),
    [(30, 3), (40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2),
     (130, 2), (131, 3), (180, 3)],
)  # fmt: skip
def test_heart_rate(hr, score):
    assert _one(score_heart_rate, hr) == score


@pytest.mark.parametrize(
    ("temp", "score"),
    [(34.0, 3), (35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1),
     (39.1, 2), (41.0, 2)],
)  # fmt: skip
def test_temperature(temp, score):
    assert _one(score_temperature, temp) == score


@pytest.mark.parametrize(("acvpu", "score"), [(0, 0), (1, 3), (2, 3), (3, 3), (4, 3)])
def test_consciousness_anything_but_alert_scores_3(acvpu, score):
    assert _one(score_consciousness, acvpu) == score


@pytest.mark.parametrize(("o2", "score"), [(0, 0), (1, 2)])
def test_oxygen(o2, score):
    assert _one(score_oxygen, o2) == score


def test_rounding_to_chart_resolution():
    assert _one(score_heart_rate, 90.4) == 0 and _one(score_heart_rate, 90.5) == 1
    assert _one(score_temperature, 36.04) == 1 and _one(score_temperature, 36.05) == 0


def test_total_missing_and_nan():
    latest = {"rr": np.array([22.0, np.nan]), "hr": np.array([120.0, np.nan])}
    out = news2_scores(latest, np.array([False, False]))
    assert out["news2_total"].tolist() == [4.0, 0.0]
    assert out["news2_n_missing"].tolist() == [5.0, 7.0]
    assert np.isnan(out["news2_sbp"]).all()


def test_news2_from_observations_uses_scale2_for_flagged_patients(config, vocab):
    h = pd.Timedelta(hours=1)
    obs = pd.DataFrame(
        {
            "time": [T0 - 2 * h] * 7,
            "code": [
                "resp_rate",
                "spo2",
                "o2_support",
                "sbp",
                "heart_rate",
                "body_temp",
                "consciousness",
            ],
            "value": [22.0, 95.0, 1.0, 105.0, 95.0, 38.5, 2.0],
        }
    )
    obs["time"] = obs["time"].astype("datetime64[ns, UTC]")
    s1 = features_for_patient(obs, {"spo2_scale2": 0}, T0, config, vocab).iloc[0]
    s2 = features_for_patient(obs, {"spo2_scale2": 1}, T0, config, vocab).iloc[0]
    # rr 22 -> 2, o2 -> 2, sbp 105 -> 1, hr 95 -> 1, temp 38.5 -> 1, voice -> 3
    assert s1["news2_spo2"] == 1 and s1["news2_total"] == 2 + 1 + 2 + 1 + 1 + 1 + 3
    assert s2["news2_spo2"] == 2 and s2["news2_total"] == 2 + 2 + 2 + 1 + 1 + 1 + 3
    assert s1["news2_spo2_scale"] == 1 and s2["news2_spo2_scale"] == 2
    assert s1["shock_index"] == pytest.approx(95 / 105, rel=1e-6)
    # stale values (older than news2.max_age_hours) count as not measured
    old = obs.assign(time=obs["time"] - pd.Timedelta(hours=30))
    s3 = features_for_patient(old, {}, T0, config, vocab).iloc[0]
    assert s3["news2_total"] == 0 and s3["news2_n_missing"] == 7
