"""Window statistics: mean/min/max/std/slope/count/sum of a code over trailing windows.

Windows follow the code's vocabulary ``group`` and statistics its ``kind`` (params section
``windows``), so any vocabulary entry gets them without code. ``min``/``max`` are running
values over the ascending windows (each window reuses the shorter one plus the new piece).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.config import FeaturesConfig, Group, Kind, Stat
from features.plan import MOMENT_STATS, Bank, Context, Family, FeatureSpec, Part, Requests

_DEFAULT_WINDOWS: dict[Group, list[float]] = {
    "vital": [4.0, 12.0, 24.0, 72.0],
    "activity": [24.0, 72.0],
    "sleep": [72.0],
    "lab": [24.0, 72.0],
}
_DEFAULT_STATS: dict[Kind, list[Stat]] = {
    "continuous": ["mean", "min", "max", "std", "slope", "count"],
    "count": ["sum", "count"],
    "binary": ["mean", "max"],
    "ordinal": ["max"],
}
_STAT_TEXT = {
    "mean": "mean",
    "min": "minimum",
    "max": "maximum",
    "std": "sample standard deviation",
    "slope": "least-squares slope per hour",
    "count": "number of observations",
    "sum": "sum",
}


class WindowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: trailing windows (hours, ending at the prediction time, (t - w, t]) per vocabulary group
    hours: dict[Group, list[float]] = Field(
        default_factory=lambda: {k: list(v) for k, v in _DEFAULT_WINDOWS.items()}
    )
    #: statistics per vocabulary kind (slope is per hour; std is the sample std)
    stats: dict[Kind, list[Stat]] = Field(
        default_factory=lambda: {k: list(v) for k, v in _DEFAULT_STATS.items()}
    )


def params(config: FeaturesConfig) -> WindowConfig:
    out: WindowConfig = config.section("windows")
    return out


def window_stats(config: FeaturesConfig, ctx: Context, code: str) -> tuple[list[float], list[str]]:
    """Windows of the code's group (ascending) and statistics of its kind."""
    p, s = params(config), ctx.spec(code)
    return sorted(p.hours.get(s.group, [])), [str(x) for x in p.stats.get(s.kind, [])]


def wlabel(hours: float) -> str:
    return f"{hours:g}h"


class Windows(Family):
    name = "windows"
    section = "windows"
    params_type = WindowConfig

    def lookback_needed(self, config: FeaturesConfig) -> float:
        return max([0.0, *(w for ws in params(config).hours.values() for w in ws)])

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        s = ctx.spec(code)
        ws, st = window_stats(ctx.config, ctx, code)
        out = []
        for w in ws:
            for stat in st:
                unit = {"count": "1", "slope": f"{s.unit}/h"}.get(stat, s.unit)
                text = f"{_STAT_TEXT[stat]} of {s.display} in the last {w:g} h"
                out.append(
                    FeatureSpec(f"{code}_{stat}_{wlabel(w)}", text, unit, f"(t-{w:g}h, t]", code)
                )
        return out

    def request(self, ctx: Context, req: Requests) -> Part:
        names: list[str] = []
        moment: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in MOMENT_STATS}
        extreme: dict[str, tuple[list[int], list[int], list[int]]] = {
            "min": ([], [], []),
            "max": ([], [], []),
        }
        for c in ctx.fcodes:
            ws, st = window_stats(ctx.config, ctx, c)
            kinds = [k for k in ("min", "max") if k in st]
            run = req.running(c, ws, kinds) if ws and kinds else -1
            for i, w in enumerate(ws):
                iv = req.interval(c, w, stats=[s for s in st if s in MOMENT_STATS])
                for stat in st:
                    if stat in moment:
                        moment[stat][0].append(len(names))
                        moment[stat][1].append(iv)
                    else:
                        rows, runs, wins = extreme[stat]
                        rows.append(len(names))
                        runs.append(run)
                        wins.append(i)
                    names.append(f"{c}_{stat}_{wlabel(w)}")
        index = {}
        for stat, (rows, ivs) in moment.items():
            if rows:
                index[f"rows_{stat}"] = np.array(rows, dtype=np.intp)
                index[f"iv_{stat}"] = np.array(ivs, dtype=np.intp)
        for stat, (rows, runs, wins) in extreme.items():
            if rows:
                index[f"rows_{stat}"] = np.array(rows, dtype=np.intp)
                index[f"run_{stat}"] = np.array(runs, dtype=np.intp)
                index[f"win_{stat}"] = np.array(wins, dtype=np.intp)
        return Part(names=tuple(names), index=index)

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        out = np.empty((len(part.names), bank.m))
        ix = part.index
        for stat in MOMENT_STATS:
            if f"rows_{stat}" in ix:
                out[ix[f"rows_{stat}"]] = bank.stats[stat][ix[f"iv_{stat}"]]
        for stat, runs in (("min", bank.run_min), ("max", bank.run_max)):
            if f"rows_{stat}" in ix:
                out[ix[f"rows_{stat}"]] = runs[ix[f"run_{stat}"], ix[f"win_{stat}"]]
        return out


FAMILY = Windows()
