"""A new feature family is one module: a toy family defined here gets params, columns, a
dictionary entry and both executors, with nothing else changed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel, ConfigDict, Field

from core.errors import UserError
from core.params import validate_section
from features.build import compute_feature_arrays, feature_dictionary
from features.config import FeaturesConfig
from features.families import FAMILIES, registered
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests

from .test_executors import VOCAB, assert_same, both_paths, serving_batch


class RangeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hours: float = Field(default=12.0, gt=0)


class ToyRange(Family):
    """max - min of each continuous code over the last ``hours``, and a count over all codes."""

    name = "toy_range"
    section = "toy_range"
    params_type = RangeParams

    def _codes(self, ctx: Context) -> list[str]:
        return [c for c in ctx.fcodes if ctx.spec(c).kind == "continuous"]

    def lookback_needed(self, config: FeaturesConfig) -> float:
        return float(config.section("toy_range").hours)

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        h = ctx.config.section("toy_range").hours
        if code not in self._codes(ctx):
            return []
        return [FeatureSpec(f"{code}_range_{h:g}h", "max - min", ctx.spec(code).unit, "", code)]

    def specs(self, ctx: Context) -> list[FeatureSpec]:
        return [FeatureSpec("toy_observations", "observations of all codes", "1", "", "")]

    def request(self, ctx: Context, req: Requests) -> Part:
        h = ctx.config.section("toy_range").hours
        codes = self._codes(ctx)
        runs = [req.running(c, [h]) for c in codes]
        counts = [req.interval(c, h, stats=["count"]) for c in ctx.fcodes]
        return Part(
            names=(*(f"{c}_range_{h:g}h" for c in codes), "toy_observations"),
            index={"runs": np.array(runs, dtype=np.intp), "counts": np.array(counts)},
        )

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        runs = part["runs"]
        spread = bank.run_max[runs, 0] - bank.run_min[runs, 0]
        total = bank.count(part["counts"]).sum(axis=0)
        return np.vstack([spread, total[None, :]])


def test_toy_family_gets_params_columns_dictionary_and_both_executors(monkeypatch):
    obs, pats, times = serving_batch(4, 5)
    base = compute_feature_arrays(obs, pats, times, FeaturesConfig(dtype="float64"), VOCAB)
    with registered(ToyRange()):
        config = FeaturesConfig.model_validate({"dtype": "float64", "toy_range": {"hours": 12}})
        small, general = both_paths(monkeypatch, obs, pats, times, config)
        assert_same(small, general)
        doc = feature_dictionary(config, VOCAB, ["age"])
    names = small.names
    assert "heart_rate_range_12h" in names and names[-1] == "toy_observations"  # after all
    assert "toy_observations" in [f["name"] for f in doc["features"]]
    col = {n: small.values[i] for i, n in enumerate(names)}
    np.testing.assert_array_equal(
        col["heart_rate_range_12h"], col["heart_rate_max_12h"] - col["heart_rate_min_12h"]
    )
    assert (col["toy_observations"] >= col["heart_rate_count_12h"]).all()
    # every feature the families had before is unchanged, bit for bit
    pos = {n: i for i, n in enumerate(names)}
    same = base.values.view(np.int64) == small.values[[pos[n] for n in base.names]].view(np.int64)
    assert (same | np.isnan(base.values)).all()
    # the family can be switched off like any other
    with registered(ToyRange()):
        off = FeaturesConfig(families={"toy_range": False})
        out = compute_feature_arrays(obs, pats, times, off, VOCAB)
    assert not any("range" in n or n.startswith("toy") for n in out.names)


def test_family_params_are_validated_and_unknown_sections_rejected():
    with registered(ToyRange()):
        with pytest.raises(UserError, match=r"features\.toy_range\.hourz: unknown key"):
            validate_section(FeaturesConfig, "features", {"toy_range": {"hourz": 3}})
        with pytest.raises(UserError, match=r"features\.toy_range\.hours"):
            validate_section(FeaturesConfig, "features", {"toy_range": {"hours": -1}})
        with pytest.raises(UserError, match="lookback_hours"):
            validate_section(
                FeaturesConfig, "features", {"toy_range": {"hours": 500}, "lookback_hours": 168}
            )
    # without the family its section is an unknown key, and so is its switch
    with pytest.raises(UserError, match=r"features\.toy_range: unknown key"):
        validate_section(FeaturesConfig, "features", {"toy_range": {"hours": 3}})
    with pytest.raises(UserError, match=r"features\.families\.toy_range: unknown key"):
        validate_section(FeaturesConfig, "features", {"families": {"toy_range": False}})


def test_registered_families_are_one_list_of_distinct_names():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="already registered"), registered(FAMILIES[0]):
        pass


def test_family_that_combines_an_undeclared_feature_is_refused():
    class Sloppy(ToyRange):
        name = "sloppy"
        section = None
        params_type = None

        def lookback_needed(self, config: FeaturesConfig) -> float:
            return 0.0

        def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
            return []

        def specs(self, ctx: Context) -> list[FeatureSpec]:
            return []

        def request(self, ctx: Context, req: Requests) -> Part:
            return Part(names=("undeclared",))

    obs, pats, times = serving_batch(1, 1)
    with registered(Sloppy()), pytest.raises(ValueError, match="no spec for"):
        compute_feature_arrays(obs, pats, times, FeaturesConfig(), VOCAB)


def test_a_family_sees_new_vocabulary_entries_by_kind_and_group(cohort, config):
    """A lab added to the vocabulary gets the lab windows, baseline and missingness."""
    obs, pats, _ = cohort
    spec = VOCAB.codes["lactate"].model_copy(update={"display": "Troponin"})
    vocab = VOCAB.model_copy(update={"codes": {**VOCAB.codes, "troponin": spec}})
    times = pats[["patient_id", "followup_end"]].rename(columns={"followup_end": "time"})
    extra = obs[obs.code == "lactate"].assign(code="troponin")
    out = compute_feature_arrays(pd.concat([obs, extra]), pats, times, config, vocab)
    got = {n for n in out.names if n.startswith("troponin_")}
    want = {n.replace("lactate_", "troponin_") for n in out.names if n.startswith("lactate_")}
    assert got == want and "troponin_baseline_mean" in got and "troponin_max_72h" in got
