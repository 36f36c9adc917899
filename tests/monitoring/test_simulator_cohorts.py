"""The monitor on the simulator's own cohorts: simulate -> ingest -> build_feature_matrix.

Reference = the features of a baseline cohort; current = a fresh cohort of new patients
(one seed), without drift and with each drift of ``vitalrisk simulate --drift``. The same
seed gives the same patients in every variant, so the hr_offset cohort is the fresh cohort
plus the wearable offset. Params are the repository's ``monitor`` section (patient unit).
"""

from pathlib import Path

import pandas as pd
import pytest

from features.vocabulary import load_vocabulary
from monitoring import monitor as mon
from monitoring.config import MonitorConfig
from pipelines.monitor import simulated_features
from pipelines.params import load_section

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
REFERENCE_PATIENTS = 300
CURRENT_PATIENTS = 100
SEED = 1001


@pytest.fixture(scope="session")
def sim_config() -> MonitorConfig:
    cfg = load_section(MonitorConfig, "monitor", PARAMS)
    return cfg.model_copy(update={"reference_size": 10**7, "current_size": 10**7})


@pytest.fixture(scope="session")
def cohorts(tmp_path_factory):
    """Feature matrices, simulated once per session on first use."""
    root = tmp_path_factory.mktemp("sim")
    cache: dict[str, pd.DataFrame] = {}

    def get(kind: str) -> pd.DataFrame:
        if kind not in cache:
            if kind == "reference":
                cache[kind] = simulated_features(
                    PARAMS, "none", REFERENCE_PATIENTS, 0, root / kind, purpose="model_training"
                )
            else:
                cache[kind] = simulated_features(PARAMS, kind, CURRENT_PATIENTS, SEED, root / kind)
        return cache[kind]

    return get


def _monitor(reference: pd.DataFrame, current: pd.DataFrame, config: MonitorConfig) -> dict:
    vocab = load_vocabulary()
    kinds = mon.column_kinds(reference, config.exclude)
    codes = mon.feature_codes(kinds, vocab)
    ranges = mon.vocabulary_ranges(codes, vocab, config.quality.range_stats)
    cats = mon.reference_categories(reference, kinds)
    cw = mon.collect_current([current], len(current), kinds, ranges, cats, config)
    return mon.evaluate(reference, cw, kinds, codes, ranges, cats, config, report=False).summary


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


@pytest.mark.xfail(
    reason="+3 bpm on the ~45% home patients is ~0.25 between-patient SD at home: cohorts of "
    "100 vs 300 patients cannot tell it from a fresh cohort (see benchmarks: simulator rates)",
    strict=False,
)
def test_wearable_offset_is_detected_on_heart_rate(cohorts, sim_config):
    s = _monitor(cohorts("reference"), cohorts("hr_offset"), sim_config)
    assert s["verdict"] in {"warn", "retrain"}
    signals = s["drifted_signals"]
    assert "heart_rate" in signals and signals["heart_rate"] == max(signals.values())
