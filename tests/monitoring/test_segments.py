"""Drift within a care setting: a shift confined to one segment is found there, not diluted."""

import numpy as np
import pandas as pd
import pytest

from monitoring import monitor as mon
from monitoring.config import DriftConfig, DriftTest, MonitorConfig

P = DriftTest(method="ks", threshold=1e-4)


def _patients(n: int, seed: int, home_shift: float = 0.0, rows: int = 4) -> pd.DataFrame:
    """``rows`` correlated rows per patient; home patients read ``home_shift`` higher on x."""
    rng = np.random.default_rng(seed)
    setting = np.where(rng.random(n) < 0.5, "home", "ward")
    # the ward's level sits far from the home one: the mixture hides a home-only shift
    level = rng.normal(0, 1, n) + np.where(setting == "ward", 4.0, 0.0)
    level = level + np.where(setting == "home", home_shift, 0.0)
    frame = pd.DataFrame(
        {
            "patient_id": np.repeat([f"p{seed}_{i}" for i in range(n)], rows),
            "setting": np.repeat(setting, rows),
            "x": np.repeat(level, rows) + rng.normal(0, 0.2, n * rows),
            "y": np.repeat(rng.normal(0, 1, n), rows) + rng.normal(0, 0.2, n * rows),
            "flag": (rng.random(n * rows) < 0.3).astype(float),
        }
    )
    return frame


def _config(**update) -> MonitorConfig:
    return MonitorConfig(
        reference_size=10**6,
        current_size=10**6,
        drift=DriftConfig(
            numerical=P, binary=DriftTest(method="z", threshold=1e-4), unit="patient"
        ),
        **update,
    )


def _summary(reference: pd.DataFrame, current: pd.DataFrame, config: MonitorConfig) -> dict:
    kinds = mon.column_kinds(reference, config.exclude)
    cats = mon.reference_categories(reference, kinds)
    cw = mon.collect_current([current], len(current), kinds, {}, cats, config)
    return mon.evaluate(reference, cw, kinds, {}, {}, cats, config, report=False).summary


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return {
        "reference": _patients(2000, seed=1),
        "fresh": _patients(1000, seed=2),
        "home_shift": _patients(1000, seed=2, home_shift=0.3),
    }


def test_home_only_shift_is_missed_overall_and_found_at_home(frames):
    overall = _summary(frames["reference"], frames["home_shift"], _config())
    assert overall["drifted_features"] == []  # diluted by the ward (the old monitor's miss)
    s = _summary(frames["reference"], frames["home_shift"], _config(segment_by=["setting"]))
    assert s["verdict"] == "warn", s["reasons"]
    assert s["drifted_features"] == ["x"]
    assert s["segments"]["setting=home"]["drifted"] == ["x"]
    assert s["segments"]["setting=ward"]["drifted"] == []
    assert s["features"]["x"]["segments_drifted"].keys() == {"setting=home"}
    assert "setting=home" in " ".join(s["reasons"])
    assert s["drift_unit"] == "patient"


def test_segments_on_fresh_patients_raise_no_alarm(frames):
    s = _summary(frames["reference"], frames["fresh"], _config(segment_by=["setting"]))
    assert s["verdict"] == "ok", s["reasons"]
    assert all(v["tested"] for v in s["segments"].values())


def test_small_segments_are_sized_in_patients_and_skipped(frames):
    """A segment counts patients, not rows (4 rows each here): 40 home patients < 50."""
    cur = frames["home_shift"]
    keep = cur["patient_id"].isin(cur["patient_id"].unique()[:80])
    s = _summary(frames["reference"], cur[keep], _config(segment_by=["setting"]))
    home = s["segments"]["setting=home"]
    assert home["current_units"] < 50 <= home["current_units"] * 4
    assert home["tested"] is False and home["drifted"] == []


def test_reference_units_precomputed_give_the_same_findings(frames):
    config = _config(segment_by=["setting"])
    ref, cur = frames["reference"], frames["home_shift"]
    kinds = mon.column_kinds(ref, config.exclude)
    cats = mon.reference_categories(ref, kinds)
    units = mon.patient_units(ref, kinds)
    cw = mon.collect_current([cur], len(cur), kinds, {}, cats, config)
    a = mon.evaluate(ref, cw, kinds, {}, {}, cats, config, report=False).summary
    b = mon.evaluate(
        ref, cw, kinds, {}, {}, cats, config, report=False, reference_units=units
    ).summary
    assert a["features"] == b["features"]
    assert a["verdict"] == b["verdict"]


def test_window_sample_takes_whole_patients_without_length_bias(tmp_path):
    """A batch-written log keeps each patient's rows together; home patients have 1/6 of
    the ward's rows. Row blocks drop home patients; a patient-balanced sample does not."""
    from monitoring import prediction_log as plog

    rng = np.random.default_rng(5)
    n_home, n_ward = 300, 300
    rows = np.r_[np.full(n_home, 8), np.full(n_ward, 48)]
    setting = np.r_[["home"] * n_home, ["ward"] * n_ward]
    order = rng.permutation(len(rows))
    pid = np.repeat([f"p{i}" for i in order], rows[order])
    feats = pd.DataFrame(
        {"setting": np.repeat(setting[order], rows[order]), "x": rng.normal(0, 1, len(pid))}
    )
    n = len(pid)
    log = tmp_path / "log.sqlite"
    plog.write_predictions(
        log,
        pd.DataFrame(
            {
                "request_id": [f"r{i}" for i in range(n)],
                "scored_at": pd.Timestamp("2026-11-01", tz="UTC")
                + pd.to_timedelta(np.arange(n), unit="s"),
                "patient_id": pid,
                "model_name": "m",
                "model_version": "1",
                "role": "champion",
                "probability": 0.1,
                "news2_total": 0.0,
                "features": feats.to_dict(orient="records"),
            }
        ),
    )
    window = plog.find_window(log, 3650, "champion")
    schema = {"setting": "str", "x": "float"}

    def home_share(by_patient: bool) -> tuple[float, pd.DataFrame]:
        parts = plog.sample_window(log, window, "champion", schema, 4000, 0, 1000, by_patient)
        s = pd.concat(list(parts))
        per = s.groupby("patient_id")["setting"].first()
        return float((per == "home").mean()), s

    blocks, _ = home_share(False)
    patients, sample = home_share(True)
    assert blocks < 0.42  # the row-block sample: home patients under-represented (0.37)
    assert patients == 0.5
    assert 3500 < len(sample) <= 4000
    # balanced: every patient, each with min(own rows, one common cap), rows not repeated
    counts = sample.groupby("patient_id").size()
    assert len(counts) == n_home + n_ward
    assert sample["request_id"].is_unique
    full = pd.Series(pid).value_counts().reindex(counts.index)
    cap = int(counts.max())
    assert (counts == np.minimum(full, cap)).all()
    assert len(sample) + len(counts) > 4000  # the largest cap that fits: cap + 1 would not
