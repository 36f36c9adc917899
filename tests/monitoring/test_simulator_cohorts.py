"""The monitor on the simulator's own cohorts: simulate -> ingest -> build_feature_matrix.

Reference = the features of a baseline cohort; current = a fresh cohort of new patients
(one seed), without drift and with each drift of ``vitalrisk simulate --drift``. The same
seed gives the same patients in every variant, so the hr_offset cohort is the fresh cohort
plus the wearable offset. Params are the repository's ``monitor`` section (patient unit,
tests within each care setting).

The wearable offset (+3 bpm, a quarter of the between-patient SD of heart rate) needs
hundreds of home patients on each side (the benchmark's power curve, mixed population vs a
2,764-patient reference: 0/20 at 100-patient windows, 7/20 at 300, 19/20 at 1,000). Its test
uses a home-care programme cohort (every patient at home, 7-14 days of follow-up, 10/15-minute
wearables: the cheap part of the simulator) of 1,500 reference and 600 current patients; the
offset's smallest heart-rate KS p-value there is ~1e-5 (threshold 1e-4), the fresh cohort's
smallest p-value ~0.05.
"""

from pathlib import Path

import pandas as pd
import pytest

from core.params import load_section
from core.vocabulary import load_vocabulary
from monitoring import monitor as mon
from monitoring.config import MonitorConfig
from pipelines.monitor import simulated_features

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
REFERENCE_PATIENTS = 300
CURRENT_PATIENTS = 100
SEED = 1001


@pytest.fixture(scope="session")
def sim_config() -> MonitorConfig:
    cfg = load_section(MonitorConfig, "monitor", PARAMS)
    return cfg.model_copy(update={"reference_size": 10**7, "current_size": 10**7})


def _cohorts(root, reference_n: int, current_n: int, simulate: dict | None = None):
    """``get(kind)``: the reference (seed 0, training consent) or a current cohort (seed
    ``SEED``, drift ``kind``; ``none`` = fresh), simulated on first use and kept."""
    cache: dict[str, pd.DataFrame] = {}

    def get(kind: str) -> pd.DataFrame:
        if kind not in cache:
            if kind == "reference":
                n, seed, purpose, drift = reference_n, 0, "model_training", "none"
            else:
                n, seed, purpose, drift = current_n, SEED, "care", kind
            cache[kind] = simulated_features(
                PARAMS, drift, n, seed, root / kind, purpose=purpose, simulate=simulate
            )
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def cohorts(tmp_path_factory):
    """Feature matrices, simulated once per session on first use."""
    return _cohorts(tmp_path_factory.mktemp("sim"), REFERENCE_PATIENTS, CURRENT_PATIENTS)


def _monitor(reference: pd.DataFrame, current: pd.DataFrame, config: MonitorConfig) -> dict:
    return mon.FrameMonitor(reference, config, load_vocabulary()).evaluate(current).summary


def test_fresh_simulated_cohort_raises_no_alarm(cohorts, sim_config):
    s = _monitor(cohorts("reference"), cohorts("none"), sim_config)
    assert s["verdict"] == "ok", s["reasons"]
    assert s["drifted_features"] == []


def test_more_missing_spo2_is_flagged_on_spo2(cohorts, sim_config):
    s = _monitor(cohorts("reference"), cohorts("spo2_missing"), sim_config)
    assert s["verdict"] in {"warn", "retrain"}, s["reasons"]
    signals = s["drifted_signals"]
    assert "spo2" in signals and signals["spo2"] == max(signals.values()), s["reasons"]
    assert not any(c.startswith("heart_rate") for c in s["drifted_features"])


def test_wearable_offset_moves_the_heart_rate_levels(cohorts, sim_config):
    """The offset is in the heart-rate level features and nowhere else (same patients)."""
    ref = cohorts("reference")
    fresh = _monitor(ref, cohorts("none"), sim_config)["features"]
    shifted = _monitor(ref, cohorts("hr_offset"), sim_config)["features"]
    levels = [c for c in shifted if c.startswith("heart_rate_mean_")]
    assert levels
    # the home patients' heart rate moved by 3 bpm, so the test statistic changes
    assert any(shifted[c]["score"] != fresh[c]["score"] for c in levels)
    moved = {c for c in shifted if (shifted[c]["score"] or 0) != (fresh[c]["score"] or 0)}
    assert moved and all(c.startswith(("heart_rate", "news2", "shock_index")) for c in moved), (
        sorted(moved)
    )


# --------------------------------------------------------------------------- home programme
HOME_COHORT = {
    "home_fraction": 1.0,
    "followup_days": [7, 14],
    "wearable_intervals_min": [10, 15],
    "wearable_interval_weights": [0.5, 0.5],
}
HOME_REFERENCE_PATIENTS = 1500
HOME_CURRENT_PATIENTS = 600


@pytest.fixture(scope="session")
def home_cohorts(tmp_path_factory):
    """Large home-programme cohorts, simulated once per session on first use (~1 min)."""
    return _cohorts(
        tmp_path_factory.mktemp("sim_home"),
        HOME_REFERENCE_PATIENTS,
        HOME_CURRENT_PATIENTS,
        simulate=HOME_COHORT,
    )


def test_fresh_home_programme_window_raises_no_alarm(home_cohorts, sim_config):
    s = _monitor(home_cohorts("reference"), home_cohorts("none"), sim_config)
    assert s["verdict"] == "ok", s["reasons"]
    assert s["segments"]["setting=home"]["tested"]
    assert s["segments"]["setting=home"]["current_units"] >= 500


def test_wearable_offset_is_detected_on_heart_rate(home_cohorts, sim_config):
    """+3 bpm on every home-wearable heart rate: warn, heart rate named, within ``home``."""
    s = _monitor(home_cohorts("reference"), home_cohorts("hr_offset"), sim_config)
    assert s["verdict"] in {"warn", "retrain"}, s["reasons"]
    signals = s["drifted_signals"]
    assert "heart_rate" in signals and signals["heart_rate"] == max(signals.values()), signals
    home = s["segments"]["setting=home"]
    assert home["tested"] and any(c.startswith("heart_rate_") for c in home["drifted"])
    # an offset moves levels: nothing outside heart rate and what is computed from it
    assert all(c.startswith(("heart_rate", "news2", "shock_index")) for c in s["drifted_features"])
    assert not any("_std_" in c or "_count_" in c for c in s["drifted_features"])
    assert any("heart_rate_" in r and "setting=home" in r for r in s["reasons"])
