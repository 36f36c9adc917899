"""Performance of the served model on fed-back outcomes, at the model's own alert threshold.

Why the alert threshold: the model raises an alert when its calibrated risk reaches the
threshold chosen at training from the alert budget (a few percent); at Evidently's default of
0.5 almost nothing is an alert, which reads as accuracy 0.98 and recall 0.17 and says nothing
about the alerts clinicians actually get. Calibration is shown as observed event rate per bin
of predicted risk, from the same bins as the expected calibration error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from monitoring.config import MonitorConfig

PREDICTION = "probability"
CALIBRATION_BINS = 10


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Equal-width bins of predicted risk: rows, mean predicted and observed event rate."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append(
                {
                    "bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}",
                    "n": int(m.sum()),
                    "mean_predicted": float(p[m].mean()),
                    "observed_rate": float(y[m].mean()),
                }
            )
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    table = calibration_table(y, p, bins)
    total = sum(r["n"] * abs(r["observed_rate"] - r["mean_predicted"]) for r in table)
    return total / max(len(y), 1)


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Alerts (risk >= threshold) against outcomes: what clinicians see."""
    alert = p >= threshold
    tp, fp = int((alert & (y == 1)).sum()), int((alert & (y == 0)).sum())
    fn, tn = int((~alert & (y == 1)).sum()), int((~alert & (y == 0)).sum())
    return {
        "threshold": float(threshold),
        "alerts": int(alert.sum()),
        "alert_share": float(alert.mean()) if len(y) else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "ppv": tp / (tp + fp) if tp + fp else None,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
    }


def _perf(y: np.ndarray, p: np.ndarray) -> dict[str, float | int | None]:
    both = 0 < y.sum() < len(y)
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "auroc": float(roc_auc_score(y, p)) if both else None,
        "auprc": float(average_precision_score(y, p)) if both else None,
        "brier": float(brier_score_loss(y, p)) if len(y) else None,
        "ece": expected_calibration_error(y, p) if len(y) else None,
        "observed_rate": float(y.mean()) if len(y) else None,
        "mean_predicted": float(p.mean()) if len(y) else None,
    }


def performance(
    labelled: pd.DataFrame, config: MonitorConfig, threshold: float | None = None
) -> dict[str, Any]:
    """Overall and per-period AUROC, AUPRC, Brier, calibration; alerts at ``threshold``."""
    y = labelled["label"].to_numpy(dtype=int)
    p = labelled[PREDICTION].to_numpy(dtype=float)
    overall = _perf(y, p)
    by_period = []
    if len(labelled):
        period = labelled["scored_at"].dt.floor(config.performance.period)
        for start, grp in labelled.groupby(period):
            row = _perf(grp["label"].to_numpy(dtype=int), grp[PREDICTION].to_numpy(dtype=float))
            by_period.append({"period_start": pd.Timestamp(start).isoformat(), **row})
    enough = (
        overall["n"] >= config.performance.min_labelled  # type: ignore[operator]
        and overall["positives"] >= config.performance.min_positives  # type: ignore[operator]
    )
    return {
        "evaluated": bool(enough),
        "overall": overall,
        "at_alert_threshold": None if threshold is None else at_threshold(y, p, threshold),
        "calibration": calibration_table(y, p),
        "over_time": by_period,
    }
