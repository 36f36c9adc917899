"""Each registered drift test gives Evidently's own ``ValueDrift`` score on the same data, so the
report's widgets (Evidently) and the verdict (``monitoring.stattests``) cannot disagree."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring import evidently_reports as er
from monitoring import stattests


def _pair(kind: str, seed: int, shift: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    if kind == "num":
        ref = rng.normal(0, 1, 400)
        cur = rng.normal(shift, 1.2, 250)
        ref[:7] = np.nan  # missing and infinite values are dropped by both
        cur[:3] = np.inf
    elif kind == "few":  # a numerical column with few distinct values (one bin per value)
        ref = rng.integers(0, 6, 400).astype(float)
        cur = np.clip(rng.integers(0, 6, 250) + (shift > 0), 0, 7).astype(float)
        kind = "num"
    else:
        ref = rng.choice(["ward", "home", "icu"], 400, p=[0.6, 0.35, 0.05]).astype(object)
        p = [0.45, 0.5, 0.05] if shift else [0.6, 0.35, 0.05]
        cur = rng.choice(["ward", "home", "icu"], 250, p=p).astype(object)
        ref[:5] = None
    return pd.DataFrame({"x": ref}), pd.DataFrame({"x": cur})


CASES = [
    ("ks", "num"),
    ("ks", "few"),
    ("wasserstein", "num"),
    ("wasserstein", "few"),
    ("jensenshannon", "num"),
    ("jensenshannon", "few"),
    ("jensenshannon", "cat"),
    ("psi", "num"),
    ("psi", "cat"),
    ("kl_div", "num"),
    ("kl_div", "cat"),
    ("z", "cat"),
]


def test_every_registered_test_is_covered():
    assert {m for m, _ in CASES} == set(stattests.TESTS)


@pytest.mark.parametrize(("method", "kind"), CASES)
@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_scores_equal_evidentlys_value_drift(method, kind, shift):
    ref, cur = _pair(kind, seed=7, shift=shift)
    if method == "z":  # a two-valued column, as the z-test is meant for
        ref, cur = ref.replace({"icu": "home"}), cur.replace({"icu": "home"})
    column_kind = "cat" if kind == "cat" else "num"
    test = {"x": (method, 0.05, column_kind)}
    ours = stattests.scores(ref, cur, test)["x"][0]
    theirs = er.value_drift_scores(ref, cur, test)["x"]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_drift_decision_at_the_threshold_follows_the_test():
    ks, z, js = stattests.TESTS["ks"], stattests.TESTS["z"], stattests.TESTS["jensenshannon"]
    assert ks.drifted(0.05, 0.05) and not z.drifted(0.05, 0.05)  # <= for KS, < for z
    assert js.drifted(0.1, 0.1) and not js.drifted(0.099, 0.1)
