"""Sleep: last night's value of a ``group: sleep`` entry, and its difference from baseline."""

from __future__ import annotations

import numpy as np

from features.families.baseline import baseline_interval, baseline_values, params_of
from features.families.baseline import params as baseline_params
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests

#: a sleep value counts as last night's when recorded within this many hours
NIGHT_HOURS = 24.0


class Sleep(Family):
    name = "sleep"

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        s = ctx.spec(code)
        if s.group != "sleep":
            return []
        bwin = baseline_params(ctx.config).window
        return [
            FeatureSpec(
                f"{code}_last_night",
                f"latest {s.display} if recorded in the last 24 h (last night)",
                s.unit,
                "(t-24h, t]",
                code,
            ),
            FeatureSpec(
                f"{code}_last_night_vs_baseline",
                f"last night's {s.display} minus the personal baseline mean",
                s.unit,
                f"(t-24h, t] vs {bwin}",
                code,
            ),
        ]

    def request(self, ctx: Context, req: Requests) -> Part:
        codes = [c for c in ctx.fcodes if ctx.spec(c).group == "sleep"]
        base = [baseline_interval(req, c, ("mean",)) for c in codes]
        names = tuple(f"{c}_{n}" for c in codes for n in ("last_night", "last_night_vs_baseline"))
        return Part(
            names=names,
            index={
                "base": np.array(base, dtype=np.intp),
                "codes": np.array([req.code(c) for c in codes], dtype=np.intp),
            },
            data={"baseline": baseline_params(ctx.config)},
        )

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        _, bmean, _ = baseline_values(bank, part["base"], params_of(part))
        codes = part["codes"]
        out = np.empty((2 * len(codes), bank.m))
        night = np.where(bank.since[codes] <= NIGHT_HOURS, bank.last[codes], np.nan)
        out[0::2] = night
        out[1::2] = night - bmean
        return out


FAMILY = Sleep()
