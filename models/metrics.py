"""Clinical evaluation metrics: discrimination, calibration, alert burden, lead time, intervals.

Everything is computed on the same rows for the model and for NEWS2 so they can be compared
side by side. Definitions (documented because they decide what the numbers mean):

* Rows are prediction times; ``label`` = deterioration within the label horizon.
* An *alert* is a prediction row whose score is at or above the threshold. Sensitivity and PPV
  are row-level; ``event_sensitivity`` is the fraction of event patients with at least one
  alert in a positive row (i.e. within the horizon before their event).
* Alert burden = alerts per 100 patient-days; patient-days = rows x the median gap between a
  patient's consecutive prediction times (the scoring cadence). For one-row-per-patient cohorts
  there is no cadence: the burden is alerts per 100 patients instead.
* Calibration slope/intercept: logistic recalibration ``logit P(y) = a + b logit(p)``
  (ideal a=0, b=1); ``calibration_in_the_large`` is ``a`` with ``b`` fixed at 1.
* Lead time: hours from the first alert among a patient's positive rows to the event. With
  outcome times unknown, the last positive row's time is used instead, which gives a lower bound.
* Intervals: percentile bootstrap resampling *patients* with replacement (rows of a patient
  stay together), seeded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EPS = 1e-6


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, s))


def auprc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import average_precision_score

    if y.sum() == 0:
        return None
    return float(average_precision_score(y, s))


def fast_auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Same value as ``roc_auc_score`` (Mann-Whitney U with average ranks for ties), without
    scikit-learn's per-call validation overhead; used inside the bootstrap loops."""
    from scipy.stats import rankdata

    y = np.asarray(y)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fast_auprc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Same value as ``average_precision_score`` (step-wise, ties as one threshold)."""
    y = np.asarray(y)
    if y.sum() == 0:
        return None
    order = np.argsort(-np.asarray(s), kind="mergesort")
    s_sorted, y_sorted = np.asarray(s)[order], y[order]
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(y) - 1]
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class RankedScores:
    """One score array sorted once: AUROC and AUPRC of any reweighting of its rows in O(n).

    Why: a patient-bootstrap replicate is the same rows with multiplicities (how often each
    patient was drawn), so the metrics of a replicate are weighted metrics over the sorted
    rows, with no resampled copy and no sort per replicate. With integer weights they equal
    :func:`fast_auroc` / :func:`fast_auprc` of the resampled rows (ties included; tested).
    """

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        s = np.asarray(s, dtype=np.float64)
        self.order = np.argsort(s, kind="mergesort")
        ss = s[self.order]
        self.starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]) if len(ss) else ss
        self.y = np.asarray(y, dtype=np.float64)[self.order]

    def _groups(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted positives and negatives per distinct score, ascending."""
        ws = np.asarray(w, dtype=np.float64)[self.order]
        pos = ws * self.y
        return np.add.reduceat(pos, self.starts), np.add.reduceat(ws - pos, self.starts)

    def auroc(self, w: np.ndarray) -> float | None:
        if not len(self.starts):
            return None
        n1, n0 = self._groups(w)
        w1, w0 = n1.sum(), n0.sum()
        if w1 == 0 or w0 == 0:
            return None
        below = np.cumsum(n0) - n0  # negatives with a lower score; ties count half
        return float((n1 * (below + 0.5 * n0)).sum() / (w1 * w0))

    def auprc(self, w: np.ndarray) -> float | None:
        if not len(self.starts):
            return None
        n1, n0 = self._groups(w)
        tps = np.cumsum(n1[::-1])  # thresholds from the highest score down
        if tps[-1] == 0:
            return None
        precision = np.divide(tps, tps + np.cumsum(n0[::-1]), where=tps > 0, out=np.zeros_like(tps))
        recall = tps / tps[-1]
        return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def weighted_brier(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(w, (p - y) ** 2) / w.sum())


def weighted_alerts(y: np.ndarray, alert: np.ndarray, w: np.ndarray) -> dict[str, float | None]:
    """Sensitivity and PPV of an alert rule on rows weighted ``w`` (bootstrap multiplicities)."""
    wy = w * y
    tp = float(np.dot(wy, alert))
    flagged = float(np.dot(w, alert))
    pos = float(wy.sum())
    return {"sensitivity": tp / pos if pos else None, "ppv": tp / flagged if flagged else None}


def brier(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import brier_score_loss

    if len(y) == 0:
        return None
    return float(brier_score_loss(y, np.clip(p, 0.0, 1.0)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def calibration_slope_intercept(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """Logistic recalibration of outcomes on logit(p) (unpenalised)."""
    from scipy.optimize import minimize_scalar
    from sklearn.linear_model import LogisticRegression

    out: dict[str, float | None] = {
        "calibration_slope": None,
        "calibration_intercept": None,
        "calibration_in_the_large": None,
    }
    if len(np.unique(y)) < 2:
        return out
    lp = _logit(p)
    if np.ptp(lp) > 0:
        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(lp.reshape(-1, 1), y)
        out["calibration_slope"] = _finite(lr.coef_[0, 0])
        out["calibration_intercept"] = _finite(lr.intercept_[0])

    def nll(a: float) -> float:
        z = a + lp
        return float(np.sum(np.logaddexp(0, z) - y * z))

    res = minimize_scalar(nll, bounds=(-20, 20), method="bounded")
    out["calibration_in_the_large"] = _finite(res.x)
    return out


def cadence_hours(frame: pd.DataFrame) -> float | None:
    """Median gap between a patient's consecutive prediction times; None if one row each."""
    t = frame[["patient_id", "time"]].sort_values(["patient_id", "time"])
    gaps = t.groupby("patient_id")["time"].diff().dropna()
    if gaps.empty:
        return None
    return float(gaps.median() / pd.Timedelta(hours=1))


@dataclass(frozen=True)
class Exposure:
    """Denominator of the alert burden: patient-days, or patients for one-row cohorts."""

    amount: float
    unit: str  # "patient_days" | "patients"

    @classmethod
    def of(cls, frame: pd.DataFrame, cadence: float | None = None) -> Exposure:
        cad = cadence if cadence is not None else cadence_hours(frame)
        if cad is None or cad <= 0:
            return cls(float(frame["patient_id"].nunique()), "patients")
        return cls(len(frame) * cad / 24.0, "patient_days")

    def rate(self, alerts: float) -> float:
        return 100.0 * alerts / self.amount if self.amount > 0 else float("nan")


def threshold_for_budget(scores: np.ndarray, exposure: Exposure, budget_per_100: float) -> float:
    """Lowest threshold whose alert count stays within the budget (alerts per 100 units)."""
    scores = np.asarray(scores, dtype=float)
    allowed = budget_per_100 * exposure.amount / 100.0
    values, counts = np.unique(scores, return_counts=True)  # ascending
    at_or_above = np.cumsum(counts[::-1])[::-1]  # rows with score >= values[i]
    ok = np.nonzero(at_or_above <= allowed)[0]
    if len(ok) == 0:
        return float(np.nextafter(values[-1], np.inf))  # nothing may alert
    return float(values[ok[0]])


def alert_metrics(
    y: np.ndarray, alert: np.ndarray, exposure: Exposure, patient: np.ndarray | None = None
) -> dict[str, float | None]:
    y = np.asarray(y, dtype=int)
    alert = np.asarray(alert, dtype=bool)
    tp = int(np.sum(alert & (y == 1)))
    fp = int(np.sum(alert & (y == 0)))
    pos = int(np.sum(y == 1))
    neg = len(y) - pos
    out: dict[str, float | None] = {
        "alerts": float(alert.sum()),
        f"alerts_per_100_{exposure.unit}": exposure.rate(float(alert.sum())),
        "sensitivity": tp / pos if pos else None,
        "specificity": (neg - fp) / neg if neg else None,
        "ppv": tp / (tp + fp) if (tp + fp) else None,
    }
    if patient is not None:
        pos_pat = pd.Series(y == 1).groupby(patient).any()
        hit = pd.Series(alert & (y == 1)).groupby(patient).any()
        n_ev = int(pos_pat.sum())
        out["event_sensitivity"] = float(hit[pos_pat].mean()) if n_ev else None
    return out


def lead_times_hours(
    frame: pd.DataFrame, alert: np.ndarray, event_times: Mapping[str, pd.Timestamp] | None = None
) -> np.ndarray:
    """Per event patient: hours from the first alert in a positive row to the event.

    ``event_times`` (patient -> first event time) when known; otherwise the last positive
    row's time stands in for the event (a lower bound on the true lead time).
    """
    f = frame[["patient_id", "time", "label"]].assign(alert=np.asarray(alert, dtype=bool))
    pos = f[f["label"] == 1]
    if pos.empty:
        return np.array([], dtype=float)
    first_alert = pos[pos["alert"]].groupby("patient_id")["time"].min()
    if event_times is not None:
        ev = pd.Series(event_times)
        ev = ev[ev.index.isin(first_alert.index)]
    else:
        ev = pos.groupby("patient_id")["time"].max()
    common = first_alert.index.intersection(ev.index)
    lead = (ev.loc[common] - first_alert.loc[common]) / pd.Timedelta(hours=1)
    return np.asarray(lead[lead >= 0], dtype=float)


def discrimination_calibration(
    y: np.ndarray, p: np.ndarray, rank: np.ndarray | None = None
) -> dict:
    """AUROC/AUPRC on ``rank`` (defaults to ``p``), Brier and calibration on ``p``."""
    rank = p if rank is None else rank
    out: dict[str, float | None] = {
        "auroc": auroc(y, rank),
        "auprc": auprc(y, rank),
        "brier": brier(y, p),
    }
    out.update(calibration_slope_intercept(y, p))
    return out


# -- bootstrap -----------------------------------------------------------------------------


class PatientBootstrap:
    """Resample patients with replacement; yields row indices of each replicate."""

    def __init__(self, patient: np.ndarray, reps: int, seed: int) -> None:
        codes, _ = pd.factorize(pd.Series(patient), sort=True)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        self.order = order
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts
        self.n_patients = len(counts)
        self.reps = reps
        self.seed = seed

    def indices(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        out = []
        for _ in range(self.reps):
            pick = rng.integers(0, self.n_patients, self.n_patients)
            lens = self.counts[pick]
            starts = np.repeat(self.starts[pick], lens)
            offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
            out.append(self.order[starts + offs])
        return out

    def weights(self) -> Iterator[np.ndarray]:
        """The replicates of :meth:`indices` (same draws) as row multiplicities: each row
        weighs as often as its patient was drawn."""
        rng = np.random.default_rng(self.seed)
        row_patient = np.empty(len(self.order), dtype=np.int64)
        row_patient[self.order] = np.repeat(np.arange(self.n_patients), self.counts)
        for _ in range(self.reps):
            pick = rng.integers(0, self.n_patients, self.n_patients)
            drawn = np.bincount(pick, minlength=self.n_patients).astype(np.float64)
            yield drawn[row_patient]


def bootstrap_ci(
    stat: Callable[[np.ndarray], Mapping[str, float | None]],
    samples: Iterable[np.ndarray],
    alpha: float = 0.05,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile intervals for every key ``stat(sample)`` returns (``sample``: row indices
    of a replicate, or its row weights)."""
    values: dict[str, list[float]] = {}
    n = 0
    for idx in samples:  # one replicate at a time: weights are not all kept in memory
        n += 1
        for k, v in stat(idx).items():
            if v is not None and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    out: dict[str, tuple[float | None, float | None]] = {}
    for k, vs in values.items():
        if len(vs) < max(10, n // 2):
            out[k] = (None, None)
        else:
            lo, hi = np.quantile(vs, [alpha / 2, 1 - alpha / 2])
            out[k] = (float(lo), float(hi))
    return out


def with_ci(point: Mapping[str, Any], ci: Mapping[str, tuple[float | None, float | None]]) -> dict:
    """Flatten ``{k: v}`` + CIs into ``{k, k_ci_low, k_ci_high}`` (DVC metrics want scalars)."""
    out: dict[str, Any] = dict(point)
    for k, (lo, hi) in ci.items():
        if k in out:
            out[f"{k}_ci_low"] = lo
            out[f"{k}_ci_high"] = hi
    return out
