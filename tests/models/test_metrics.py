"""Metric definitions checked against scikit-learn and hand-computed examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from models.metrics import (
    Exposure,
    PatientBootstrap,
    alert_metrics,
    auprc,
    auroc,
    bootstrap_ci,
    brier,
    cadence_hours,
    calibration_slope_intercept,
    lead_times_hours,
    threshold_for_budget,
)

Y = np.array([0, 0, 1, 1, 0, 1, 0, 0])
S = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.05, 0.6])


def test_ranking_and_brier_match_sklearn():
    assert auroc(Y, S) == pytest.approx(roc_auc_score(Y, S))
    assert auprc(Y, S) == pytest.approx(average_precision_score(Y, S))
    assert brier(Y, S) == pytest.approx(brier_score_loss(Y, S))
    # hand check: 15 positive/negative pairs, 13 ordered correctly
    assert auroc(Y, S) == pytest.approx(13 / 15)


def test_single_class_gives_none_not_crash():
    assert auroc(np.zeros(4, int), S[:4]) is None
    assert auprc(np.zeros(4, int), S[:4]) is None
    assert calibration_slope_intercept(np.zeros(4, int), S[:4])["calibration_slope"] is None


def test_calibration_slope_of_well_calibrated_and_overconfident():
    rng = np.random.default_rng(0)
    lp = rng.normal(-2, 1.5, 20000)
    p = 1 / (1 + np.exp(-lp))
    y = (rng.random(len(p)) < p).astype(int)
    good = calibration_slope_intercept(y, p)
    assert good["calibration_slope"] == pytest.approx(1.0, abs=0.07)
    assert good["calibration_intercept"] == pytest.approx(0.0, abs=0.12)
    assert good["calibration_in_the_large"] == pytest.approx(0.0, abs=0.06)
    over = 1 / (1 + np.exp(-2 * lp))  # too extreme -> slope ~0.5
    assert calibration_slope_intercept(y, over)["calibration_slope"] == pytest.approx(0.5, abs=0.05)


def test_alert_metrics_by_hand():
    alert = S >= 0.5
    exp = Exposure(2.0, "patient_days")
    m = alert_metrics(Y, alert, exp, patient=np.array(list("aabbccdd")))
    # alerts at rows 3, 5, 7: TP=2 (rows 3,5), FP=1 (row 7); positives=3
    assert m["alerts"] == 3
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["alerts_per_100_patient_days"] == pytest.approx(150.0)
    # event patients b and c; both have an alert on a positive row
    assert m["event_sensitivity"] == 1.0


def test_threshold_respects_alert_budget():
    scores = np.arange(100) / 100.0
    exp = Exposure(50.0, "patient_days")  # budget 10/100 pd -> at most 5 alerts
    t = threshold_for_budget(scores, exp, 10.0)
    assert (scores >= t).sum() == 5
    ties = np.array([0.9] * 10 + [0.1] * 90)
    t2 = threshold_for_budget(ties, exp, 10.0)
    assert (ties >= t2).sum() == 0  # the 10 tied scores would break the budget
    t3 = threshold_for_budget(ties, Exposure(1000.0, "patient_days"), 10.0)
    assert (ties >= t3).sum() == 100


def test_cadence_and_exposure():
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    f = pd.DataFrame(
        {
            "patient_id": ["a"] * 3 + ["b"] * 3,
            "time": [t0 + pd.Timedelta(hours=4 * k) for k in range(3)] * 2,
        }
    )
    assert cadence_hours(f) == 4.0
    e = Exposure.of(f)
    assert e.unit == "patient_days" and e.amount == pytest.approx(1.0)  # 6 rows x 4 h
    one = f.drop_duplicates("patient_id")
    assert Exposure.of(one).unit == "patients"


def test_lead_time():
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    f = pd.DataFrame(
        {
            "patient_id": ["a"] * 4 + ["b"] * 2,
            "time": [t0 + pd.Timedelta(hours=h) for h in (0, 4, 8, 12, 0, 4)],
            "label": [0, 1, 1, 1, 0, 0],
        }
    )
    alert = np.array([True, False, True, True, True, False])
    # no event times: last positive row (12 h) stands in -> lower bound 12 - 8 = 4 h
    np.testing.assert_allclose(lead_times_hours(f, alert), [4.0])
    ev = {"a": t0 + pd.Timedelta(hours=15)}
    np.testing.assert_allclose(lead_times_hours(f, alert, ev), [7.0])


def test_patient_bootstrap_keeps_patients_together_and_is_seeded():
    patient = np.array(["a", "a", "b", "c", "c", "c"])
    boot = PatientBootstrap(patient, reps=50, seed=1)
    samples = boot.indices()
    for idx in samples:
        counts = pd.Series(patient[idx]).value_counts()
        # each drawn patient contributes all of its rows (multiples of its row count)
        assert counts.get("a", 0) % 2 == 0 and counts.get("c", 0) % 3 == 0
    again = PatientBootstrap(patient, reps=50, seed=1).indices()
    assert all(np.array_equal(a, b) for a, b in zip(samples, again, strict=True))


def test_bootstrap_ci_brackets_point_estimate():
    rng = np.random.default_rng(3)
    patient = np.repeat(np.arange(200), 5)
    y = (rng.random(1000) < 0.2).astype(int)
    s = y * 0.5 + rng.random(1000)
    samples = PatientBootstrap(patient, reps=100, seed=0).indices()
    ci = bootstrap_ci(lambda idx: {"auroc": auroc(y[idx], s[idx])}, samples)
    lo, hi = ci["auroc"]
    assert lo < auroc(y, s) < hi
    assert hi - lo < 0.15


@pytest.mark.parametrize("seed", range(5))
def test_fast_metrics_equal_sklearn_including_ties(seed):
    from models.metrics import fast_auprc, fast_auroc

    rng = np.random.default_rng(seed)
    n = 500
    y = (rng.random(n) < 0.1).astype(int)
    s = np.round(rng.random(n) + 0.3 * y, 1)  # heavy ties, like NEWS2 integer scores
    assert fast_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert fast_auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    s2 = rng.random(n)
    assert fast_auroc(y, s2) == pytest.approx(roc_auc_score(y, s2), abs=1e-12)
    assert fast_auprc(y, s2) == pytest.approx(average_precision_score(y, s2), abs=1e-12)
    assert fast_auroc(np.zeros(n, int), s) is None and fast_auprc(np.zeros(n, int), s) is None


@pytest.mark.parametrize("seed", range(3))
def test_weighted_bootstrap_equals_resampled_rows(seed):
    """A replicate as row weights gives the metrics of the resampled rows (ties included)."""
    from models.metrics import RankedScores, fast_auprc, fast_auroc, weighted_alerts

    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(80), rng.integers(1, 9, 80))
    n = len(patient)
    y = (rng.random(n) < 0.15).astype(int)
    s = np.round(rng.random(n) + 0.4 * y, 1)  # ties, like NEWS2 totals
    alert = s > 0.8
    boot = PatientBootstrap(patient, reps=30, seed=seed)
    ranked = RankedScores(y, s)
    for idx, w in zip(boot.indices(), boot.weights(), strict=True):
        np.testing.assert_array_equal(np.bincount(idx, minlength=n), w)
        assert ranked.auroc(w) == pytest.approx(fast_auroc(y[idx], s[idx]), abs=1e-12)
        assert ranked.auprc(w) == pytest.approx(fast_auprc(y[idx], s[idx]), abs=1e-12)
        am = weighted_alerts(y.astype(float), alert, w)
        full = alert_metrics(y[idx], alert[idx], Exposure(1.0, "x"))
        assert am["sensitivity"] == pytest.approx(full["sensitivity"])
        assert am["ppv"] == pytest.approx(full["ppv"])
    assert ranked.auroc(np.where(y == 1, 0.0, 1.0)) is None  # no positives drawn
