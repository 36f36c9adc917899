"""Prediction times and labels: exclusions after event, after follow-up, partial horizons."""

from __future__ import annotations

import pandas as pd
import pytest

from features.config import FeaturesConfig, PredictionTimes
from features.labels import label_times, prediction_times

from .conftest import T0

H = pd.Timedelta(hours=1)


def _patients(rows):
    p = pd.DataFrame(rows, columns=["patient_id", "setting", "followup_start", "followup_end"])
    for c in ("followup_start", "followup_end"):
        p[c] = pd.to_datetime(p[c], utc=True).dt.as_unit("ns")
    return p


def _outcomes(rows):
    o = pd.DataFrame(rows, columns=["patient_id", "time", "event"])
    o["time"] = pd.to_datetime(o["time"], utc=True).dt.as_unit("ns")
    return o


@pytest.fixture
def two_patients():
    pats = _patients([("p_a", "ward", T0, T0 + 48 * H), ("p_b", "ward", T0, T0 + 48 * H)])
    outs = _outcomes([("p_a", T0 + 30 * H, "icu_transfer")])
    return pats, outs


def test_cadence_times(two_patients):
    pats, _ = two_patients
    t = prediction_times(pats, FeaturesConfig())
    a = t[t.patient_id == "p_a"]
    assert len(a) == 48 and a.time.min() == T0 + H and a.time.max() == T0 + 48 * H
    assert (t.setting == "ward").all()


def test_labels_and_exclusions(two_patients):
    pats, outs = two_patients
    cfg = FeaturesConfig()
    lab, excl = label_times(prediction_times(pats, cfg), pats, outs, cfg)
    a = lab[lab.patient_id == "p_a"].set_index("time")["label"]
    # event at 30 h: times 6..29 h see it within 24 h; 1..5 h do not; >= 30 h are excluded
    assert a[T0 + 6 * H] == 1 and a[T0 + 29 * H] == 1 and a[T0 + 5 * H] == 0
    assert a.index.max() == T0 + 29 * H
    b = lab[lab.patient_id == "p_b"].set_index("time")["label"]
    # no event, follow-up ends at 48 h: horizons past it are excluded, not labelled 0
    assert b.index.max() == T0 + 24 * H and (b == 0).all()
    assert excl["after_event"] == 19  # 30..48 h
    assert excl["partial_horizon"] == 24  # p_b 25..48 h
    assert len(lab) == 29 + 24


def test_event_types_filter_and_outside_followup(two_patients):
    pats, _ = two_patients
    outs = _outcomes([("p_a", T0 + 30 * H, "fall")])
    cfg = FeaturesConfig()
    times = pd.DataFrame(
        {"patient_id": ["p_a", "p_a", "p_a"], "time": [T0 + 2 * H, T0 + 60 * H, T0 - H]}
    )
    times["time"] = times["time"].astype("datetime64[ns, UTC]")
    lab, excl = label_times(times, pats, outs, cfg)
    assert lab["label"].tolist() == [0]  # "fall" is not a configured event type
    assert excl["outside_followup"] == 2


def test_setting_horizon_and_no_setting():
    pats = _patients([("p_h", "home", T0, T0 + 20 * 24 * H), ("p_x", "icu", T0, T0 + 48 * H)])
    outs = _outcomes([("p_h", T0 + 10 * 24 * H, "emergency_admission")])
    cfg = FeaturesConfig()
    times = prediction_times(pats, cfg)
    assert set(times.patient_id) == {"p_h"}  # no prediction-time rule for "icu"
    lab, _ = label_times(times, pats, outs, cfg)
    pos = lab[lab.label == 1]
    # home horizon 168 h: positive from 3 days before the event
    assert pos.time.min() == T0 + (10 * 24 - 168) * H
    extra = pd.DataFrame({"patient_id": ["p_x"], "time": [T0 + H]})
    extra["time"] = extra["time"].astype("datetime64[ns, UTC]")
    _, excl = label_times(extra, pats, outs, cfg)
    assert excl["no_setting"] == 1


def test_once_and_each_observation_modes(two_patients):
    pats, _ = two_patients
    cfg = FeaturesConfig(prediction_times={"ward": PredictionTimes(mode="once", offset_hours=24)})
    t = prediction_times(pats, cfg)
    assert t.groupby("patient_id").size().tolist() == [1, 1]
    assert (t.time == T0 + 24 * H).all()
    obs = pd.DataFrame(
        {
            "patient_id": ["p_a", "p_a", "p_a", "p_b"],
            "time": [T0 + H, T0 + H, T0 + 50 * H, T0 + 2 * H],
            "code": ["heart_rate", "spo2", "heart_rate", "heart_rate"],
            "value": [80.0, 95.0, 70.0, 60.0],
        }
    )
    obs["time"] = obs["time"].astype("datetime64[ns, UTC]")
    cfg = FeaturesConfig(prediction_times={"ward": PredictionTimes(mode="each_observation")})
    t = prediction_times(pats, cfg, obs)
    # distinct observation times within follow-up (50 h is after its end)
    assert list(zip(t.patient_id, t.time, strict=True)) == [
        ("p_a", T0 + H),
        ("p_b", T0 + 2 * H),
    ]


def test_missing_followup_falls_back_to_observations():
    pats = _patients([("p_a", "ward", None, None)])
    obs = pd.DataFrame(
        {
            "patient_id": ["p_a", "p_a"],
            "time": [T0, T0 + 5 * H],
            "code": "heart_rate",
            "value": 80.0,
        }
    )
    obs["time"] = obs["time"].astype("datetime64[ns, UTC]")
    t = prediction_times(pats, FeaturesConfig(), obs)
    assert t.time.tolist() == [T0 + k * H for k in range(1, 6)]
