"""The one feature entry point for training and serving.

``compute_features`` turns long observations into one row of point-in-time features per
(patient, prediction time); batch training, the Dask backend and the one-patient helper
``features_for_patient`` call it. Underneath it, ``features_from_arrays`` takes plain arrays
(:class:`FeatureInputs`): the service calls that directly and skips building DataFrames;
``compute_features`` is ``feature_inputs`` (frames -> arrays) followed by it, so training and
serving cannot drift apart.

Small inputs (a few queries: serving) take a stacked path over all codes at once
(``_small_chunk_features``), large ones the per-code path (``_chunk_features``); both give the
same bits, which ``tests/features/test_small_path.py`` checks.

Only observations at or before the prediction time, and within ``lookback_hours`` of it, are
used. Which features exist is fixed by the config, the vocabulary and the static covariate
list, never by which data happen to be present: a code with no observations yields NaN
columns, so training and serving see the same columns.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import CodeSpec, Vocabulary
from features.config import FeaturesConfig
from features.labels import HOUR_NS, _ns, label_times, prediction_times
from features.news2 import NEWS2_CODES, news2_scores
from features.windows import (
    CodeSeries,
    centred_moments,
    moments_to_stats,
    range_reduce,
    segmented_cumsum,
    sort_series,
)

log = logging.getLogger(__name__)

ID_COLUMNS = ["patient_id", "time", "setting"]
#: integer time resolution of the search keys: nanoseconds (exact), coarser only when one
#: patient's time range exceeds ~70 years
_UNITS_NS = (1, 1_000, 1_000_000, 1_000_000_000)
_KEY_LIMIT = 1 << 62


@dataclass(frozen=True)
class FeatureSpec:
    """One entry of the feature dictionary."""

    name: str
    definition: str
    unit: str
    window: str
    code: str


def _wlabel(w: float) -> str:
    return f"{w:g}h"


def feature_codes(config: FeaturesConfig, vocab: Vocabulary) -> list[str]:
    if config.codes == "all":
        return list(vocab.codes)
    unknown = [c for c in config.codes if c not in vocab.codes]
    if unknown:
        raise ValueError(f"features.codes: {unknown} not in the vocabulary")
    return list(config.codes)


def static_columns(config: FeaturesConfig, available: Iterable[str]) -> list[str]:
    """Static covariate columns: explicit names always, patterns expanded on ``available``."""
    if not config.families.static:
        return []
    avail = [c for c in available if c not in ("patient_id", "setting")]
    if "sex" in avail:
        avail.append("sex_f")
    out: list[str] = []
    for item in config.static:
        if any(ch in item for ch in "*?["):
            out += sorted(c for c in avail if fnmatch.fnmatchcase(c, item) and c not in out)
        elif item not in out:
            out.append(item)
    return out


def _window_stats(config: FeaturesConfig, spec: CodeSpec) -> tuple[list[float], list[str]]:
    """Windows of the code's group and statistics of its kind."""
    ws = sorted(config.windows.hours.get(spec.group, []))
    st: list[str] = [str(x) for x in config.windows.stats.get(spec.kind, [])]
    return ws, st


_STAT_TEXT = {
    "mean": "mean",
    "min": "minimum",
    "max": "maximum",
    "std": "sample standard deviation",
    "slope": "least-squares slope per hour",
    "count": "number of observations",
    "sum": "sum",
}


#: feature_specs results by (config JSON, vocabulary entries used, static columns): the list
#: depends on nothing else, and rebuilding it per call was a large share of a one-patient call
_SPECS_CACHE: dict[
    tuple[Any, ...], tuple[tuple[FeatureSpec, ...], tuple[str, ...], dict[str, int]]
] = {}
_SPECS_CACHE_MAX = 64


def feature_specs(
    config: FeaturesConfig, vocab: Vocabulary, static_cols: list[str]
) -> list[FeatureSpec]:
    """Every feature column, in output order, with its dictionary entry (cached)."""
    return list(_spec_index(config, vocab, static_cols)[0])


def _spec_key(config: FeaturesConfig, vocab: Vocabulary, static_cols: list[str]) -> tuple[Any, ...]:
    """What the feature list (and the small path's plan) depends on."""
    return (
        config.model_dump_json(),
        tuple((c, s.display, s.unit, s.group, s.kind) for c, s in vocab.codes.items()),
        tuple(static_cols),
    )


def _spec_index(
    config: FeaturesConfig,
    vocab: Vocabulary,
    static_cols: list[str],
    key: tuple[Any, ...] | None = None,
) -> tuple[tuple[FeatureSpec, ...], tuple[str, ...], dict[str, int]]:
    """(specs, their names, name -> position), cached; callers must not modify them."""
    key = key or _spec_key(config, vocab, static_cols)
    hit = _SPECS_CACHE.get(key)
    if hit is None:
        specs = tuple(_feature_specs(config, vocab, static_cols))
        names = tuple(s.name for s in specs)
        hit = (specs, names, {n: i for i, n in enumerate(names)})
        if len(_SPECS_CACHE) >= _SPECS_CACHE_MAX:
            _SPECS_CACHE.clear()
        _SPECS_CACHE[key] = hit
    return hit


def _feature_specs(
    config: FeaturesConfig, vocab: Vocabulary, static_cols: list[str]
) -> list[FeatureSpec]:
    specs: list[FeatureSpec] = []
    fam = config.families
    b = config.baseline
    bwin = f"(t-{b.start_days:g}d, t-{b.end_days:g}d]"
    lb = f"(t-{config.lookback_hours:g}h, t]"
    for c in feature_codes(config, vocab):
        s = vocab.codes[c]
        u = s.unit
        if fam.last:
            specs.append(FeatureSpec(f"{c}_last", f"latest {s.display}", u, lb, c))
            specs.append(
                FeatureSpec(f"{c}_hours_since", f"hours since the latest {s.display}", "h", lb, c)
            )
        if fam.windows:
            ws, st = _window_stats(config, s)
            for w in ws:
                for stat in st:
                    unit = {"count": "1", "slope": f"{u}/h"}.get(stat, u)
                    specs.append(
                        FeatureSpec(
                            f"{c}_{stat}_{_wlabel(w)}",
                            f"{_STAT_TEXT[stat]} of {s.display} in the last {w:g} h",
                            unit,
                            f"(t-{w:g}h, t]",
                            c,
                        )
                    )
        if fam.baseline and s.kind == "continuous":
            specs += [
                FeatureSpec(
                    f"{c}_baseline_mean",
                    f"personal baseline: mean {s.display} (at least {b.min_count} values)",
                    u,
                    bwin,
                    c,
                ),
                FeatureSpec(
                    f"{c}_baseline_std", f"personal baseline: std of {s.display}", u, bwin, c
                ),
                FeatureSpec(
                    f"{c}_dev_baseline",
                    f"mean {s.display} in the last {b.compare_hours:g} h minus the baseline mean",
                    u,
                    f"(t-{b.compare_hours:g}h, t] vs {bwin}",
                    c,
                ),
                FeatureSpec(
                    f"{c}_z_baseline",
                    "deviation from baseline divided by the baseline std",
                    "1",
                    f"(t-{b.compare_hours:g}h, t] vs {bwin}",
                    c,
                ),
            ]
        if fam.activity and s.group == "activity":
            specs += [
                FeatureSpec(
                    f"{c}_total_24h", f"total {s.display} in the last 24 h", u, "(t-24h, t]", c
                ),
                FeatureSpec(
                    f"{c}_baseline_daily",
                    f"personal baseline: {s.display} per 24 h",
                    f"{u}/d",
                    bwin,
                    c,
                ),
                FeatureSpec(
                    f"{c}_ratio_baseline",
                    f"{s.display} in the last 24 h divided by the personal daily baseline",
                    "1",
                    f"(t-24h, t] vs {bwin}",
                    c,
                ),
            ]
        if fam.sleep and s.group == "sleep":
            specs += [
                FeatureSpec(
                    f"{c}_last_night",
                    f"latest {s.display} if recorded in the last 24 h (last night)",
                    u,
                    "(t-24h, t]",
                    c,
                ),
                FeatureSpec(
                    f"{c}_last_night_vs_baseline",
                    f"last night's {s.display} minus the personal baseline mean",
                    u,
                    f"(t-24h, t] vs {bwin}",
                    c,
                ),
            ]
        if fam.missingness:
            mw = config.missingness.window_hours
            specs += [
                FeatureSpec(
                    f"{c}_missing",
                    f"1 if no {s.display} in the last {mw:g} h",
                    "1",
                    f"(t-{mw:g}h, t]",
                    c,
                ),
                FeatureSpec(
                    f"{c}_per_hour",
                    f"measurement frequency of {s.display} in the last {mw:g} h",
                    "/h",
                    f"(t-{mw:g}h, t]",
                    c,
                ),
            ]
    age = f"latest value within {config.news2.max_age_hours:g} h"
    if fam.news2:
        for k, text in (
            ("rr", "respiration rate"),
            ("spo2", "SpO2 (scale 1, or scale 2 for flagged hypercapnic patients)"),
            ("o2", "air or oxygen"),
            ("sbp", "systolic blood pressure"),
            ("hr", "pulse"),
            ("temp", "temperature"),
            ("consciousness", "consciousness (ACVPU: anything but alert scores 3)"),
        ):
            specs.append(
                FeatureSpec(f"news2_{k}", f"NEWS2 sub-score: {text}", "points", age, NEWS2_CODES[k])
            )
    specs.append(
        FeatureSpec(
            "news2_total",
            "NEWS2 total (RCP 2017); parameters not measured score 0",
            "points",
            age,
            ",".join(NEWS2_CODES.values()),
        )
    )
    if fam.news2:
        specs += [
            FeatureSpec(
                "news2_n_missing",
                "NEWS2 parameters without a value",
                "1",
                age,
                ",".join(NEWS2_CODES.values()),
            ),
            FeatureSpec("news2_spo2_scale", "SpO2 scale used (1 or 2)", "1", "static", "spo2"),
        ]
    if fam.shock_index:
        specs.append(
            FeatureSpec(
                "shock_index",
                "heart rate / systolic BP (latest values)",
                "/min/mm[Hg]",
                age,
                "heart_rate,sbp",
            )
        )
    for col in static_cols:
        specs.append(
            FeatureSpec(
                col,
                "1 if sex is F" if col == "sex_f" else f"static covariate {col}",
                "a" if col == "age" else "1",
                "static",
                "",
            )
        )
    seen: set[str] = set()
    dup: set[str] = set()
    for spec in specs:
        (dup if spec.name in seen else seen).add(spec.name)
    if dup:
        raise ValueError(f"feature name clash: {sorted(dup)}")
    return specs


def feature_dictionary(
    config: FeaturesConfig, vocab: Vocabulary, static_cols: list[str]
) -> dict[str, Any]:
    """The JSON document written beside the features (docs/contracts.md)."""
    return {
        "features": [asdict(s) for s in feature_specs(config, vocab, static_cols)],
        "label": {
            "name": "label",
            "definition": "1 if a qualifying event occurs in (t, t + horizon], else 0",
            "horizon_hours": config.labels.horizon_hours,
            "event_types": config.labels.event_types or "all",
            "excluded": "times at/after the first event, outside follow-up, or whose horizon "
            "runs past the end of follow-up without an event (partial horizon) are dropped",
        },
        "params": config.model_dump(mode="json"),
    }


# --------------------------------------------------------------------------------------------
# array preparation


def _category_index(
    col: pd.Series, categories: np.ndarray, dtype: type[np.signedinteger] = np.int32
) -> np.ndarray:
    """Position of each value in the sorted ``categories`` (-1 if absent), per row (int64)."""
    if len(col) <= _SMALL_ROWS and not isinstance(col.dtype, pd.CategoricalDtype):
        # few rows (serving one patient): a dict lookup, without pandas' Categorical setup;
        # str() per value is what ``astype(str)`` does, so the codes are identical
        lut = {c: i for i, c in enumerate(categories.tolist())}
        return np.fromiter((lut.get(str(x), -1) for x in col.tolist()), dtype=dtype, count=len(col))
    if isinstance(col.dtype, pd.CategoricalDtype) and len(col.cat.categories) <= _SMALL_ROWS:
        # few categories: the same map by dict lookup (cheaper than the searches below)
        lut = {c: i for i, c in enumerate(categories.tolist())}
        cat = col.array
        hits = [lut.get(str(x), -1) for x in cat.categories.tolist()]
        return np.array([*hits, -1], dtype=dtype)[cat.codes]  # code -1 (NaN) -> -1
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = np.asarray(col.cat.categories.astype(str), dtype=object)
        pos = np.searchsorted(categories, cats)
        pos_c = np.minimum(pos, max(len(categories) - 1, 0))
        hit = (pos < len(categories)) & (categories[pos_c] == cats) if len(categories) else pos < 0
        cmap = np.append(np.where(hit, pos, -1), -1).astype(dtype)
        return cmap[col.cat.codes.to_numpy()]
    return pd.Categorical(col.astype(str), categories=categories).codes.astype(dtype)


def _time_unit(span_ns: int) -> int:
    """Finest unit in which one patient's time range fits the key space several times over."""
    for u in _UNITS_NS:
        if 16 * (span_ns // u + 4) < _KEY_LIMIT:
            return u
    raise ValueError("observation and prediction times span too long for the time keys")


#: inputs up to this many rows take the small-input paths below (same results, less setup)
_SMALL_ROWS = 1024
#: queries x windows up to which a code's window statistics are computed in one pass
_STACK_WINDOWS_MAX = 4096


def _patient_positions(patients: pd.DataFrame, pids: np.ndarray) -> np.ndarray | None:
    """Row of each pid's first entry in a small ``patients`` table holding every pid, else
    None (then the pandas path below handles duplicates and absent patients)."""
    if len(patients) > _SMALL_ROWS or "patient_id" not in patients:
        return None
    first: dict[str, int] = {}
    for i, x in enumerate(patients["patient_id"].tolist()):
        first.setdefault(str(x), i)
    try:
        return np.array([first[p] for p in pids.tolist()], dtype=np.intp)
    except KeyError:
        return None


def _column_values(col: pd.Series, pos: np.ndarray | None) -> np.ndarray:
    """One patient-table column as an array (at rows ``pos``): float64 if numeric, else object.

    Numeric columns become float64 here (NaN for missing) because that is what the static and
    flag conversions below would make of them anyway; ``setting``/``sex`` stay objects.
    """
    if col.dtype.kind in "biuf" and col.name not in ("setting", "sex"):
        a = col.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        a = col.to_numpy(dtype=object)
    return a if pos is None else a[pos]


def _patient_columns(
    patients: pd.DataFrame, pids: np.ndarray, keep: Iterable[str]
) -> dict[str, np.ndarray]:
    """Columns ``keep`` of the patient table, one value per pid (first row of a duplicated
    pid; missing for pids absent from the table)."""
    keep = [c for c in keep if c in patients and c != "patient_id"]
    pos = _patient_positions(patients, pids)
    if pos is not None:
        return {str(c): _column_values(patients[c], pos) for c in keep}
    pats = patients.drop_duplicates("patient_id")
    pats = pats.set_index(pats["patient_id"].astype(str)).reindex(pids)
    return {str(c): _column_values(pats[c], None) for c in keep}


def _as_float(col: np.ndarray) -> np.ndarray:
    """``pd.to_numeric(col, errors="coerce")`` as float64 (NaN where not a number)."""
    a = np.asarray(col)
    if a.dtype.kind in "biuf":
        return a.astype(np.float64)
    items = a.tolist()
    if len(items) <= _SMALL_ROWS and all(x is None or type(x) in _PLAIN_NUMBERS for x in items):
        # plain Python numbers (a few patients): what to_numeric gives, without its setup
        try:
            return np.array([np.nan if x is None else float(x) for x in items], dtype=np.float64)
        except OverflowError:  # an int beyond float range: let pandas decide
            pass
    return pd.to_numeric(pd.Series(a, dtype=object), errors="coerce").to_numpy(dtype=np.float64)


_PLAIN_NUMBERS = (float, int, bool)


def _static_values(
    columns: Mapping[str, np.ndarray], n: int, cols: list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Static feature columns and the setting, per patient, from the patient columns."""
    out: dict[str, np.ndarray] = {}
    for c in cols:
        if c == "sex_f" and "sex_f" not in columns and "sex" in columns:
            sex = np.asarray(columns["sex"], dtype=object)
            if n <= _SMALL_ROWS:
                out[c] = np.array(
                    [np.nan if pd.isna(x) else float(str(x).upper() == "F") for x in sex],
                    dtype=np.float64,
                )
            else:
                s = pd.Series(sex, dtype=object)
                out[c] = np.where(
                    s.isna(), np.nan, (s.astype(str).str.upper() == "F").astype(float)
                )
        elif c in columns:
            out[c] = _as_float(columns[c])
        else:
            out[c] = np.full(n, np.nan)
    setting = (
        np.asarray(columns["setting"], dtype=object)
        if "setting" in columns
        else np.full(n, None, dtype=object)
    )
    return out, setting


def _scale2(columns: Mapping[str, np.ndarray], n: int, flags: list[str]) -> np.ndarray:
    """SpO2 scale 2 per patient: any flag column > 0 (missing or non-numeric counts as 0)."""
    out = np.zeros(n, dtype=bool)
    for f in flags:
        if f in columns:
            out |= _as_float(columns[f]) > 0  # NaN > 0 is False, as fillna(0)
    return out


def _moments_needed(
    config: FeaturesConfig, vocab: Vocabulary, code: str, fcodes: list[str]
) -> frozenset[str]:
    """Which centred prefix sums a code's features use (none for NEWS2-only codes)."""
    if code not in fcodes:
        return frozenset()
    spec = vocab.codes[code]
    fam = config.families
    stats: set[str] = set(config.windows.stats.get(spec.kind, [])) if fam.windows else set()
    if (fam.baseline and spec.kind == "continuous") or (fam.sleep and spec.group == "sleep"):
        stats |= {"mean", "std"}
    if fam.activity and spec.group == "activity":
        stats |= {"sum"}
    need: set[str] = set()
    if stats & {"mean", "sum", "std", "slope"}:
        need.add("v")
    if "std" in stats:
        need.add("vv")
    if "slope" in stats:
        need |= {"t", "tv", "tt"}
    return frozenset(need)


# --------------------------------------------------------------------------------------------
# the entry points


@dataclass
class _Keys:
    """Integer time keys: ``patient * span + (t - origin[patient]) / unit``.

    ``origin`` is per patient, so ``span`` only has to cover one patient's time range. With
    the default unit (1 ns) keys are exact: an observation at the prediction time is used, one
    1 ns later is not. A coarser unit rounds observations up and prediction times down, so
    it can leave a sub-unit observation out but never let a later one in.
    """

    unit: int
    span: int

    @property
    def hpu(self) -> float:
        return self.unit / HOUR_NS

    def units(self, hours: float) -> int:
        return round(hours * HOUR_NS / self.unit)


def _chunk_features(
    ctx: _Keys,
    config: FeaturesConfig,
    vocab: Vocabulary,
    all_codes: list[str],
    fcodes: list[str],
    origin: np.ndarray,
    p_idx: np.ndarray,
    c_idx: np.ndarray,
    t_ns: np.ndarray,
    val: np.ndarray,
    n_pat: int,
    qp: np.ndarray,
    qt: np.ndarray,
    scale2: np.ndarray,
) -> dict[str, np.ndarray]:
    """Every time-dependent feature for the queries of one chunk of patients.

    ``p_idx`` (local patient index, 0..n_pat-1), ``c_idx`` (index into ``all_codes``),
    ``t_ns``, ``val``: this chunk's observation rows; ``qp``/``qt``: its queries, sorted;
    ``origin``: per local patient, ns, a multiple of the unit, before all of its times.
    """
    res: dict[str, np.ndarray] = {}
    m = len(qp)
    span, unit, hpu = ctx.span, ctx.unit, ctx.hpu
    qt_u = (qt - origin[qp]) // unit
    qkey = qp * span + qt_u
    order = np.argsort(c_idx, kind="stable")  # radix sort: rows grouped by code
    bounds = np.concatenate([[0], np.cumsum(np.bincount(c_idx, minlength=len(all_codes)))])
    mw = config.missingness.window_hours
    b = config.baseline
    fam = config.families
    latest: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for ci, c in enumerate(all_codes):
        r = order[bounds[ci] : bounds[ci + 1]]
        t_u = t_ns[r] - origin[p_idx[r]]
        if unit > 1:
            t_u = -(-t_u // unit)  # ceil: an observation never moves earlier
        series = CodeSeries.build(
            p_idx[r], t_u, val[r], n_pat, span, hpu, _moments_needed(config, vocab, c, fcodes)
        )
        del r, t_u
        spec = vocab.codes[c]
        hi = series.upto(qkey)
        cache: dict[int, np.ndarray] = {}

        def after(
            hours: float, _s: CodeSeries = series, _cache: dict[int, np.ndarray] = cache
        ) -> np.ndarray:
            back = ctx.units(hours)
            if back not in _cache:
                _cache[back] = _s.after(qp, qkey, back, span)
            return _cache[back]

        has = hi > after(config.lookback_hours)
        if len(series.v):
            last_i = np.maximum(hi - 1, 0)
            last = np.where(has, series.v[last_i], np.nan)
            since = np.where(has, (qt_u - series.t[last_i]) * hpu, np.nan)
        else:
            last = np.full(m, np.nan)
            since = np.full(m, np.nan)
        latest[c] = (last, since)
        if c not in fcodes:
            continue
        res[f"{c}_last"] = last
        res[f"{c}_hours_since"] = since
        v0 = series.first_value(qp)

        def stats_over(
            lo: np.ndarray,
            up: np.ndarray,
            want: set[str],
            _s: CodeSeries = series,
            _v0: np.ndarray = v0,
        ) -> dict[str, np.ndarray]:
            return moments_to_stats(_s.window_sums(qp, lo, up, want), up - lo, _v0, want)

        if fam.windows:
            ws, st = _window_stats(config, spec)
            run_min = np.full(m, np.nan)
            run_max = np.full(m, np.nan)
            prev = hi
            los = [after(w) for w in ws]
            # few queries (serving): every window's sums and moments in one vectorised pass.
            # The arithmetic is elementwise, so each value is bit-identical to a per-window
            # call; it only saves the per-call overhead that dominates for small arrays.
            n_win = len(ws) if m * len(ws) <= _STACK_WINDOWS_MAX else 0
            if n_win > 1:
                lo_k = np.concatenate(los)
                hi_k = np.tile(hi, n_win)
                stacked = moments_to_stats(
                    series.window_sums(np.tile(qp, n_win), lo_k, hi_k, set(st)),
                    hi_k - lo_k,
                    np.tile(v0, n_win),
                    set(st),
                )
            for i, (w, lo) in enumerate(zip(ws, los, strict=True)):
                # ascending: min/max reuse the shorter window plus the new piece
                if n_win > 1:
                    stats = {name: a[i * m : (i + 1) * m] for name, a in stacked.items()}
                else:
                    stats = stats_over(lo, hi, set(st))
                # "+ 0.0" makes a zero +0.0: numpy's fmin/fmax pick the sign of a zero by
                # SIMD lane, so -0.0 vs 0.0 would depend on the query's place in the batch
                if "min" in st:
                    run_min = np.fmin(run_min, range_reduce(np.minimum, series.v_ext, lo, prev))
                    stats["min"] = run_min + 0.0
                if "max" in st:
                    run_max = np.fmax(run_max, range_reduce(np.maximum, series.v_ext, lo, prev))
                    stats["max"] = run_max + 0.0
                prev = lo
                for stat in st:
                    res[f"{c}_{stat}_{_wlabel(w)}"] = stats[stat]
        base_fam = fam.baseline and spec.kind == "continuous"
        act_fam = fam.activity and spec.group == "activity"
        sleep_fam = fam.sleep and spec.group == "sleep"
        if base_fam or act_fam or sleep_fam:
            base = stats_over(
                after(b.start_days * 24), after(b.end_days * 24), {"mean", "std", "sum", "count"}
            )
            enough = base["count"] >= b.min_count
            bmean = np.where(enough, base["mean"], np.nan)
            bstd = np.where(enough, base["std"], np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                if base_fam:
                    dev = stats_over(after(b.compare_hours), hi, {"mean"})["mean"] - bmean
                    res[f"{c}_baseline_mean"] = bmean
                    res[f"{c}_baseline_std"] = bstd
                    res[f"{c}_dev_baseline"] = dev
                    res[f"{c}_z_baseline"] = np.where(bstd > 0, dev / bstd, np.nan)
                if act_fam:
                    total = stats_over(after(24.0), hi, {"sum"})["sum"]
                    daily = np.where(enough, base["sum"] / (b.start_days - b.end_days), np.nan)
                    res[f"{c}_total_24h"] = total
                    res[f"{c}_baseline_daily"] = daily
                    res[f"{c}_ratio_baseline"] = np.where(daily > 0, total / daily, np.nan)
            if sleep_fam:
                night = np.where(since <= 24.0, last, np.nan)
                res[f"{c}_last_night"] = night
                res[f"{c}_last_night_vs_baseline"] = night - bmean
        if fam.missingness:
            cnt = (hi - after(mw)).astype(np.float64)
            res[f"{c}_missing"] = (cnt == 0).astype(np.float64)
            res[f"{c}_per_hour"] = cnt / mw
        del series, cache

    recent: dict[str, np.ndarray] = {}
    for k, c in NEWS2_CODES.items():
        if c in latest:
            last, since = latest[c]
            recent[k] = np.where(since <= config.news2.max_age_hours, last, np.nan)
    res.update(news2_scores(recent, scale2))
    if "hr" in recent and "sbp" in recent:
        with np.errstate(invalid="ignore", divide="ignore"):
            res["shock_index"] = np.where(recent["sbp"] > 0, recent["hr"] / recent["sbp"], np.nan)
    return res


# --------------------------------------------------------------------------------------------
# small inputs (serving): every code in one pass
#
# ``_chunk_features`` loops over codes and windows; for a handful of queries that is hundreds
# of numpy calls on arrays of a few elements, i.e. all overhead. The path below puts every
# code into ONE series keyed ``(code * n_pat + patient) * span + t`` (segments are still one
# patient's observations of one code), then does the searches, window sums, moments and
# min/max of all (code, window, query) combinations in a few stacked calls. Every value goes
# through the same IEEE operations in the same order as in ``_chunk_features`` (segment-local
# prefix sums, centring on the segment's first value, the same interval bounds, elementwise
# arithmetic, the same running min/max over the same pieces), so results are bit-identical;
# ``tests/features/test_small_path.py`` checks this against the general path.

#: a chunk takes the small path up to this many queries ...
_SMALL_QUERIES = 64
#: ... and this many observation rows
_SMALL_OBS = 1 << 15
#: the five statistics every interval of the small path gets (bank order)
_PLAN_STATS = ("mean", "sum", "count", "std", "slope")


@dataclass(frozen=True)
class _SmallPlan:
    """Where each time-dependent feature of the small path comes from (built once per config).

    A *slot* is one ``after(hours)`` bound of one code (back 0 = the upper bound ``hi``); an
    *interval* is a (code, lower slot, upper slot) over which the moment statistics are taken.
    Results are stacked into a bank of rows (each one value per query); ``src[i]`` is the bank
    row of feature column ``cols[i]``.
    """

    n_codes: int
    slot_code: np.ndarray
    slot_back: np.ndarray
    hi_slot: np.ndarray  # per code
    lb_slot: np.ndarray  # per code: lookback
    iv_code: np.ndarray
    iv_lo: np.ndarray
    iv_hi: np.ndarray
    mm_lo: np.ndarray  # (codes with min/max, max windows): slot of each window's lower bound
    mm_end: np.ndarray  # same shape: end slot of each window's new piece (padding: empty)
    base_iv: np.ndarray  # baseline interval of each code with a baseline
    dev_base: np.ndarray  # position in base_iv, per code with baseline features
    dev_iv: np.ndarray
    act_base: np.ndarray
    act_iv: np.ndarray
    sleep_base: np.ndarray
    sleep_code: np.ndarray
    miss_code: np.ndarray
    miss_slot: np.ndarray
    news2_codes: tuple[tuple[str, int], ...]  # (NEWS2 key, code index) of present codes
    news2_names: tuple[str, ...]
    shock: bool
    cols: np.ndarray
    src: np.ndarray


_PLAN_CACHE: dict[tuple[Any, ...], _SmallPlan] = {}


def _small_plan(
    config: FeaturesConfig,
    vocab: Vocabulary,
    all_codes: list[str],
    fcodes: list[str],
    col_of: Mapping[str, int],
    ctx: _Keys,
) -> _SmallPlan:
    """The small path's plan: mirrors ``_chunk_features`` feature by feature."""
    fam = config.families
    b = config.baseline
    slots: dict[tuple[int, int], int] = {}
    ivs: dict[tuple[int, int, int], int] = {}

    def slot(ci: int, hours: float) -> int:
        return slots.setdefault((ci, ctx.units(hours) if hours else 0), len(slots))

    def interval(ci: int, lo: int, hi: int) -> int:
        return ivs.setdefault((ci, lo, hi), len(ivs))

    # features as (name, block, index); block offsets are known once all sizes are
    entries: list[tuple[str, str, int]] = []
    mm: list[tuple[list[int], list[int]]] = []
    mm_entries: list[tuple[str, str, int, int]] = []
    base_iv: list[int] = []
    dev_base: list[int] = []
    dev_iv: list[int] = []
    act_base: list[int] = []
    act_iv: list[int] = []
    sleep_base: list[int] = []
    sleep_code: list[int] = []
    miss_code: list[int] = []
    miss_slot: list[int] = []
    hi_slot = [slot(ci, 0.0) for ci in range(len(all_codes))]
    lb_slot = [slot(ci, config.lookback_hours) for ci in range(len(all_codes))]
    for ci, c in enumerate(all_codes):
        if c not in fcodes:
            continue
        spec = vocab.codes[c]
        hs = hi_slot[ci]
        entries += [(f"{c}_last", "last", ci), (f"{c}_hours_since", "since", ci)]
        if fam.windows:
            ws, st = _window_stats(config, spec)
            los = [slot(ci, w) for w in ws]
            for w, lo in zip(ws, los, strict=True):
                k = interval(ci, lo, hs)
                entries += [(f"{c}_{s}_{_wlabel(w)}", s, k) for s in st if s not in ("min", "max")]
            if ws and ("min" in st or "max" in st):
                r = len(mm)
                mm.append((los, [hs, *los[:-1]]))
                for i, w in enumerate(ws):
                    mm_entries += [
                        (f"{c}_{s}_{_wlabel(w)}", s, r, i) for s in ("min", "max") if s in st
                    ]
        base_fam = fam.baseline and spec.kind == "continuous"
        act_fam = fam.activity and spec.group == "activity"
        sleep_fam = fam.sleep and spec.group == "sleep"
        if base_fam or act_fam or sleep_fam:
            bi = len(base_iv)
            base_iv.append(interval(ci, slot(ci, b.start_days * 24), slot(ci, b.end_days * 24)))
            if base_fam:
                di = len(dev_iv)
                dev_base.append(bi)
                dev_iv.append(interval(ci, slot(ci, b.compare_hours), hs))
                entries += [
                    (f"{c}_baseline_mean", "bmean", bi),
                    (f"{c}_baseline_std", "bstd", bi),
                    (f"{c}_dev_baseline", "dev", di),
                    (f"{c}_z_baseline", "z", di),
                ]
            if act_fam:
                ai = len(act_iv)
                act_base.append(bi)
                act_iv.append(interval(ci, slot(ci, 24.0), hs))
                entries += [
                    (f"{c}_total_24h", "sum", act_iv[-1]),
                    (f"{c}_baseline_daily", "daily", ai),
                    (f"{c}_ratio_baseline", "ratio", ai),
                ]
            if sleep_fam:
                si = len(sleep_code)
                sleep_base.append(bi)
                sleep_code.append(ci)
                entries += [
                    (f"{c}_last_night", "night", si),
                    (f"{c}_last_night_vs_baseline", "night_vs", si),
                ]
        if fam.missingness:
            mi = len(miss_code)
            miss_code.append(ci)
            miss_slot.append(slot(ci, config.missingness.window_hours))
            entries += [(f"{c}_missing", "missing", mi), (f"{c}_per_hour", "per_hour", mi)]

    news2_codes = tuple((k, all_codes.index(c)) for k, c in NEWS2_CODES.items() if c in all_codes)
    news2_names = tuple(news2_scores({}, np.zeros(1, dtype=bool)))
    shock = {"hr", "sbp"} <= {k for k, _ in news2_codes}
    entries += [(name, "news2", i) for i, name in enumerate(news2_names)]
    if shock:
        entries.append(("shock_index", "shock", 0))

    n_codes, n_iv, n_mm = len(all_codes), len(ivs), len(mm)
    w_max = max([len(lo) for lo, _ in mm], default=0)
    sizes = {
        **dict.fromkeys(_PLAN_STATS, n_iv),
        "min": n_mm * w_max,
        "max": n_mm * w_max,
        "last": n_codes,
        "since": n_codes,
        "bmean": len(base_iv),
        "bstd": len(base_iv),
        "dev": len(dev_iv),
        "z": len(dev_iv),
        "daily": len(act_iv),
        "ratio": len(act_iv),
        "night": len(sleep_code),
        "night_vs": len(sleep_code),
        "missing": len(miss_code),
        "per_hour": len(miss_code),
        "news2": len(news2_names),
        "shock": int(shock),
    }
    offset: dict[str, int] = {}
    at = 0
    for block, size in sizes.items():
        offset[block] = at
        at += size
    entries += [(name, s, r * w_max + i) for name, s, r, i in mm_entries]
    cols: list[int] = []
    src: list[int] = []
    for name, block, i in entries:
        j = col_of.get(name)
        if j is not None:
            cols.append(j)
            src.append(offset[block] + i)
    mm_lo = np.full((n_mm, w_max), 0, dtype=np.intp)
    mm_end = np.full((n_mm, w_max), 0, dtype=np.intp)
    for r, (los, ends) in enumerate(mm):
        hs = ends[0]
        mm_lo[r] = hs  # padding: the empty piece [hi, hi)
        mm_end[r] = hs
        mm_lo[r, : len(los)] = los
        mm_end[r, : len(ends)] = ends
    slot_keys = list(slots)
    iv_keys = list(ivs)

    def arr(x: list[int]) -> np.ndarray:
        return np.array(x, dtype=np.intp)

    return _SmallPlan(
        n_codes=n_codes,
        slot_code=arr([c for c, _ in slot_keys]),
        slot_back=np.array([u for _, u in slot_keys], dtype=np.int64),
        hi_slot=arr(hi_slot),
        lb_slot=arr(lb_slot),
        iv_code=arr([c for c, _, _ in iv_keys]),
        iv_lo=arr([lo for _, lo, _ in iv_keys]),
        iv_hi=arr([hi for _, _, hi in iv_keys]),
        mm_lo=mm_lo,
        mm_end=mm_end,
        base_iv=arr(base_iv),
        dev_base=arr(dev_base),
        dev_iv=arr(dev_iv),
        act_base=arr(act_base),
        act_iv=arr(act_iv),
        sleep_base=arr(sleep_base),
        sleep_code=arr(sleep_code),
        miss_code=arr(miss_code),
        miss_slot=arr(miss_slot),
        news2_codes=news2_codes,
        news2_names=news2_names,
        shock=shock,
        cols=arr(cols),
        src=arr(src),
    )


def _padded_cumsum(x: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """:func:`segmented_cumsum` for a few segments: one zero-padded block, one cumsum call.

    Each element is the same sequential sum (``np.cumsum`` along the padded axis adds the
    segment's elements one after another, as a 1-D ``cumsum`` of the segment would); falls
    back to :func:`segmented_cumsum` when the padding would be large.
    """
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    n = x.shape[1]
    width = int(lengths.max()) if len(lengths) else 0
    if len(lengths) * width > 4 * n + 4096:
        return segmented_cumsum(x, starts, lengths, inplace=True)
    flat = np.arange(n) + np.repeat(np.arange(len(lengths)) * width - starts, lengths)
    block = np.zeros((x.shape[0], len(lengths) * width))
    block[:, flat] = x
    np.cumsum(
        block.reshape(x.shape[0], len(lengths), width),
        axis=2,
        out=block.reshape(x.shape[0], len(lengths), width),
    )
    return block[:, flat]


def _small_chunk_features(
    ctx: _Keys,
    config: FeaturesConfig,
    plan: _SmallPlan,
    origin: np.ndarray,
    p_idx: np.ndarray,
    c_idx: np.ndarray,
    t_ns: np.ndarray,
    val: np.ndarray,
    n_pat: int,
    qp: np.ndarray,
    qt: np.ndarray,
    scale2: np.ndarray,
) -> np.ndarray:
    """``_chunk_features`` for few queries: the bank of ``plan`` (rows x queries)."""
    m = len(qp)
    span, unit, hpu = ctx.span, ctx.unit, ctx.hpu
    n_codes = plan.n_codes
    qt_u = (qt - origin[qp]) // unit

    # -- one series: (code, patient, time), ties ordered by value, exact duplicates dropped --
    t_u = t_ns - origin[p_idx]
    if unit > 1:
        t_u = -(-t_u // unit)  # ceil: an observation never moves earlier
    key = (c_idx.astype(np.int64) * n_pat + p_idx) * span + t_u
    key, t_u, v = sort_series(key, t_u, val)
    n = len(key)
    seg = np.searchsorted(key, np.arange(n_codes * n_pat + 1, dtype=np.int64) * span)

    # -- centred moments and their segment-local prefix sums (as CodeSeries.build) ----------
    csum = np.empty((5, n))
    if n:
        centred_moments(csum, v, t_u, seg, hpu)
        # (segmented_cumsum leaves a code's all-zero row at +0.0 instead of summing it; the
        # sums are +0.0 anyway, since each segment starts at +0.0: centred on itself)
        csum = _padded_cumsum(csum, seg[:-1], np.diff(seg))

    # -- every after() bound of every code in one search --------------------------------------
    cq = np.arange(n_codes, dtype=np.int64)[:, None] * n_pat + qp[None, :]  # segment ids
    seg_key = cq * span
    sk = seg_key[plan.slot_code]
    bound = np.maximum(sk + (qt_u[None, :] - plan.slot_back[:, None]), sk - 1)
    idx = np.searchsorted(key, bound, side="right")
    hi = idx[plan.hi_slot]
    has_q = hi > idx[plan.lb_slot]
    if n:
        last_i = np.maximum(hi - 1, 0)
        last = np.where(has_q, v[last_i], np.nan)
        since = np.where(has_q, (qt_u - t_u[last_i]) * hpu, np.nan)
    else:
        last = np.full((n_codes, m), np.nan)
        since = np.full((n_codes, m), np.nan)

    # -- moment statistics of every interval (as CodeSeries.window_sums + moments_to_stats) --
    lo = idx[plan.iv_lo]
    up = idx[plan.iv_hi]
    seg_first = seg[cq[plan.iv_code]]
    if n:
        sums = csum[:, np.maximum(up - 1, 0)] - np.where(
            seg_first >= lo, 0.0, csum[:, np.maximum(lo - 1, 0)]
        )
        sums[:, up <= lo] = 0.0
        v0 = v[np.minimum(seg_first, n - 1)]
    else:
        sums = np.zeros((5, *lo.shape))
        v0 = np.zeros(lo.shape)
    stats = moments_to_stats(sums, up - lo, v0, set(_PLAN_STATS))

    # -- running min/max over windows: the same pieces, reduced in one reduceat each ---------
    n_mm, w_max = plan.mm_lo.shape
    if n_mm:
        # (code, query, window descending): consecutive pieces touch, so the gaps between
        # them that reduceat also reduces stay short
        s = idx[plan.mm_lo][:, ::-1, :].transpose(0, 2, 1).ravel()
        e = idx[plan.mm_end][:, ::-1, :].transpose(0, 2, 1).ravel()
        ii = np.empty(2 * len(s), dtype=np.intp)
        ii[0::2] = s
        ii[1::2] = e
        v_ext = np.append(v, 0.0)
        empty = e <= s
        runs = []
        for red, acc in ((np.minimum, np.fmin), (np.maximum, np.fmax)):
            piece = red.reduceat(v_ext, ii)[0::2]
            piece[empty] = np.nan
            piece = piece.reshape(n_mm, m, w_max).transpose(0, 2, 1)[:, ::-1, :]
            # + 0.0: zeros as +0.0, as in _chunk_features
            runs.append(acc.accumulate(piece, axis=1).reshape(n_mm * w_max, m) + 0.0)
    else:
        runs = [np.zeros((0, m)), np.zeros((0, m))]

    # -- baselines, activity, sleep, missingness (as _chunk_features, stacked over codes) ----
    b = config.baseline
    enough = stats["count"][plan.base_iv] >= b.min_count
    bmean = np.where(enough, stats["mean"][plan.base_iv], np.nan)
    bstd = np.where(enough, stats["std"][plan.base_iv], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        dev = stats["mean"][plan.dev_iv] - bmean[plan.dev_base]
        z = np.where(bstd[plan.dev_base] > 0, dev / bstd[plan.dev_base], np.nan)
        total = stats["sum"][plan.act_iv]
        daily = np.where(
            enough[plan.act_base],
            stats["sum"][plan.base_iv][plan.act_base] / (b.start_days - b.end_days),
            np.nan,
        )
        ratio = np.where(daily > 0, total / daily, np.nan)
    night = np.where(since[plan.sleep_code] <= 24.0, last[plan.sleep_code], np.nan)
    night_vs = night - bmean[plan.sleep_base]
    cnt = (hi[plan.miss_code] - idx[plan.miss_slot]).astype(np.float64)
    missing = (cnt == 0).astype(np.float64)
    per_hour = cnt / config.missingness.window_hours

    # -- NEWS2 and shock index from the latest values -----------------------------------------
    age = config.news2.max_age_hours
    recent = {k: np.where(since[ci] <= age, last[ci], np.nan) for k, ci in plan.news2_codes}
    scores = news2_scores(recent, scale2)
    blocks = [stats[s] for s in _PLAN_STATS]
    blocks += [runs[0], runs[1], last, since, bmean, bstd, dev, z, daily, ratio, night]
    blocks += [night_vs, missing, per_hour, np.vstack([scores[k] for k in plan.news2_names])]
    if plan.shock:
        with np.errstate(invalid="ignore", divide="ignore"):
            sbp = recent["sbp"]
            blocks.append(np.where(sbp > 0, recent["hr"] / sbp, np.nan)[None, :])
    return np.concatenate(blocks)[plan.src]


#: observations per chunk of patients: keeps temporaries small (reused by the allocator
#: instead of fresh pages) and gives the threads balanced work
CHUNK_OBSERVATIONS = 600_000


@dataclass
class FeatureArrays:
    """What :func:`compute_features` returns, before it becomes a DataFrame.

    ``values`` is (feature, row) in the dictionary's order; rows are the distinct
    (patient_id, time) pairs, sorted by both. Serving reads the model's columns straight from
    ``values`` instead of building and re-indexing a one-row frame of hundreds of columns.
    """

    names: list[str]
    values: np.ndarray
    patient_id: np.ndarray
    time_ns: np.ndarray
    setting: np.ndarray

    def frame(self) -> pd.DataFrame:
        """The ``compute_features`` frame: ids, time, setting, then one column per feature."""
        frame = pd.DataFrame(self.values.T, columns=self.names, copy=False)
        frame.insert(0, "patient_id", self.patient_id)
        frame.insert(1, "time", pd.to_datetime(self.time_ns, unit="ns", utc=True))
        frame.insert(2, "setting", self.setting)
        return frame


@dataclass
class FeatureInputs:
    """Arrays-level input of :func:`features_from_arrays`, the one feature implementation.

    Serving builds this straight from a request (no DataFrames); :func:`feature_inputs`
    builds it from the data-contract frames for :func:`compute_features`.

    - ``patient_ids``: distinct patient ids (str), sorted ascending.
    - ``obs_patient``: per observation row, index into ``patient_ids``; -1 = ignore the row.
    - ``obs_code``: per row, index into ``codes``; -1 = ignore. ``codes``: vocabulary keys
      (any order; keys the config does not use are ignored).
    - ``obs_time_ns``: int64 UTC nanoseconds; ``obs_value``: float64 in the canonical unit
      (NaN/inf rows are ignored). Rows may be in any order; later-than-all-queries rows are
      ignored.
    - ``query_patient`` (index into ``patient_ids``) and ``query_time_ns`` (int64 UTC ns): the
      prediction times; duplicates give one output row.
    - ``patient_columns``: patient-table fields, each an array aligned with ``patient_ids``:
      static covariates (``age``, ``cm_*``, ...: numbers, NaN = missing, or anything
      ``pd.to_numeric`` reads), ``sex`` ("F"/"M"/None; gives ``sex_f``), ``setting``
      (object) and the NEWS2 scale-2 flags of ``news2.scale2_flags`` (> 0 = scale 2). Which
      static features exist follows the keys, as ``static_columns(config, keys)``, exactly as
      for the columns of a patient table.
    """

    patient_ids: np.ndarray
    obs_patient: np.ndarray
    obs_code: np.ndarray
    codes: Sequence[str]
    obs_time_ns: np.ndarray
    obs_value: np.ndarray
    query_patient: np.ndarray
    query_time_ns: np.ndarray
    patient_columns: Mapping[str, np.ndarray]


def input_codes(config: FeaturesConfig, vocab: Vocabulary) -> list[str]:
    """Vocabulary keys whose observations the features use (feature codes + NEWS2), sorted."""
    fcodes = feature_codes(config, vocab)
    return sorted(set(fcodes) | {c for c in NEWS2_CODES.values() if c in vocab.codes})


def compute_features(
    observations: pd.DataFrame,
    patients: pd.DataFrame,
    times: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
) -> pd.DataFrame:
    """Point-in-time features at each (patient_id, time) of ``times``.

    Returns ``patient_id``, ``time``, ``setting`` and one float column per feature of the
    dictionary, one row per distinct (patient_id, time), sorted by both. Pure: inputs are not
    modified. ``observations`` may hold other patients and codes (ignored); ``patient_id`` and
    ``code`` may be categorical (fast path for large inputs).
    """
    return compute_feature_arrays(observations, patients, times, config, vocab).frame()


def compute_feature_arrays(
    observations: pd.DataFrame,
    patients: pd.DataFrame,
    times: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
) -> FeatureArrays:
    """:func:`compute_features` as arrays (same computation; the frame is built from these)."""
    return features_from_arrays(
        feature_inputs(observations, patients, times, config, vocab), config, vocab
    )


def feature_inputs(
    observations: pd.DataFrame,
    patients: pd.DataFrame,
    times: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
) -> FeatureInputs:
    """The arrays of the data-contract frames that :func:`features_from_arrays` needs."""
    if len(times) <= _SMALL_ROWS:
        # what factorize(astype(str), sort=True) gives, without its setup cost
        ids = [str(x) for x in times["patient_id"].tolist()]
        pids = np.array(sorted(set(ids)), dtype=object)
        rank = {p: i for i, p in enumerate(pids.tolist())}
        codes_ = np.fromiter((rank[p] for p in ids), dtype=np.int64, count=len(ids))
    else:
        codes_, uniq = pd.factorize(times["patient_id"].astype(str), sort=True)
        pids = np.asarray(uniq, dtype=object)
    all_codes = input_codes(config, vocab)
    cdtype = np.int8 if len(all_codes) < 127 else np.int16
    if len(pids) and len(observations):
        row_p = _category_index(observations["patient_id"], pids)
        row_c = _category_index(observations["code"], np.array(all_codes, dtype=object), cdtype)
        t_ns = _ns(observations["time"])
        val = observations["value"].to_numpy(dtype=np.float64)
    else:
        row_p = np.zeros(0, dtype=np.int32)
        row_c = np.zeros(0, dtype=cdtype)
        t_ns = np.zeros(0, dtype=np.int64)
        val = np.zeros(0)
    keep = [
        *static_columns(config, patients.columns),
        "sex",
        "setting",
        *config.news2.scale2_flags,
    ]
    return FeatureInputs(
        patient_ids=pids,
        obs_patient=row_p,
        obs_code=row_c,
        codes=all_codes,
        obs_time_ns=t_ns,
        obs_value=val,
        query_patient=codes_.astype(np.int64),
        query_time_ns=_ns(times["time"]),
        patient_columns=_patient_columns(patients, pids, keep),
    )


def features_from_arrays(
    inputs: FeatureInputs, config: FeaturesConfig, vocab: Vocabulary
) -> FeatureArrays:
    """Point-in-time features from arrays: the computation behind :func:`compute_features`.

    Output as :func:`compute_feature_arrays`: one row per distinct (patient, time) query,
    sorted by both, ``patient_id`` from ``inputs.patient_ids``.
    """
    pids = np.asarray(inputs.patient_ids, dtype=object)
    n_pat = len(pids)
    if n_pat > 1 and not bool((pids[1:] > pids[:-1]).all()):
        raise ValueError("FeatureInputs.patient_ids must be distinct and sorted")
    pcols = inputs.patient_columns
    static_cols = static_columns(config, pcols.keys())
    spec_key = _spec_key(config, vocab, static_cols)
    specs, spec_names, col_of = _spec_index(config, vocab, static_cols, spec_key)

    # -- queries: distinct (patient, time), sorted -----------------------------------------
    qp_all = np.asarray(inputs.query_patient, dtype=np.int64)
    qt_all = np.asarray(inputs.query_time_ns, dtype=np.int64)
    order = np.lexsort((qt_all, qp_all))
    qp, qt = qp_all[order], qt_all[order]
    if len(qp) > 1:
        new = np.ones(len(qp), dtype=bool)
        new[1:] = (qp[1:] != qp[:-1]) | (qt[1:] != qt[:-1])
        qp, qt = qp[new], qt[new]
    del order, qp_all, qt_all
    m = len(qt)

    # -- observations of these patients and codes, ordered by patient ------------------------
    fcodes = feature_codes(config, vocab)
    all_codes = input_codes(config, vocab)
    cdtype = np.int8 if len(all_codes) < 127 else np.int16
    if m and len(inputs.obs_patient):
        row_p = np.asarray(inputs.obs_patient)
        row_c = np.asarray(inputs.obs_code)
        if list(inputs.codes) != all_codes:
            pos = {c: i for i, c in enumerate(all_codes)}
            code_map = np.array([pos.get(str(c), -1) for c in inputs.codes] + [-1], dtype=cdtype)
            row_c = code_map[row_c]  # -1 stays -1 (the appended entry)
        t_ns = np.asarray(inputs.obs_time_ns, dtype=np.int64)
        val = np.asarray(inputs.obs_value, dtype=np.float64)
        # No lower time bound: a patient's prefix sums start at their first observation
        # whatever the batch, which keeps batch and single-patient results bit-identical.
        ok = (row_p >= 0) & (row_c >= 0) & (t_ns <= int(qt.max())) & np.isfinite(val)
        queried = np.zeros(n_pat + 1, dtype=bool)  # the extra entry: row_p == -1
        queried[qp] = True
        if not queried[:n_pat].all():
            ok &= queried[row_p]
        if not ok.all():
            row_p, row_c, t_ns, val = row_p[ok], row_c[ok], t_ns[ok], val[ok]
        del ok
        if len(row_p) > 1 and bool((row_p[1:] < row_p[:-1]).any()):
            by_p = np.argsort(row_p, kind="stable")
            row_p, row_c, t_ns, val = row_p[by_p], row_c[by_p], t_ns[by_p], val[by_p]
            del by_p
    else:
        row_p = np.zeros(0, dtype=np.int32)
        row_c = np.zeros(0, dtype=cdtype)
        t_ns = np.zeros(0, dtype=np.int64)
        val = np.zeros(0)

    # -- integer time keys: per-patient origin and range ----------------------------------------
    lookback_ns = round(config.lookback_hours * HOUR_NS)
    cum = np.searchsorted(row_p, np.arange(1, n_pat + 1))  # rows of patients < p+1
    first_q = np.searchsorted(qp, np.arange(n_pat))
    if m:
        last_q = np.searchsorted(qp, np.arange(1, n_pat + 1)) - 1
        lo_p = qt[np.minimum(first_q, m - 1)] - lookback_ns
        hi_p = qt[last_q]
        queried = last_q >= first_q
        if not queried.all():  # patients without queries: their rows are not used
            lo_p = np.where(queried, lo_p, 0)
            hi_p = np.where(queried, hi_p, 0)
    else:
        lo_p = hi_p = np.zeros(n_pat, dtype=np.int64)
    if len(t_ns):
        starts = np.concatenate([[0], cum[:-1]])
        has = cum > starts
        lo_p, hi_p = lo_p.copy(), hi_p.copy()
        lo_p[has] = np.minimum(lo_p[has], np.minimum.reduceat(t_ns, starts[has]))
        hi_p[has] = np.maximum(hi_p[has], np.maximum.reduceat(t_ns, starts[has]))
    range_ns = int((hi_p - lo_p).max()) + 2 if m else 2
    unit = _time_unit(range_ns)
    origin = (lo_p // unit) * unit - unit  # aligned: rounding does not depend on the batch
    ctx = _Keys(unit=unit, span=range_ns // unit + 4)
    max_pat = max(1, _KEY_LIMIT // ctx.span - 1)

    # -- chunks of whole patients, processed on threads ----------------------------------------
    cuts = [0]
    while cuts[-1] < n_pat:
        target = (cum[cuts[-1] - 1] if cuts[-1] else 0) + CHUNK_OBSERVATIONS
        nxt = max(cuts[-1] + 1, min(int(np.searchsorted(cum, target, "right")), n_pat))
        cuts.append(min(nxt, cuts[-1] + max_pat))
    p_bounds = np.searchsorted(row_p, cuts) if len(row_p) else np.zeros(len(cuts), int)
    q_bounds = np.searchsorted(qp, cuts)
    scale2 = _scale2(pcols, n_pat, config.news2.scale2_flags)

    dtype = np.dtype(config.dtype)
    out = np.empty((len(specs), m), dtype=dtype)
    written = np.zeros(len(specs), dtype=bool)

    def small_plan() -> _SmallPlan:
        key = (spec_key, unit)
        plan = _PLAN_CACHE.get(key)
        if plan is None:
            plan = _small_plan(config, vocab, all_codes, fcodes, col_of, ctx)
            if len(_PLAN_CACHE) >= _SPECS_CACHE_MAX:
                _PLAN_CACHE.clear()
            _PLAN_CACHE[key] = plan
        return plan

    def run_chunk(k: int) -> None:
        p_lo, p_hi = cuts[k], cuts[k + 1]
        o_lo, o_hi = p_bounds[k], p_bounds[k + 1]
        q_lo, q_hi = q_bounds[k], q_bounds[k + 1]
        if q_hi == q_lo:
            return
        args = (
            origin[p_lo:p_hi],
            row_p[o_lo:o_hi].astype(np.int64) - p_lo,
            row_c[o_lo:o_hi],
            t_ns[o_lo:o_hi],
            val[o_lo:o_hi],
            p_hi - p_lo,
            qp[q_lo:q_hi] - p_lo,
            qt[q_lo:q_hi],
            scale2[qp[q_lo:q_hi]],
        )
        if (
            q_hi - q_lo <= _SMALL_QUERIES
            and o_hi - o_lo <= _SMALL_OBS
            and len(all_codes) * (p_hi - p_lo) <= max_pat
        ):
            plan = small_plan()
            out[plan.cols, q_lo:q_hi] = _small_chunk_features(ctx, config, plan, *args)
            written[plan.cols] = True
            return
        res = _chunk_features(ctx, config, vocab, all_codes, fcodes, *args)
        for name, arr in res.items():
            j = col_of.get(name)
            if j is not None:
                out[j, q_lo:q_hi] = arr
                written[j] = True

    n_chunks = len(cuts) - 1
    n_threads = min(config.threads or os.cpu_count() or 1, n_chunks) if n_chunks > 1 else 1
    if n_threads > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(run_chunk, range(n_chunks)))
    else:
        for k in range(n_chunks):
            run_chunk(k)

    # -- static covariates ------------------------------------------------------------------
    static_vals, setting = _static_values(pcols, n_pat, static_cols)
    for name, arr in static_vals.items():
        out[col_of[name]] = arr[qp]
        written[col_of[name]] = True
    for j in np.flatnonzero(~written):
        out[j] = np.nan

    return FeatureArrays(
        names=list(spec_names),
        values=out,
        patient_id=pids[qp].astype(object),
        time_ns=qt,
        setting=setting[qp] if m else np.array([], dtype=object),
    )


def features_for_patient(
    observations: pd.DataFrame,
    covariates: Mapping[str, Any],
    at_time: Any,
    config: FeaturesConfig,
    vocab: Vocabulary,
    patient_id: str | None = None,
) -> pd.DataFrame:
    """Serving helper: the features of one patient at one time, as a one-row frame.

    ``observations`` are the patient's raw canonical observations (``time``, ``code``,
    ``value``; ``patient_id`` optional) covering at least ``lookback_hours`` before
    ``at_time``; ``covariates`` the patient-table fields (``age``, ``sex``, ``setting``,
    ``cm_*``, ...). Calls :func:`compute_features`, the batch code path.
    """
    pid = patient_id or covariates.get("patient_id") or "p_serving"
    pid = str(pid)
    obs = observations.copy()
    obs["patient_id"] = pid
    row = {k: v for k, v in covariates.items() if k != "patient_id"}
    patients = pd.DataFrame([{"patient_id": pid, **row}])
    ts = pd.Timestamp(at_time)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    times = pd.DataFrame({"patient_id": [pid], "time": pd.Series([ts]).dt.as_unit("ns")})
    return compute_features(obs, patients, times, config, vocab)


@dataclass
class BuildReport:
    rows: int
    excluded: dict[str, int]
    by_setting: dict[str, dict[str, float]]


def build_feature_matrix_with_report(
    observations: pd.DataFrame,
    patients: pd.DataFrame,
    outcomes: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
) -> tuple[pd.DataFrame, BuildReport]:
    """Prediction times, labels and features: the ``features`` stage's logic."""
    times = prediction_times(patients, config, observations)
    labelled, excluded = label_times(times, patients, outcomes, config)
    feats = compute_features(observations, patients, labelled, config, vocab)
    # compute_features returns distinct (patient_id, time) sorted; order the labels alike
    lab = labelled.drop_duplicates(["patient_id", "time"]).sort_values(
        ["patient_id", "time"], kind="stable"
    )
    if not (
        np.array_equal(lab["patient_id"].to_numpy(), feats["patient_id"].to_numpy())
        and np.array_equal(_ns(lab["time"]), _ns(feats["time"]))
    ):
        raise AssertionError("feature rows do not match the labelled prediction times")
    feats.insert(3, "label", lab["label"].to_numpy(dtype=np.int64))
    by_setting: dict[str, dict[str, float]] = {}
    for name, g in feats.groupby("setting", sort=True):
        n = len(g)
        pos = int(g["label"].sum())
        by_setting[str(name)] = {"rows": n, "positives": pos, "prevalence": pos / n if n else 0.0}
    return feats, BuildReport(rows=len(feats), excluded=excluded, by_setting=by_setting)


def build_feature_matrix(
    observations: pd.DataFrame,
    patients: pd.DataFrame,
    outcomes: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
) -> pd.DataFrame:
    """Prediction times + labels + :func:`compute_features` (exclusion counts in ``attrs``)."""
    feats, report = build_feature_matrix_with_report(
        observations, patients, outcomes, config, vocab
    )
    feats.attrs["excluded"] = report.excluded
    return feats


# --------------------------------------------------------------------------------------------
# IO at the edges (used by the pipeline, the Dask backend and the benchmark)

OBS_READ_COLUMNS = ["patient_id", "time", "code", "value"]


def read_observations(path: str | Path, filters: Any = None) -> pd.DataFrame:
    """Observations with ``patient_id``/``code`` as categoricals: compact and fast to index."""
    import pyarrow.parquet as pq

    if filters is not None:
        table = pq.read_table(
            path, columns=OBS_READ_COLUMNS, read_dictionary=["patient_id", "code"], filters=filters
        )
        return table.to_pandas(split_blocks=True, self_destruct=True)
    # One column at a time: Arrow buffers of one column only are alive during conversion,
    # which keeps the peak memory of a big read close to the frame's own size.
    cols: dict[str, pd.Series] = {}
    for c in OBS_READ_COLUMNS:
        dict_cols = [c] if c in ("patient_id", "code") else None
        table = pq.read_table(path, columns=[c], read_dictionary=dict_cols)
        cols[c] = table.to_pandas(split_blocks=True, self_destruct=True)[c]
        del table
    return pd.DataFrame(cols, copy=False)


def write_features(frame: pd.DataFrame, path: str | Path) -> None:
    """Parquet with float columns passed zero-copy (NaN stays NaN, no dictionary encoding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, names, dict_cols = [], [], []
    for name in frame.columns:
        col = frame[name]
        if col.dtype.kind == "f":
            arrays.append(pa.array(col.to_numpy()))
        else:
            arrays.append(pa.Array.from_pandas(col))
            dict_cols.append(str(name))
        names.append(str(name))
    table = pa.Table.from_arrays(arrays, names=names)
    pq.write_table(table, path, compression="snappy", use_dictionary=dict_cols)
