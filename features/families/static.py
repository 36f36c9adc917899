"""Static covariates from the patient table (``age``, ``sex_f``, ``cm_*``, ...).

Explicit names always become columns (missing when the table lacks them, so training and
serving see the same columns); shell-style patterns (``cm_*``) expand against the columns the
patient table has. ``sex_f`` is derived from ``sex``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from features.config import FeaturesConfig
from features.plan import Bank, Context, Family, FeatureSpec, Part, Requests

DEFAULT_STATIC = ["age", "sex_f", "cm_*"]
#: up to this many patients the conversions below use plain Python (same values, less setup)
_SMALL = 1024
_PLAIN_NUMBERS = (float, int, bool)


def static_columns(config: FeaturesConfig, available: Iterable[str]) -> list[str]:
    """Static covariate columns: explicit names always, patterns expanded on ``available``."""
    if not config.enabled("static"):
        return []
    avail = [c for c in available if c not in ("patient_id", "setting")]
    if "sex" in avail:
        avail.append("sex_f")
    out: list[str] = []
    items: list[str] = config.section("static")
    for item in items:
        if any(ch in item for ch in "*?["):
            out += sorted(c for c in avail if fnmatch.fnmatchcase(c, item) and c not in out)
        elif item not in out:
            out.append(item)
    return out


def as_float(col: np.ndarray) -> np.ndarray:
    """``pd.to_numeric(col, errors="coerce")`` as float64 (NaN where not a number)."""
    a = np.asarray(col)
    if a.dtype.kind in "biuf":
        return a.astype(np.float64)
    items = a.tolist()
    if len(items) <= _SMALL and all(x is None or type(x) in _PLAIN_NUMBERS for x in items):
        # plain Python numbers (a few patients): what to_numeric gives, without its setup
        try:
            return np.array([np.nan if x is None else float(x) for x in items], dtype=np.float64)
        except OverflowError:  # an int beyond float range: let pandas decide
            pass
    return pd.to_numeric(pd.Series(a, dtype=object), errors="coerce").to_numpy(dtype=np.float64)


def _sex_f(sex: np.ndarray, n: int) -> np.ndarray:
    sex = np.asarray(sex, dtype=object)
    if n <= _SMALL:
        return np.array(
            [np.nan if pd.isna(x) else float(str(x).upper() == "F") for x in sex],
            dtype=np.float64,
        )
    s = pd.Series(sex, dtype=object)
    return np.where(s.isna(), np.nan, (s.astype(str).str.upper() == "F").astype(float))


class Static(Family):
    name = "static"
    section = "static"
    params_type = list[str]
    params_default = DEFAULT_STATIC

    def _columns(self, ctx: Context) -> list[str]:
        return static_columns(ctx.config, ctx.patient_fields)

    def specs(self, ctx: Context) -> list[FeatureSpec]:
        return [
            FeatureSpec(
                col,
                "1 if sex is F" if col == "sex_f" else f"static covariate {col}",
                "a" if col == "age" else "1",
                "static",
                "",
            )
            for col in self._columns(ctx)
        ]

    def patient_fields(self, ctx: Context) -> list[str]:
        return [*static_columns(ctx.config, ctx.patient_fields), "sex"]

    def per_patient(self, ctx: Context, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        cols = self._columns(ctx)
        out = np.full((len(cols), n), np.nan)
        for i, c in enumerate(cols):
            if c == "sex_f" and "sex_f" not in columns and "sex" in columns:
                out[i] = _sex_f(columns["sex"], n)
            elif c in columns:
                out[i] = as_float(columns[c])
        return out

    def request(self, ctx: Context, req: Requests) -> Part:
        return Part(names=tuple(self._columns(ctx)))

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        values: np.ndarray = bank.patient[self.name]
        return values[:, bank.patient_index]


FAMILY = Static()
