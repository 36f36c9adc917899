"""Missingness: whether a code was measured recently, and how often (measurement frequency)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.config import FeaturesConfig
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests


class MissingnessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: ``<code>_missing`` = no observation in (t - window_hours, t];
    #: ``<code>_per_hour`` = observations per hour in that window (measurement frequency)
    window_hours: float = Field(default=24.0, gt=0)


def params(config: FeaturesConfig) -> MissingnessConfig:
    out: MissingnessConfig = config.section("missingness")
    return out


class Missingness(Family):
    name = "missingness"
    section = "missingness"
    params_type = MissingnessConfig

    def lookback_needed(self, config: FeaturesConfig) -> float:
        return params(config).window_hours

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        s = ctx.spec(code)
        mw = params(ctx.config).window_hours
        win = f"(t-{mw:g}h, t]"
        return [
            FeatureSpec(
                f"{code}_missing", f"1 if no {s.display} in the last {mw:g} h", "1", win, code
            ),
            FeatureSpec(
                f"{code}_per_hour",
                f"measurement frequency of {s.display} in the last {mw:g} h",
                "/h",
                win,
                code,
            ),
        ]

    def request(self, ctx: Context, req: Requests) -> Part:
        mw = params(ctx.config).window_hours
        ivs = [req.interval(c, mw, stats=("count",)) for c in ctx.fcodes]
        names = tuple(f"{c}_{n}" for c in ctx.fcodes for n in ("missing", "per_hour"))
        return Part(names=names, index={"ivs": np.array(ivs, dtype=np.intp)}, data={"hours": mw})

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        cnt = bank.count(part["ivs"])
        out = np.empty((2 * len(cnt), bank.m))
        out[0::2] = (cnt == 0).astype(np.float64)
        out[1::2] = cnt / part.data["hours"]
        return out


FAMILY = Missingness()
