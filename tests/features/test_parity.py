"""One code path: the batch matrix equals the serving helper, chunking and threads included."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import features.build as build
from features.build import build_feature_matrix, compute_features, features_for_patient
from features.config import FeaturesConfig


@pytest.fixture(scope="module")
def matrix(cohort, config, vocab) -> pd.DataFrame:
    obs, pats, outs = cohort
    return build_feature_matrix(obs, pats, outs, config, vocab)


def test_batch_equals_serving_helper_exactly(matrix, cohort, config, vocab):
    obs, pats, _ = cohort
    rng = np.random.default_rng(0)
    for i in rng.choice(len(matrix), 12, replace=False):
        row = matrix.iloc[[i]]
        pid, t = row["patient_id"].iloc[0], row["time"].iloc[0]
        mine = obs[obs.patient_id == pid][["time", "code", "value"]]  # raw rows, no id
        cov = pats[pats.patient_id == pid].iloc[0].to_dict()
        single = features_for_patient(mine, cov, t.isoformat(), config, vocab)
        expected = row.drop(columns=["label"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(single, expected, check_exact=True)


def test_serving_with_only_the_lookback_history(matrix, cohort, config, vocab):
    """Serving usually sends just ``lookback_hours`` of history: same values (to rounding)."""
    obs, pats, _ = cohort
    row = matrix.iloc[[len(matrix) // 2]]
    pid, t = row["patient_id"].iloc[0], row["time"].iloc[0]
    mine = obs[(obs.patient_id == pid) & (obs.time > t - pd.Timedelta(hours=config.lookback_hours))]
    cov = pats[pats.patient_id == pid].iloc[0].to_dict()
    single = features_for_patient(mine, cov, t, config, vocab)
    pd.testing.assert_frame_equal(
        single, row.drop(columns=["label"]).reset_index(drop=True), rtol=1e-6
    )


def test_chunks_and_threads_do_not_change_bits(cohort, vocab, monkeypatch):
    obs, pats, _ = cohort
    times = pd.DataFrame(
        {
            "patient_id": np.repeat(pats["patient_id"].to_numpy(), 5),
            "time": np.tile(
                pd.date_range("2026-01-06", periods=5, freq="17h", tz="UTC"), len(pats)
            ),
        }
    )
    one = compute_features(obs, pats, times, FeaturesConfig(threads=1), vocab)
    monkeypatch.setattr(build, "CHUNK_OBSERVATIONS", 500)  # many small chunks
    many = compute_features(obs, pats, times, FeaturesConfig(threads=3), vocab)
    pd.testing.assert_frame_equal(one, many, check_exact=True)
    # row order of the inputs does not matter either
    shuffled = obs.sample(frac=1.0, random_state=1)
    pd.testing.assert_frame_equal(
        one,
        compute_features(shuffled, pats, times.iloc[::-1], FeaturesConfig(threads=1), vocab),
        check_exact=True,
    )


def test_categorical_input_same_as_strings(cohort, config, vocab):
    obs, pats, _ = cohort
    times = pats[["patient_id", "followup_end"]].rename(columns={"followup_end": "time"})
    a = compute_features(obs, pats, times, config, vocab)
    cat = obs.assign(
        patient_id=obs["patient_id"].astype("category"), code=obs["code"].astype("category")
    )
    pd.testing.assert_frame_equal(
        a, compute_features(cat, pats, times, config, vocab), check_exact=True
    )


def test_dictionary_covers_every_column(matrix, cohort, config, vocab):
    _, pats, _ = cohort
    doc = build.feature_dictionary(config, vocab, build.static_columns(config, pats.columns))
    json.dumps(doc)  # serialisable
    names = [f["name"] for f in doc["features"]]
    assert names == [
        c for c in matrix.columns if c not in ("patient_id", "time", "setting", "label")
    ]
    for f in doc["features"]:
        assert set(f) == {"name", "definition", "unit", "window", "code"} and f["definition"]
    for c in (
        "news2_total",
        "age",
        "sex_f",
        "cm_copd",
        "heart_rate_slope_4h",
        "steps_ratio_baseline",
    ):
        assert c in names
    assert list(matrix.columns[:4]) == ["patient_id", "time", "setting", "label"]
    assert matrix["label"].isin([0, 1]).all()
    assert all(matrix[c].dtype == np.float32 for c in names)


def test_new_lab_in_vocabulary_gets_features(cohort, config, vocab):
    obs, pats, _ = cohort
    spec = vocab.codes["lactate"].model_copy(update={"display": "Troponin", "loinc": ["6598-7"]})
    vocab2 = vocab.model_copy(update={"codes": {**vocab.codes, "troponin": spec}})
    extra = obs[obs.code == "lactate"].assign(code="troponin")
    f = compute_features(
        pd.concat([obs, extra]),
        pats,
        pats[["patient_id", "followup_end"]].rename(columns={"followup_end": "time"}),
        config,
        vocab2,
    )
    assert {"troponin_last", "troponin_mean_24h", "troponin_missing"} <= set(f.columns)
    pd.testing.assert_series_equal(f["troponin_last"], f["lactate_last"], check_names=False)


def test_codes_and_families_are_configurable(cohort, vocab):
    obs, pats, _ = cohort
    cfg = FeaturesConfig(codes=["heart_rate"], families={"baseline": False, "news2": False})
    times = pats[["patient_id", "followup_end"]].rename(columns={"followup_end": "time"})
    f = compute_features(obs, pats, times, cfg, vocab)
    assert not any(c.startswith("spo2") or "baseline" in c for c in f.columns)
    assert "news2_total" in f.columns and "news2_hr" not in f.columns  # total always kept
