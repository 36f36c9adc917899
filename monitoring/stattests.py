"""The drift tests, one function each, registered in ``TESTS`` (method name -> test).

Why our own: the monitor runs a few hundred tests per window and, for the noise floor, the
same tests on twenty half-splits of the reference; Evidently 0.7 exposes its tests only
through report metrics (``ValueDrift``), which build a plotly figure per test (~50 ms each),
or through ``evidently.legacy``, which is on its way out. These are the same formulas as
Evidently's tests of the same name, on SciPy: ``tests/monitoring/test_stattests.py`` checks
that every registered test gives Evidently's ``ValueDrift`` score, so the HTML report's
widgets (Evidently) and the verdict (here) cannot disagree.

A test takes the two samples (missing and infinite values already dropped) and the column
kind (``"num"`` or ``"cat"``) and returns the score; ``kind`` of the entry says whether the
score is a p-value (drift when at or below the threshold) or a distance (at or above).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial import distance

Kind = Literal["num", "cat"]


@dataclass(frozen=True)
class StatTest:
    name: str
    score: Callable[[pd.Series, pd.Series, Kind], float]
    p_value: bool
    #: p-value tests: drift at ``score < threshold`` rather than ``<=`` (as Evidently has it)
    strict: bool = False

    def drifted(self, score: float, threshold: float) -> bool:
        if self.p_value:
            return score < threshold if self.strict else score <= threshold
        return score >= threshold


def binned_shares(
    reference: pd.Series, current: pd.Series, kind: Kind, fill_zeroes: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Shares per bin: Sturges bins over both samples for a numerical column with more than
    20 distinct reference values, else one bin per value; empty bins get a tiny share
    (``fill_zeroes``) so that logarithms stay finite."""
    if kind == "num" and reference.nunique() > 20:
        edges = np.histogram_bin_edges(
            np.asarray(pd.concat([reference, current], axis=0).values), bins="sturges"
        )
        ref = np.histogram(reference, edges)[0] / len(reference)
        cur = np.histogram(current, edges)[0] / len(current)
    else:
        keys = list(set(reference.dropna().unique()) | set(current.dropna().unique()))
        rc, cc = reference.value_counts(), current.value_counts()
        ref = np.array([rc.get(k, 0) / len(reference) for k in keys])
        cur = np.array([cc.get(k, 0) / len(current) for k in keys])
    if fill_zeroes:
        for shares in (ref, cur):
            smallest = shares[shares != 0].min()
            np.place(shares, shares == 0, smallest / 10**6 if smallest <= 0.0001 else 0.0001)
    return ref, cur


def ks(reference: pd.Series, current: pd.Series, kind: Kind) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (two-sided)."""
    return float(stats.ks_2samp(reference, current)[1])


def wasserstein(reference: pd.Series, current: pd.Series, kind: Kind) -> float:
    """Wasserstein distance in units of the reference's standard deviation."""
    norm = max(float(np.std(reference)), 0.001)
    return float(stats.wasserstein_distance(reference, current) / norm)


def jensenshannon(reference: pd.Series, current: pd.Series, kind: Kind) -> float:
    ref, cur = binned_shares(reference, current, kind, fill_zeroes=False)
    return float(distance.jensenshannon(ref, cur))


def psi(reference: pd.Series, current: pd.Series, kind: Kind) -> float:
    """Population stability index."""
    ref, cur = binned_shares(reference, current, kind)
    return float(np.sum((ref - cur) * np.log(ref / cur)))


def kl_div(reference: pd.Series, current: pd.Series, kind: Kind) -> float:
    ref, cur = binned_shares(reference, current, kind)
    return float(stats.entropy(ref, cur))


def z(reference: pd.Series, current: pd.Series, kind: Kind) -> float:
    """Two-sided z-test p-value of the share of the first value (sorted) against the rest:
    for binary flags tested per row."""
    if (
        reference.nunique() == 1
        and current.nunique() == 1
        and reference.unique()[0] == current.unique()[0]
    ):
        return 1.0
    first = sorted(set(reference.dropna().unique()) | set(current.dropna().unique()))[0]
    r = (reference != first).astype(float)
    c = (current != first).astype(float)
    n1, n2 = len(r), len(c)
    p1, p2 = float(r.sum()) / n1, float(c.sum()) / n2
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    zstat = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
    return float(2 * (1 - stats.norm.cdf(np.abs(zstat))))


TESTS: Mapping[str, StatTest] = {
    "ks": StatTest("ks", ks, p_value=True),
    "z": StatTest("z", z, p_value=True, strict=True),
    "wasserstein": StatTest("wasserstein", wasserstein, p_value=False),
    "jensenshannon": StatTest("jensenshannon", jensenshannon, p_value=False),
    "psi": StatTest("psi", psi, p_value=False),
    "kl_div": StatTest("kl_div", kl_div, p_value=False),
}
P_VALUE_METHODS = frozenset(n for n, t in TESTS.items() if t.p_value)
DISTANCE_METHODS = frozenset(n for n, t in TESTS.items() if not t.p_value)


def clean(values: pd.Series) -> pd.Series:
    """What every test sees: the values without missing and infinite ones."""
    return values.replace([-np.inf, np.inf], np.nan).dropna()


def scores(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    tests: Mapping[str, tuple[str, float, str]],
) -> dict[str, tuple[float, bool]]:
    """``column -> (score, drifted at the threshold)``; ``tests`` maps a column to
    ``(method, threshold, kind)``. Columns without values on either side are left out."""
    out: dict[str, tuple[float, bool]] = {}
    for col, (method, threshold, kind) in tests.items():
        ref, cur = clean(reference[col]), clean(current[col])
        if ref.empty or cur.empty:
            continue
        test = TESTS[method]
        score = test.score(ref, cur, "num" if kind == "num" else "cat")
        out[col] = (score, test.drifted(score, threshold))
    return out
