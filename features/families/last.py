"""Last value: the latest observation at or before t (within the lookback) and its age."""

from __future__ import annotations

import numpy as np

from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests


class LastValue(Family):
    name = "last"

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        s = ctx.spec(code)
        lb = f"(t-{ctx.config.lookback_hours:g}h, t]"
        return [
            FeatureSpec(f"{code}_last", f"latest {s.display}", s.unit, lb, code),
            FeatureSpec(
                f"{code}_hours_since", f"hours since the latest {s.display}", "h", lb, code
            ),
        ]

    def request(self, ctx: Context, req: Requests) -> Part:
        codes = np.array([req.code(c) for c in ctx.fcodes], dtype=np.intp)
        names = tuple(n for c in ctx.fcodes for n in (f"{c}_last", f"{c}_hours_since"))
        return Part(names=names, index={"codes": codes})

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        codes = part["codes"]
        out = np.empty((2 * len(codes), bank.m))
        out[0::2] = bank.last[codes]
        out[1::2] = bank.since[codes]
        return out


FAMILY = LastValue()
