"""Compiled trees (tl2cgen) score exactly as LightGBM, or are not used at all."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import models.compiled as compiled
from models.compiled import compile_booster, parity_rows
from models.pyfunc import Calibrator, RiskModel

pytest.importorskip("tl2cgen")


@pytest.fixture(scope="module")
def booster():
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 12))
    X[:, 3] = np.round(X[:, 3] * 3)  # ties at the thresholds
    X[rng.random(X.shape) < 0.1] = np.nan
    y = (X[:, 0] + np.nan_to_num(X[:, 3]) * 0.3 + rng.normal(size=4000) > 1).astype(int)
    params = {"objective": "binary", "num_leaves": 15, "verbosity": -1, "seed": 1}
    return lgb.train(params, lgb.Dataset(X, label=y), num_boost_round=60)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("trees")


def test_compiled_trees_equal_lightgbm_bit_for_bit(booster, cache):
    trees = compile_booster(booster, cache)
    assert trees is not None, "tl2cgen did not build (is gcc installed?)"
    rng = np.random.default_rng(1)
    X = np.vstack([parity_rows(booster, seed=5), rng.normal(size=(3000, 12)) * 2])
    X[rng.random(X.shape) < 0.2] = np.nan
    np.testing.assert_array_equal(trees.raw_score(X), booster.predict(X, raw_score=True))
    # values the library would get wrong are not for it: LightGBM's zero band, and doubles
    # whose low 32 bits are all ones (tl2cgen reads them as missing)
    for bad in (-1e-35, np.nextafter(5.5, 0.0)):
        Y = X.copy()
        Y[0, 3] = bad
        assert trees.raw_score(Y) is None
    # the second build is the cached library
    again = compile_booster(booster, cache)
    assert again is not None and again.path == trees.path


def test_a_compiler_failure_or_a_difference_leaves_lightgbm_scoring(booster, tmp_path, monkeypatch):
    import tl2cgen

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(tl2cgen, "export_lib", broken)
    assert compile_booster(booster, tmp_path / "a") is None
    monkeypatch.undo()
    real = compiled.CompiledTrees.raw_score
    monkeypatch.setattr(compiled.CompiledTrees, "raw_score", lambda self, X: real(self, X) + 1e-15)
    assert compile_booster(booster, tmp_path / "b") is None  # one ulp off: not used


def test_risk_model_and_served_model_use_them_only_after_parity(booster, cache, monkeypatch):
    from serving.scoring import LoadedModel

    monkeypatch.setenv("VITALRISK_TREE_CACHE", str(cache))
    names = [f"f{i}" for i in range(12)]
    model = RiskModel(booster=booster, feature_names=names, metadata={"compiled_trees": "tl2cgen"})
    model.calibrator = Calibrator("none")
    X = np.random.default_rng(2).normal(size=(500, 12))
    want = model.predict_proba(pd.DataFrame(X, columns=names))
    served = LoadedModel("m", "1", "champion", None, model)
    assert served.compiling is not None
    served.compiling.join(timeout=600)
    assert model.compiled is not None
    np.testing.assert_array_equal(served.predict_matrix(X), want)
    np.testing.assert_array_equal(model.predict_proba(pd.DataFrame(X, columns=names)), want)
    # params can switch it off
    monkeypatch.setenv("VITALRISK_COMPILED_TREES", "none")
    plain = RiskModel(booster=booster, feature_names=names, metadata={"compiled_trees": "tl2cgen"})
    assert LoadedModel("m", "2", None, None, plain).compiling is None


def test_a_model_pickled_before_compiled_trees_still_scores(booster):
    names = [f"f{i}" for i in range(12)]
    model = RiskModel(booster=booster, feature_names=names, calibrator=Calibrator("none"))
    state = model.__getstate__()
    del state["compiled"]  # as pickled by the earlier RiskModel
    old = RiskModel.__new__(RiskModel)
    old.__setstate__(state)
    old.booster = booster
    X = np.random.default_rng(3).normal(size=(40, 12))
    np.testing.assert_array_equal(old.raw_matrix(X), booster.predict(X, raw_score=True))
