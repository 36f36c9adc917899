"""NEWS2 (RCP 2017) sub-scores, total and missing count from each parameter's latest value.

Scoring itself is ``features.news2`` (the chart); this family picks the latest values that
are recent enough (``news2.max_age_hours``) and the SpO2 scale per patient
(``news2.scale2_flags``). ``news2_total`` is always produced, also with the family switched
off: it is the baseline every evaluation compares against.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.vocabulary import Vocabulary
from features.config import FeaturesConfig
from features.news2 import NEWS2_CODES, news2_scores
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests

_TEXT = (
    ("rr", "respiration rate"),
    ("spo2", "SpO2 (scale 1, or scale 2 for flagged hypercapnic patients)"),
    ("o2", "air or oxygen"),
    ("sbp", "systolic blood pressure"),
    ("hr", "pulse"),
    ("temp", "temperature"),
    ("consciousness", "consciousness (ACVPU: anything but alert scores 3)"),
)
#: every output of :func:`features.news2.news2_scores`, in its order
SCORE_NAMES = tuple(news2_scores({}, np.zeros(1, dtype=bool)))


class News2Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: a latest value older than this is treated as not measured
    max_age_hours: float = Field(default=24.0, gt=0)
    #: patient covariates (truthy = hypercapnic respiratory failure) that select SpO2 scale 2
    scale2_flags: list[str] = Field(default_factory=lambda: ["spo2_scale2"])


def params(config: FeaturesConfig) -> News2Config:
    out: News2Config = config.section("news2")
    return out


def recent_values(
    bank: Bank, codes: Mapping[str, int], max_age_hours: float
) -> dict[str, np.ndarray]:
    """Latest value per NEWS2 key (``codes``: key -> code row), NaN when older than the age."""
    return {
        k: np.where(bank.since[ci] <= max_age_hours, bank.last[ci], np.nan)
        for k, ci in codes.items()
    }


def news2_code_rows(ctx: Context, req: Requests) -> dict[str, int]:
    """NEWS2 key -> row of its code in the bank, for the codes this call has."""
    return {k: req.code(c) for k, c in NEWS2_CODES.items() if c in ctx.all_codes}


def _as_float(col: np.ndarray) -> np.ndarray:
    from features.families.static import as_float

    return as_float(col)


class News2(Family):
    name = "news2"
    section = "news2"
    params_type = News2Config

    def active(self, ctx: Context) -> bool:
        return True  # news2_total always; the switch decides the rest

    def lookback_needed(self, config: FeaturesConfig) -> float:
        return params(config).max_age_hours

    def input_codes(self, config: FeaturesConfig, vocab: Vocabulary) -> set[str]:
        return {c for c in NEWS2_CODES.values() if c in vocab.codes}

    def _names(self, ctx: Context) -> tuple[str, ...]:
        return SCORE_NAMES if ctx.config.enabled(self.name) else ("news2_total",)

    def specs(self, ctx: Context) -> list[FeatureSpec]:
        age = f"latest value within {params(ctx.config).max_age_hours:g} h"
        all_codes = ",".join(NEWS2_CODES.values())
        total = FeatureSpec(
            "news2_total",
            "NEWS2 total (RCP 2017); parameters not measured score 0",
            "points",
            age,
            all_codes,
        )
        if not ctx.config.enabled(self.name):
            return [total]
        subs = [
            FeatureSpec(f"news2_{k}", f"NEWS2 sub-score: {text}", "points", age, NEWS2_CODES[k])
            for k, text in _TEXT
        ]
        return [
            *subs,
            total,
            FeatureSpec("news2_n_missing", "NEWS2 parameters without a value", "1", age, all_codes),
            FeatureSpec("news2_spo2_scale", "SpO2 scale used (1 or 2)", "1", "static", "spo2"),
        ]

    def patient_fields(self, ctx: Context) -> list[str]:
        return list(params(ctx.config).scale2_flags)

    def per_patient(self, ctx: Context, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """SpO2 scale 2 per patient: any flag column > 0 (missing or non-numeric counts as 0)."""
        out = np.zeros(n, dtype=bool)
        for f in params(ctx.config).scale2_flags:
            if f in columns:
                out |= _as_float(columns[f]) > 0  # NaN > 0 is False, as fillna(0)
        return out

    def request(self, ctx: Context, req: Requests) -> Part:
        names = self._names(ctx)
        return Part(
            names=names,
            data={
                "codes": news2_code_rows(ctx, req),
                "age": params(ctx.config).max_age_hours,
                "names": names,
            },
        )

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        recent = recent_values(bank, part.data["codes"], part.data["age"])
        scale2 = bank.patient[self.name][bank.patient_index]
        scores = news2_scores(recent, scale2)
        return np.vstack([scores[k] for k in part.data["names"]])


FAMILY = News2()
