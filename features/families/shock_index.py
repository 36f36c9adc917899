"""Shock index: heart rate over systolic BP, both latest values within the NEWS2 age."""

from __future__ import annotations

import numpy as np

from features.families.news2 import news2_code_rows, recent_values
from features.families.news2 import params as news2_params
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests


class ShockIndex(Family):
    name = "shock_index"

    def specs(self, ctx: Context) -> list[FeatureSpec]:
        age = f"latest value within {news2_params(ctx.config).max_age_hours:g} h"
        return [
            FeatureSpec(
                "shock_index",
                "heart rate / systolic BP (latest values)",
                "/min/mm[Hg]",
                age,
                "heart_rate,sbp",
            )
        ]

    def request(self, ctx: Context, req: Requests) -> Part:
        codes = {k: ci for k, ci in news2_code_rows(ctx, req).items() if k in ("hr", "sbp")}
        if len(codes) < 2:  # without both codes the column stays missing
            return Part(names=())
        return Part(
            names=("shock_index",),
            data={"codes": codes, "age": news2_params(ctx.config).max_age_hours},
        )

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        recent = recent_values(bank, part.data["codes"], part.data["age"])
        with np.errstate(invalid="ignore", divide="ignore"):
            sbp = recent["sbp"]
            return np.where(sbp > 0, recent["hr"] / sbp, np.nan)[None, :]


FAMILY = ShockIndex()
