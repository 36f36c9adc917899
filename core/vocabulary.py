"""The observation vocabulary: canonical codes, LOINC mapping, UCUM units and plausible ranges.

The vocabulary is configuration (``config/vocabulary.yaml``); code only interprets it, so a new
lab or wearable signal is a YAML entry.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_VOCABULARY = Path(__file__).resolve().parent.parent / "config" / "vocabulary.yaml"


class UnitConversion(BaseModel):
    """canonical = value * scale + offset; with ``threshold``, canonical = value > threshold."""

    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0
    offset: float = 0.0
    threshold: float | None = None

    def apply(self, value: float) -> float:
        if self.threshold is not None:
            return 1.0 if value > self.threshold else 0.0
        return value * self.scale + self.offset

    def apply_array(self, values: np.ndarray) -> np.ndarray:
        """:meth:`apply` over a float64 array: the same IEEE operations for every value."""
        if self.threshold is not None:
            return np.where(values > self.threshold, 1.0, 0.0)
        return values * self.scale + self.offset


class CodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    display: str
    loinc: list[str] = Field(default_factory=list)
    unit: str
    units: dict[str, UnitConversion] = Field(default_factory=dict)
    range: tuple[float, float]
    categories: dict[str, float] = Field(default_factory=dict)
    kind: Literal["continuous", "binary", "ordinal", "count"] = "continuous"
    group: Literal["vital", "activity", "sleep", "lab"] = "vital"

    @model_validator(mode="after")
    def _canonical_unit_accepted(self) -> CodeSpec:
        if self.unit not in self.units:
            self.units[self.unit] = UnitConversion()
        lo, hi = self.range
        if not lo <= hi:
            raise ValueError(f"range {self.range} must be [min, max]")
        return self


class Vocabulary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    codes: dict[str, CodeSpec]
    panels: dict[str, list[str]] = Field(default_factory=dict)

    @cached_property
    def by_loinc(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, spec in self.codes.items():
            for loinc in spec.loinc:
                out[loinc] = key
        return out

    def resolve_code(self, code: str) -> str | None:
        """A vocabulary key for a key or a LOINC code (case-insensitive keys), else None."""
        c = str(code).strip()
        if c in self.codes:
            return c
        if c.lower() in self.codes:
            return c.lower()
        return self.by_loinc.get(c)

    def to_canonical(self, key: str, value: float | str, unit: str | None) -> float:
        """Convert one value to the canonical unit of ``key``.

        Raises ValueError with a message that says what was expected.
        """
        spec = self.codes[key]
        if isinstance(value, str):
            text = value.strip().lower()
            if text in spec.categories:
                return float(spec.categories[text])
            try:
                value = float(text)
            except ValueError:
                expected = sorted(spec.categories) if spec.categories else "a number"
                raise ValueError(f"value {value!r} for {key}: expected {expected}") from None
        v = float(value)
        if math.isnan(v) or math.isinf(v):
            raise ValueError(f"value {value!r} for {key}: expected a finite number")
        u = spec.unit if unit is None or str(unit).strip() == "" else str(unit).strip()
        conv = spec.units.get(u)
        if conv is None:
            raise ValueError(f"unit {u!r} for {key}: expected one of {sorted(spec.units)}")
        return conv.apply(v)

    def check_range(self, key: str, value: float) -> str | None:
        """A reason string when ``value`` (canonical unit) is implausible, else None."""
        lo, hi = self.codes[key].range
        if not lo <= value <= hi:
            return f"{key} value {value:g} {self.codes[key].unit} outside plausible range [{lo:g}, {hi:g}]"
        return None


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    p = Path(path) if path is not None else DEFAULT_VOCABULARY
    with p.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return Vocabulary.model_validate(raw)
