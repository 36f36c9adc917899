"""The observation vocabulary: canonical codes, LOINC mapping, UCUM units and plausible ranges.

The vocabulary is configuration (``config/vocabulary.yaml``); code only interprets it, so a new
lab or wearable signal is a YAML entry.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: the copy shipped with the package: used only when no project vocabulary is found
DEFAULT_VOCABULARY = Path(__file__).resolve().parent.parent / "config" / "vocabulary.yaml"
#: the project's vocabulary, relative to the working directory (DVC runs stages at the root)
PROJECT_VOCABULARY = Path("config") / "vocabulary.yaml"
VOCABULARY_ENV = "VITALRISK_VOCABULARY"


class UnitConversion(BaseModel):
    """canonical = value * scale + offset; with ``threshold``, canonical = value > threshold.

    ``range`` is the plausible range *in this input unit*, checked before converting. A
    threshold conversion needs one: after ``FiO2 > 0.21`` both -50 and 4000 would look like
    a valid 0/1, so the input itself must be judged first.
    """

    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0
    offset: float = 0.0
    threshold: float | None = None
    range: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _threshold_needs_range(self) -> UnitConversion:
        if self.threshold is not None and self.range is None:
            raise ValueError("a threshold conversion needs the input unit's plausible range")
        if self.range is not None and not self.range[0] <= self.range[1]:
            raise ValueError(f"range {self.range} must be [min, max]")
        return self

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
    #: unit assumed for a number sent without one; None: such a number is refused (a glucose
    #: of 65 could be mg/dL or mmol/L), unless the source column declares its unit
    default_unit: str | None = None

    @model_validator(mode="after")
    def _canonical_unit_accepted(self) -> CodeSpec:
        if self.unit not in self.units:
            self.units[self.unit] = UnitConversion()
        lo, hi = self.range
        if not lo <= hi:
            raise ValueError(f"range {self.range} must be [min, max]")
        if self.default_unit is not None and self.default_unit not in self.units:
            raise ValueError(f"default_unit {self.default_unit!r} is not one of its units")
        return self


def tolerant_limits(lo: float, hi: float, tol: float) -> tuple[float, float]:
    """A plausible range widened by the relative slack ``tol`` (``range_tolerance``): the
    one comparison ingest, the service and the monitor make against a range."""
    return lo - tol * abs(lo), hi + tol * abs(hi)


class Vocabulary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    codes: dict[str, CodeSpec]
    panels: dict[str, list[str]] = Field(default_factory=dict)
    #: relative slack on range limits: 0.1 converted and stored as 0.09999084 is not a
    #: different clinical value from the 0.1 limit
    range_tolerance: float = Field(1e-4, ge=0, le=0.01)
    #: other vocabulary files merged in by :func:`load_vocabulary` (kept for the record)
    include: list[str] = Field(default_factory=list)

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


def vocabulary_path(path: str | Path | None = None) -> Path:
    """Which vocabulary file a stage uses: the project's, never silently the package's.

    Order: an explicit path, ``$VITALRISK_VOCABULARY``, ``config/vocabulary.yaml`` of the
    working directory (the project root under DVC), and only then the packaged copy.
    """
    if path is not None:
        return Path(path)
    env = os.environ.get(VOCABULARY_ENV)
    if env:
        return Path(env)
    if PROJECT_VOCABULARY.is_file():
        return PROJECT_VOCABULARY
    return DEFAULT_VOCABULARY


def _read(p: Path, depth: int = 0) -> dict:
    with p.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    codes: dict = {}
    panels: dict = {}
    for inc in raw.get("include") or []:
        if depth > 4:
            raise ValueError(f"{p}: include nested too deep (a loop?)")
        sub = _read(p.parent / inc, depth + 1)
        codes.update(sub.get("codes") or {})
        panels.update(sub.get("panels") or {})
    codes.update(raw.get("codes") or {})
    panels.update(raw.get("panels") or {})
    return {**raw, "codes": codes, "panels": panels}


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """The project's vocabulary (see :func:`vocabulary_path`), with its ``include`` files
    merged in (entries of the file itself win)."""
    return Vocabulary.model_validate(_read(vocabulary_path(path)))


def vocabulary_from_dict(raw: dict) -> Vocabulary:
    """A vocabulary logged with a model (``Vocabulary.model_dump``) back into the object."""
    return Vocabulary.model_validate(raw)
