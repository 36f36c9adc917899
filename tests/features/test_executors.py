"""The stacked executor (few queries: serving) and the arrays-level entry give the per-code
executor's bits (``features/executors.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import features.build as build
from core.vocabulary import load_vocabulary
from features.build import (
    FeatureArrays,
    FeatureInputs,
    compute_feature_arrays,
    feature_inputs,
    features_from_arrays,
    input_codes,
)
from features.config import FeaturesConfig

from .conftest import T0, make_cohort

VOCAB = load_vocabulary()
H_NS = 3_600_000_000_000
CONFIGS = {
    "default": FeaturesConfig(),
    "float64": FeaturesConfig(dtype="float64"),
    # resp_rate, spo2, ... become NEWS2-only codes; a static column nobody has
    "few_codes": FeaturesConfig(
        dtype="float64", codes=["heart_rate", "steps", "sleep_duration"], static=["age", "bmi"]
    ),
    "odd_windows": FeaturesConfig(
        windows={
            "hours": {"vital": [1.0, 4.0, 30.0], "lab": [48.0], "activity": [24.0]},
            "stats": {"continuous": ["slope", "max", "count"], "binary": ["min", "mean"]},
        },
        families={"news2": False, "missingness": False},
    ),
}


def _bits(a: FeatureArrays) -> np.ndarray:
    return a.values.view(np.int32 if a.values.dtype == np.float32 else np.int64)


def assert_same(a: FeatureArrays, b: FeatureArrays) -> None:
    """Same names, rows and bits (NaN positions and the sign of zeros included)."""
    assert a.names == b.names
    np.testing.assert_array_equal(a.patient_id, b.patient_id)
    np.testing.assert_array_equal(a.time_ns, b.time_ns)
    assert [str(x) for x in a.setting] == [str(x) for x in b.setting]
    bad = np.argwhere(_bits(a) != _bits(b))
    if len(bad):
        j, q = bad[0]
        raise AssertionError(
            f"{len(bad)} cells differ, e.g. {a.names[j]} row {q}: {a.values[j, q]!r} "
            f"vs {b.values[j, q]!r}"
        )


def both_paths(monkeypatch, obs, pats, times, config) -> tuple[FeatureArrays, FeatureArrays]:
    """(stacked executor, per-code executor) results; fails if the stacked one was not used."""
    calls = []
    real = build.stacked_bank

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(build, "stacked_bank", counting)
        small = compute_feature_arrays(obs, pats, times, config, VOCAB)
    assert calls, "the stacked executor was not used"
    with monkeypatch.context() as mp:
        mp.setattr(build, "_SMALL_QUERIES", -1)  # force the per-code executor
        mp.setattr(build, "stacked_bank", None)
        general = compute_feature_arrays(obs, pats, times, config, VOCAB)
    return small, general


def serving_batch(seed: int, n_pat: int = 8) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A serving-sized batch with every awkward case in it.

    Ties at one time (different values and exact duplicates), unsorted rows, a vocabulary code
    nobody has, a code the vocabulary does not know, -0.0 next to 0.0, string columns; with
    more than one patient also a patient with no observations, and with more than two a
    patient missing from the patient table.
    """
    rng = np.random.default_rng(seed)
    pids = [f"p_{seed}_{i}" for i in range(n_pat)]
    codes = ["heart_rate", "resp_rate", "spo2", "sbp", "body_temp", "o2_support"]
    codes += ["consciousness", "steps", "sleep_duration", "lactate", "made_up"]
    rows = []
    observed = pids[:-1] if n_pat > 1 else pids  # the last patient has no observations
    for i, pid in enumerate(observed):
        k = int(rng.integers(20, 200))
        hours = -rng.integers(0, 8 * 24 * 4, k) / 4.0  # quarter hours over 8 days
        vals = rng.choice([0.0, -0.0, 1.0, 36.6, 97.0, 120.0, 7.5], k)
        if i % 3 == 0:
            vals = rng.normal(80, 15, k).round(1)
        for h, c, v in zip(hours, rng.choice(codes, k), vals, strict=True):
            rows.append((pid, T0 + pd.Timedelta(hours=float(h)), str(c), float(v)))
        rows += rows[-5:]  # exact duplicates
        rows.append((pid, T0 - pd.Timedelta(hours=1), "heart_rate", 70.0))  # a tie ...
        rows.append((pid, T0 - pd.Timedelta(hours=1), "heart_rate", 90.0))  # ... by value
    obs = pd.DataFrame(rows, columns=["patient_id", "time", "code", "value"])
    obs["time"] = obs["time"].astype("datetime64[ns, UTC]")
    obs = obs.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    in_table = pids[1:] if n_pat > 2 else pids  # the first patient is not in the table
    k = len(in_table)
    pats = pd.DataFrame(
        {
            "patient_id": in_table,
            "setting": (["ward", "home"] * n_pat)[:k],
            "age": rng.integers(20, 95, k).astype(float),
            "sex": (["F", "M", None] * n_pat)[:k],
            "cm_copd": rng.integers(0, 2, k),
            "spo2_scale2": rng.integers(0, 2, k),
        }
    )
    offsets = rng.integers(0, 3 * 3600, n_pat) * 1_000_000_000 + 123  # not whole seconds
    times = pd.DataFrame({"patient_id": pids, "time": pd.to_datetime(T0.value - offsets, utc=True)})
    return obs, pats, times


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_pat", [1, 4, 8])
def test_stacked_executor_equals_per_code_executor_on_serving_batches(monkeypatch, name, n_pat):
    config = CONFIGS[name]
    for seed in range(3):
        obs, pats, times = serving_batch(seed, n_pat)
        small, general = both_paths(monkeypatch, obs, pats, times, config)
        assert_same(small, general)
        if n_pat > 1:
            assert small.values.shape[1] == n_pat


def test_stacked_executor_equals_per_code_executor_with_a_coarse_time_unit(monkeypatch):
    """Twenty years of history: keys in microseconds (observations round up, times down)."""
    obs, pats, times = serving_batch(11, 4)
    old = obs.iloc[:40].assign(time=obs["time"].iloc[:40] - pd.Timedelta(days=20 * 365))
    obs = pd.concat([obs, old], ignore_index=True)
    jitter = np.random.default_rng(0).integers(0, 1000, len(obs))  # sub-microsecond parts
    obs["time"] = obs["time"] + pd.to_timedelta(jitter, unit="ns")
    assert build._time_unit(int(pd.Timedelta(days=20 * 365).value)) > 1
    small, general = both_paths(monkeypatch, obs, pats, times, CONFIGS["float64"])
    assert_same(small, general)


def test_stacked_executor_equals_per_code_executor_on_the_cohort(monkeypatch, cohort):
    """Several times per patient, categorical ids and codes, all simulator codes."""
    obs, pats, _ = cohort
    obs = obs.assign(
        patient_id=obs["patient_id"].astype("category"), code=obs["code"].astype("category")
    )
    sel = pats["patient_id"].to_numpy()[:5]
    times = pd.DataFrame(
        {
            "patient_id": np.repeat(sel, 4),
            "time": np.tile(pd.date_range("2026-01-06", periods=4, freq="11h", tz="UTC"), 5),
        }
    )
    for config in (CONFIGS["default"], CONFIGS["few_codes"]):
        small, general = both_paths(monkeypatch, obs, pats, times, config)
        assert_same(small, general)


def test_stacked_executor_equals_per_code_executor_with_many_segments(monkeypatch, cohort):
    """Twelve patients, 60 queries: many segments in the stacked series."""
    obs, pats, _ = cohort
    rng = np.random.default_rng(1)
    times = pd.DataFrame(
        {
            "patient_id": rng.choice(pats["patient_id"].to_numpy(), 60),
            "time": T0 + pd.to_timedelta(rng.uniform(0, 10 * 24, 60), unit="h"),
        }
    )
    small, general = both_paths(monkeypatch, obs, pats, times, CONFIGS["float64"])
    assert_same(small, general)


obs_rows = st.lists(
    st.tuples(
        st.integers(0, 2),  # patient
        st.sampled_from(["heart_rate", "spo2", "steps", "o2_support", "sleep_duration", "sbp"]),
        st.integers(-200 * 4, 4),  # quarter hours from T0 (a few after it)
        st.sampled_from([0.0, -0.0, 1.0, 2.5, 95.0, 1e6, -3.0]),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=obs_rows,
    queries=st.lists(st.tuples(st.integers(0, 2), st.integers(-48, 8)), min_size=1, max_size=6),
)
def test_stacked_executor_equals_per_code_executor_hypothesis(rows, queries):
    obs = pd.DataFrame(
        {
            "patient_id": [f"h{p}" for p, _, _, _ in rows],
            "time": pd.to_datetime([T0.value + q * H_NS // 4 for _, _, q, _ in rows], utc=True),
            "code": [c for _, c, _, _ in rows],
            "value": [v for _, _, _, v in rows],
        }
    )
    pats = pd.DataFrame({"patient_id": ["h0", "h1", "h2"], "age": [50.0, 60.0, np.nan]})
    times = pd.DataFrame(
        {
            "patient_id": [f"h{p}" for p, _ in queries],
            "time": pd.to_datetime([T0.value + q * H_NS + 7 for _, q in queries], utc=True),
        }
    )
    config = CONFIGS["float64"]
    small = compute_feature_arrays(obs, pats, times, config, VOCAB)
    saved = build._SMALL_QUERIES
    build._SMALL_QUERIES = -1  # (no monkeypatch fixture inside hypothesis examples)
    try:
        general = compute_feature_arrays(obs, pats, times, config, VOCAB)
    finally:
        build._SMALL_QUERIES = saved
    assert_same(small, general)


def test_min_max_zeros_do_not_depend_on_the_batch():
    """-0.0 and 0.0 in one window: the minimum is +0.0 alone and in any batch.

    numpy's fmin picks the sign of a zero by SIMD lane; before the features made min/max
    zeros +0.0, a patient alone got -0.0 and the same patient in a batch of 8 got 0.0.
    """
    config = CONFIGS["float64"]

    def frames(n: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        pids = [f"z{i}" for i in range(n)]
        when = [T0 - pd.Timedelta(hours=48), T0 - pd.Timedelta(hours=2)]
        obs = pd.DataFrame(
            {
                "patient_id": np.repeat(pids, 2),
                "time": pd.to_datetime(np.tile(when, n), utc=True),
                "code": "resp_rate",
                "value": np.tile([0.0, -0.0], n),
            }
        )
        return (
            obs,
            pd.DataFrame({"patient_id": pids}),
            pd.DataFrame({"patient_id": pids, "time": T0}),
        )

    for n in (1, 2, 5, 8, 70):  # 70 queries: the general path
        out = compute_feature_arrays(*frames(n), config, VOCAB)
        for name in ("resp_rate_min_72h", "resp_rate_max_72h", "resp_rate_min_4h"):
            col = out.values[out.names.index(name)]
            assert (col == 0).all() and not np.signbit(col).any(), (n, name, col)


def _inputs_by_hand(obs, pats, times, config) -> FeatureInputs:
    """FeatureInputs as a caller without DataFrames would build them (shuffled code list,
    unknown codes, rows of other patients, a patient without a query)."""
    pids = sorted({*times["patient_id"].astype(str), "zz_no_query"})
    p_of = {p: i for i, p in enumerate(pids)}
    codes = sorted(set(obs["code"].astype(str)) | {"made_up"}, reverse=True)
    c_of = {c: i for i, c in enumerate(codes)}
    by_pid = pats.drop_duplicates("patient_id").set_index("patient_id").reindex(pids)
    columns = {
        str(c): by_pid[c].to_numpy(dtype=float if by_pid[c].dtype.kind in "biuf" else object)
        for c in by_pid.columns
    }
    return FeatureInputs(
        patient_ids=np.array(pids, dtype=object),
        obs_patient=np.array([p_of.get(str(p), -1) for p in obs["patient_id"]]),
        obs_code=np.array([c_of[str(c)] for c in obs["code"]]),
        codes=codes,
        obs_time_ns=obs["time"].astype("int64").to_numpy(),
        obs_value=obs["value"].to_numpy(dtype=float),
        query_patient=np.array([p_of[str(p)] for p in times["patient_id"]]),
        query_time_ns=times["time"].astype("int64").to_numpy(),
        patient_columns=columns,
    )


@pytest.mark.parametrize("name", ["default", "few_codes"])
def test_arrays_entry_equals_compute_feature_arrays(name):
    config = CONFIGS[name]
    obs, pats, times = serving_batch(7, 6)
    # the "other" patient's rows must be ignored, like rows of patients not queried
    other = obs.assign(patient_id="zz_other")
    obs = pd.concat([obs, other.iloc[:30]], ignore_index=True)
    expected = compute_feature_arrays(obs, pats, times, config, VOCAB)
    assert_same(
        features_from_arrays(_inputs_by_hand(obs, pats, times, config), config, VOCAB), expected
    )
    # the frames' own extraction round-trips too
    inputs = feature_inputs(obs, pats, times, config, VOCAB)
    assert list(inputs.codes) == input_codes(config, VOCAB)
    assert_same(features_from_arrays(inputs, config, VOCAB), expected)


def test_arrays_entry_on_the_cohort_and_bad_ids(cohort, config):
    obs, pats, _ = make_cohort(4, seed=5)
    times = pd.DataFrame(
        {"patient_id": pats["patient_id"], "time": pats["followup_end"] - pd.Timedelta(hours=3)}
    )
    expected = compute_feature_arrays(obs, pats, times, config, VOCAB)
    assert_same(
        features_from_arrays(_inputs_by_hand(obs, pats, times, config), config, VOCAB), expected
    )
    inputs = _inputs_by_hand(obs, pats, times, config)
    inputs.patient_ids = inputs.patient_ids[::-1]
    with pytest.raises(ValueError, match="sorted"):
        features_from_arrays(inputs, config, VOCAB)
