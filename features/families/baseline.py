"""Personal baseline: a code's mean and std over a lagged window, and today's deviation.

The baseline window ``(t - start_days, t - end_days]`` leaves the recent past out, so a
deterioration does not become its own baseline. With fewer than ``min_count`` values the
baseline is missing. The activity and sleep families compare against the same window
(:func:`baseline_interval`, :func:`baseline_values`).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.config import FeaturesConfig
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests


class BaselineConfig(BaseModel):
    """Personal baseline: trailing window lagged so that the recent past is not in it."""

    model_config = ConfigDict(extra="forbid")
    #: baseline window is (t - start_days, t - end_days]
    start_days: float = Field(default=7.0, gt=0)
    end_days: float = Field(default=1.0, ge=0)
    #: fewer observations than this in the baseline window -> baseline features missing
    min_count: int = Field(default=3, ge=1)
    #: the recent window compared with the baseline (mean over (t - compare_hours, t])
    compare_hours: float = Field(default=24.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> BaselineConfig:
        if self.end_days >= self.start_days:
            raise ValueError("baseline.end_days must be smaller than baseline.start_days")
        return self

    @property
    def window(self) -> str:
        return f"(t-{self.start_days:g}d, t-{self.end_days:g}d]"


def params(config: FeaturesConfig) -> BaselineConfig:
    out: BaselineConfig = config.section("baseline")
    return out


def baseline_interval(req: Requests, code: str, stats: tuple[str, ...]) -> int:
    """The code's baseline interval, with ``count`` (for ``min_count``) and ``stats``."""
    b = params(req.ctx.config)
    return req.interval(code, b.start_days * 24, b.end_days * 24, stats=("count", *stats))


def baseline_values(
    bank: Bank, ivs: np.ndarray, b: BaselineConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(enough values, baseline mean, baseline std) per baseline interval; NaN if too few."""
    enough = bank.stats["count"][ivs] >= b.min_count
    bmean = np.where(enough, bank.stats["mean"][ivs], np.nan)
    bstd = np.where(enough, bank.stats["std"][ivs], np.nan)
    return enough, bmean, bstd


class Baseline(Family):
    name = "baseline"
    section = "baseline"
    params_type = BaselineConfig

    def lookback_needed(self, config: FeaturesConfig) -> float:
        b = params(config)
        return max(b.start_days * 24, b.compare_hours)

    def _codes(self, ctx: Context) -> list[str]:
        return [c for c in ctx.fcodes if ctx.spec(c).kind == "continuous"]

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        s = ctx.spec(code)
        if s.kind != "continuous":
            return []
        b = params(ctx.config)
        bwin, u = b.window, s.unit
        cmp = f"(t-{b.compare_hours:g}h, t] vs {bwin}"
        return [
            FeatureSpec(
                f"{code}_baseline_mean",
                f"personal baseline: mean {s.display} (at least {b.min_count} values)",
                u,
                bwin,
                code,
            ),
            FeatureSpec(
                f"{code}_baseline_std", f"personal baseline: std of {s.display}", u, bwin, code
            ),
            FeatureSpec(
                f"{code}_dev_baseline",
                f"mean {s.display} in the last {b.compare_hours:g} h minus the baseline mean",
                u,
                cmp,
                code,
            ),
            FeatureSpec(
                f"{code}_z_baseline",
                "deviation from baseline divided by the baseline std",
                "1",
                cmp,
                code,
            ),
        ]

    def request(self, ctx: Context, req: Requests) -> Part:
        b = params(ctx.config)
        codes = self._codes(ctx)
        base = [baseline_interval(req, c, ("mean", "std")) for c in codes]
        recent = [req.interval(c, b.compare_hours, stats=("mean",)) for c in codes]
        names = tuple(
            f"{c}_{n}" for c in codes for n in ("baseline_mean", "baseline_std", "dev_baseline")
        ) + tuple(f"{c}_z_baseline" for c in codes)
        return Part(
            names=names,
            index={
                "base": np.array(base, dtype=np.intp),
                "recent": np.array(recent, dtype=np.intp),
            },
            data={"baseline": b},
        )

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        b = params_of(part)
        _, bmean, bstd = baseline_values(bank, part["base"], b)
        k = len(part["base"])
        out = np.empty((4 * k, bank.m))
        with np.errstate(invalid="ignore", divide="ignore"):
            dev = bank.stats["mean"][part["recent"]] - bmean
            out[3 * k :] = np.where(bstd > 0, dev / bstd, np.nan)
        out[0 : 3 * k : 3] = bmean
        out[1 : 3 * k : 3] = bstd
        out[2 : 3 * k : 3] = dev
        return out


def params_of(part: Part) -> BaselineConfig:
    """The baseline params a part was planned with (kept in the part: combine has no config)."""
    out: BaselineConfig = part.data["baseline"]
    return out


FAMILY = Baseline()
