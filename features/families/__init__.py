"""The feature families, one module each, registered in :data:`FAMILIES` (output order).

A family declares its feature specs, what it needs from the observations and one vectorised
combine step (``features.plan.Family``); its params section, if any, is its own pydantic
model (``section`` / ``params_type``), validated as ``params.yaml: features.<section>``.
Adding a family is its module, one entry here and its params; nothing else changes. Tests
add a family for the duration of a block with :func:`registered`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from features.families import (
    activity,
    baseline,
    last,
    missingness,
    news2,
    shock_index,
    sleep,
    static,
    windows,
)
from features.plan import Family

#: every family, in output order: per-code features come code by code in this order, then
#: the features of each family that are not tied to one code
FAMILIES: list[Family] = [
    last.FAMILY,
    windows.FAMILY,
    baseline.FAMILY,
    activity.FAMILY,
    sleep.FAMILY,
    missingness.FAMILY,
    news2.FAMILY,
    shock_index.FAMILY,
    static.FAMILY,
]

_EXTRA: list[Family] = []


def registered_families() -> list[Family]:
    return [*FAMILIES, *_EXTRA]


@contextmanager
def registered(family: Family) -> Iterator[Family]:
    """Register ``family`` (after the others) inside the block, e.g. a toy family in a test."""
    if any(f.name == family.name for f in registered_families()):
        raise ValueError(f"a family named {family.name!r} is already registered")
    _EXTRA.append(family)
    try:
        yield family
    finally:
        _EXTRA.remove(family)
