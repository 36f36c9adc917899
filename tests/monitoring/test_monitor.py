"""The monitor tested like a model: alarms on the simulator's drifts, silence on fresh samples."""

import numpy as np
import pandas as pd
import pytest

from monitoring import monitor as mon
from monitoring import prediction_log as plog
from tests.monitoring.conftest import frame

#: drift kind -> (vocabulary code or feature the verdict must name, features that must NOT drift)
EXPECTED = {
    "hr_offset": "heart_rate",
    "older": "age",
    "spo2_missing": "spo2",
}


def _run(reference, log, config, vocab):
    return mon.monitor_log(reference, str(log), config, vocab)


def test_fresh_sample_from_training_distribution_raises_no_alarm(
    reference, make_log, config, vocab
):
    res = _run(reference, make_log("none", seed=11), config, vocab)
    assert res.verdict == "ok", res.summary["reasons"]
    assert res.exit_code == 0
    assert res.summary["drifted_features"] == []
    assert res.summary["predicted_risk"]["drift"]["drift"] is False


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_drifted_variant_is_flagged_on_the_right_features(kind, reference, make_log, config, vocab):
    res = _run(reference, make_log(kind, seed=12), config, vocab)
    s = res.summary
    assert res.verdict in {"warn", "retrain"}
    assert res.exit_code in {10, 20}
    drifted = s["drifted_features"]
    target = EXPECTED[kind]
    if kind == "older":
        assert drifted[0] == "age"  # the largest effect is named first
    else:
        assert target in s["drifted_signals"]
        assert max(s["drifted_signals"], key=s["drifted_signals"].get) == target
    if kind == "hr_offset":  # a device offset moves levels, not spreads or counts
        assert [c for c in drifted if not c.startswith("heart_rate_")] == [], s["reasons"]
        assert not any("_std_" in c or "_count_" in c for c in drifted)
        assert any("heart_rate_mean" in r for r in s["reasons"])
    if kind == "spo2_missing":
        assert s["features"]["spo2_last"]["missing_drift"] is True
        assert not any(c.startswith("heart_rate") for c in drifted)


def test_quality_findings_out_of_range_and_new_categories(reference, make_log, config, vocab):
    cur = frame(5000, seed=13)
    cur.loc[:249, "heart_rate_last"] = 400.0  # unit mix-up upstream: 5 % impossible values
    cur.loc[:149, "setting"] = "icu"  # a care setting never seen in training
    res = _run(reference, make_log(data=cur), config, vocab)
    reasons = " ".join(res.summary["reasons"])
    assert res.verdict in {"warn", "retrain"}
    assert "heart_rate_last: 5.0% of values outside the plausible range [20, 300]" in reasons
    assert "setting" in reasons and "icu" in reasons
    assert res.summary["features"]["setting"]["new_category_share"] == pytest.approx(0.03)


def _label(log, frame, permute=False, seed=0):
    """Feed back every prediction's label (optionally scrambled: a broken model)."""
    lab = frame["label"].to_numpy()
    if permute:
        lab = np.random.default_rng(seed).permutation(lab)
    w = plog.find_window(log, 3650, "champion")
    ids = pd.concat(plog.iter_window(log, w, "champion", {}, 10_000))[["request_id", "patient_id"]]
    plog.write_outcomes(log, ids.assign(label=lab))


def test_performance_once_outcomes_arrive(reference, make_log, config, vocab):
    cur = frame(5000, seed=14)
    log = make_log(data=cur)
    _label(log, cur)
    perf = _run(reference, log, config, vocab).summary["performance"]
    assert perf["evaluated"] is True
    assert perf["overall"]["n"] == 5000
    assert perf["overall"]["auroc"] > 0.65
    assert perf["overall"]["ece"] < 0.05  # the synthetic labels are drawn from the risk
    assert len(perf["over_time"]) >= 3  # three days of predictions, daily periods
    assert {"auroc", "auprc", "brier", "ece"} <= set(perf["over_time"][0])


def test_broken_model_performance_asks_for_retraining(reference, make_log, config, vocab):
    cur = frame(5000, seed=15)
    log = make_log(data=cur)
    _label(log, cur, permute=True)
    res = _run(reference, log, config, vocab)
    assert res.verdict == "retrain"
    assert any("AUROC" in r and "retrain floor" in r for r in res.summary["reasons"])
    assert "performance" in res.snapshots


def test_empty_window_is_a_clear_error(reference, tmp_path, config, vocab):
    log = tmp_path / "empty.sqlite"
    plog.ensure_tables(log)
    with pytest.raises(ValueError, match="no 'champion' predictions"):
        _run(reference, log, config, vocab)


def test_vocabulary_ranges_only_for_level_statistics(vocab):
    cols = ["heart_rate_mean_4h", "heart_rate_std_4h", "heart_rate_count_4h", "spo2_last", "age"]
    codes = mon.feature_codes(cols, vocab)
    assert codes == {
        c: c.split("_4h")[0].rsplit("_", 1)[0] if "4h" in c else "spo2" for c in cols[:4]
    }
    ranges = mon.vocabulary_ranges(codes, vocab, ["last", "mean", "min", "max"])
    tol = vocab.range_tolerance
    assert tol > 0 and ranges == {
        "heart_rate_mean_4h": (20.0 * (1 - tol), 300.0 * (1 + tol)),
        "spo2_last": (40.0 * (1 - tol), 100.0 * (1 + tol)),
    }
    # a feature stored as float32 at a limit (FiO2 0.21 reads back as 0.2099999934) is
    # inside its range, as the same value was at ingest; a real departure is not
    ((lo, hi),) = mon.vocabulary_ranges({"fio2_last": "fio2"}, vocab, ["last"]).values()
    assert lo <= float(np.float32(0.21)) and float(np.float32(1.0)) <= hi
    assert lo > 0.2 and hi < 1.01


def test_sampled_quality_estimates_match_exact_counts(reference, make_log, config, vocab):
    cur = frame(5000, seed=16, drift="spo2_missing")
    log = make_log(data=cur)
    small = config.model_copy(update={"current_size": 1500})
    sampled = _run(reference, log, small, vocab).summary
    exact = _run(reference, log, small.model_copy(update={"exact_quality": True}), vocab).summary
    assert sampled["window"]["rows"] == exact["window"]["rows"] == 5000
    assert sampled["window"]["quality_rows"] == 1500 and not sampled["window"]["quality_exact"]
    assert exact["window"]["quality_rows"] == 5000 and exact["window"]["quality_exact"]
    true_share = float(cur["spo2_last"].isna().mean())
    assert exact["features"]["spo2_last"]["missing_share_current"] == pytest.approx(
        true_share, abs=1e-4
    )
    assert sampled["features"]["spo2_last"]["missing_share_current"] == pytest.approx(
        true_share, abs=0.04
    )
    # the predicted-risk level is exact either way (one SQL pass over the window)
    assert sampled["predicted_risk"]["mean_current"] == pytest.approx(cur["probability"].mean())
