"""Activity: a counted signal's total over the last 24 h against the personal daily baseline.

Applies to every vocabulary entry of ``group: activity`` (steps, ...). The baseline is the
baseline family's window (:mod:`features.families.baseline`), as a per-24 h rate.
"""

from __future__ import annotations

import numpy as np

from features.families.baseline import baseline_interval, baseline_values, params_of
from features.families.baseline import params as baseline_params
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests

#: the activity total is over this many hours (a day: the unit of the baseline rate)
DAY_HOURS = 24.0


class Activity(Family):
    name = "activity"

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        s = ctx.spec(code)
        if s.group != "activity":
            return []
        bwin, u = baseline_params(ctx.config).window, s.unit
        return [
            FeatureSpec(
                f"{code}_total_24h", f"total {s.display} in the last 24 h", u, "(t-24h, t]", code
            ),
            FeatureSpec(
                f"{code}_baseline_daily",
                f"personal baseline: {s.display} per 24 h",
                f"{u}/d",
                bwin,
                code,
            ),
            FeatureSpec(
                f"{code}_ratio_baseline",
                f"{s.display} in the last 24 h divided by the personal daily baseline",
                "1",
                f"(t-24h, t] vs {bwin}",
                code,
            ),
        ]

    def request(self, ctx: Context, req: Requests) -> Part:
        codes = [c for c in ctx.fcodes if ctx.spec(c).group == "activity"]
        base = [baseline_interval(req, c, ("sum",)) for c in codes]
        total = [req.interval(c, DAY_HOURS, stats=("sum",)) for c in codes]
        names = tuple(
            f"{c}_{n}" for c in codes for n in ("total_24h", "baseline_daily", "ratio_baseline")
        )
        return Part(
            names=names,
            index={"base": np.array(base, dtype=np.intp), "total": np.array(total, dtype=np.intp)},
            data={"baseline": baseline_params(ctx.config)},
        )

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        b = params_of(part)
        enough, _, _ = baseline_values(bank, part["base"], b)
        out = np.empty((3 * len(part["base"]), bank.m))
        with np.errstate(invalid="ignore", divide="ignore"):
            total = bank.stats["sum"][part["total"]]
            daily = np.where(
                enough, bank.stats["sum"][part["base"]] / (b.start_days - b.end_days), np.nan
            )
            out[2::3] = np.where(daily > 0, total / daily, np.nan)
        out[0::3] = total
        out[1::3] = daily
        return out


FAMILY = Activity()
