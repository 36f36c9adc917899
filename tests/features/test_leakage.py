"""No look-ahead: observations after the prediction time never change a feature at that time."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.vocabulary import load_vocabulary
from features.build import compute_features
from features.config import FeaturesConfig

from .conftest import T0

VOCAB = load_vocabulary()
CFG = FeaturesConfig(dtype="float64")
CODES = ["heart_rate", "spo2", "steps", "sleep_duration", "o2_support", "consciousness"]
HOUR_NS = 3_600_000_000_000
# the prediction time has a sub-millisecond part: rounding must never pull a later row in
T = T0 + pd.Timedelta(nanoseconds=123_456_789)
LATER = T + pd.Timedelta(hours=300)  # a second prediction time keeps later rows in the arrays
PATIENTS = pd.DataFrame(
    [{"patient_id": "p_x", "setting": "home", "age": 60.0, "sex": "F", "cm_copd": 1}]
)

obs_before = st.tuples(
    st.sampled_from(CODES),
    st.integers(min_value=-200 * HOUR_NS, max_value=0),  # 0: exactly at the prediction time
    st.floats(min_value=0, max_value=200, allow_nan=False),
)
obs_after = st.tuples(
    st.sampled_from(CODES),
    st.one_of(
        st.integers(min_value=1, max_value=2_000_000),  # 1 ns to 2 ms after t
        st.integers(min_value=1, max_value=250 * HOUR_NS),
    ),
    st.floats(min_value=0, max_value=200, allow_nan=False),
)


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": "p_x",
            "time": pd.Series(
                [T + pd.Timedelta(nanoseconds=o) for _, o, _ in rows], dtype="datetime64[ns, UTC]"
            ),
            "code": [c for c, _, _ in rows],
            "value": [float(v) for _, _, v in rows],
            "source": "wearable",
        }
    )


def _at_t(rows) -> pd.Series:
    times = pd.DataFrame({"patient_id": ["p_x", "p_x"], "time": [T, LATER]})
    times["time"] = times["time"].astype("datetime64[ns, UTC]")
    f = compute_features(_frame(rows), PATIENTS, times, CFG, VOCAB)
    return f[f.time == T].iloc[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(obs_before, max_size=25),
    after1=st.lists(obs_after, max_size=15),
    after2=st.lists(obs_after, max_size=15),
)
def test_later_observations_change_nothing(before, after1, after2):
    base = _at_t(before)
    changed = _at_t(before + after1)  # added (or, read backwards, deleted) later rows
    other = _at_t(before + after2)  # later rows with other times and values
    pd.testing.assert_series_equal(base, changed, check_exact=True, check_names=False)
    pd.testing.assert_series_equal(base, other, check_exact=True, check_names=False)


@settings(max_examples=30, deadline=None)
@given(before=st.lists(obs_before, min_size=1, max_size=25), seed=st.integers(0, 2**16))
def test_earlier_observations_do_change_features(before, seed):
    """The test above can fail: moving one observation from after t to before t changes t."""
    rng = np.random.default_rng(seed)
    code, _, v = before[int(rng.integers(len(before)))]
    a = _at_t([*before, (code, 5 * HOUR_NS, v + 1.0)])  # 5 h after t
    b = _at_t([*before, (code, -1, v + 1.0)])  # the same row 1 ns before t
    assert not a.equals(b)


def test_simulated_cohort_truncation_and_perturbation(cohort, config, vocab):
    """Batch features at t equal those from data cut at t, or with later values scrambled."""
    obs, pats, _ = cohort
    rng = np.random.default_rng(5)
    pids = pats["patient_id"].to_numpy()
    picks = pd.DataFrame(
        {
            "patient_id": rng.choice(pids, 25),
            "time": T0 + pd.to_timedelta(rng.uniform(24, 200, 25), unit="h"),
        }
    )
    picks["time"] = picks["time"].astype("datetime64[ns, UTC]")
    full = compute_features(obs, pats, picks, config, vocab).set_index(["patient_id", "time"])
    for pid, t in zip(picks.patient_id, picks.time, strict=True):
        mine = obs[obs.patient_id == pid]
        one = pd.DataFrame({"patient_id": [pid], "time": [t]})
        cut = compute_features(mine[mine.time <= t], pats, one, config, vocab)
        later = mine.time > t
        scrambled = mine.assign(
            value=np.where(later, rng.permutation(mine["value"].to_numpy()), mine["value"]),
            time=mine["time"].where(~later, mine["time"] + pd.Timedelta(hours=1)),
        )
        scr = compute_features(scrambled, pats, one, config, vocab)
        expected = full.loc[[(pid, t)]].reset_index()
        pd.testing.assert_frame_equal(cut, expected, check_exact=True)
        pd.testing.assert_frame_equal(scr, expected, check_exact=True)
