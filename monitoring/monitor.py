"""Monitoring logic: reference vs current window -> findings -> verdict (ok / warn / retrain).

The drift tests run in Evidently on samples (a few ten thousand rows say as much about a
distribution as a million, and effect-size tests do not turn every trivial shift into an
alarm at scale); the data-quality shares (missing, out of range, new categories) are exact,
accumulated chunk by chunk over the whole window.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary, tolerant_limits
from monitoring import evidently_reports as er
from monitoring import stattests
from monitoring.config import DriftTest, MonitorConfig
from monitoring.performance import performance
from monitoring.stattests import DISTANCE_METHODS

logger = logging.getLogger(__name__)

ColumnKind = Literal["numerical", "binary", "categorical"]
VERDICTS = ("ok", "warn", "retrain")
#: exit codes a scheduler can act on (2 stays "bad input", 1 an unexpected crash); a window
#: too small to test is neither ok nor a reason to retrain
EXIT_CODES = {"ok": 0, "warn": 10, "retrain": 20, "insufficient_data": 3}
PREDICTION = "probability"


# --------------------------------------------------------------------------- columns
def column_kinds(reference: pd.DataFrame, exclude: Iterable[str]) -> dict[str, ColumnKind]:
    """Kind of each monitored column, which picks its drift test.

    Text/categorical dtypes are categorical; numeric columns whose values are only 0/1 are
    binary (a Wasserstein distance on a flag is meaningless); everything else numerical.
    """
    skip = set(exclude) | {PREDICTION}
    kinds: dict[str, ColumnKind] = {}
    for col in reference.columns:
        if col in skip:
            continue
        s = reference[col]
        if pd.api.types.is_bool_dtype(s):
            kinds[col] = "binary"
        elif pd.api.types.is_numeric_dtype(s):
            values = pd.unique(s.dropna())
            kinds[col] = "binary" if len(values) and set(values) <= {0, 1} else "numerical"
        elif pd.api.types.is_datetime64_any_dtype(s):
            continue
        else:
            kinds[col] = "categorical"
    return kinds


def feature_codes(
    columns: Iterable[str], vocab: Vocabulary, dictionary: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Vocabulary code behind each feature: from the feature dictionary, else the name prefix."""
    by_dict: dict[str, str] = {}
    for entry in (dictionary or {}).get("features", []):
        code = entry.get("code")
        if code and code in vocab.codes:
            by_dict[entry["name"]] = code
    keys = sorted(vocab.codes, key=len, reverse=True)
    out: dict[str, str] = {}
    for col in columns:
        if col in by_dict:
            out[col] = by_dict[col]
            continue
        for key in keys:
            if col == key or col.startswith(key + "_"):
                out[col] = key
                break
    return out


def vocabulary_ranges(
    codes: Mapping[str, str], vocab: Vocabulary, range_stats: Iterable[str]
) -> dict[str, tuple[float, float]]:
    """Plausible range of features that hold a code's value (level statistics, not spreads)."""
    stats = set(range_stats)
    out: dict[str, tuple[float, float]] = {}
    for col, code in codes.items():
        tokens = set(col[len(code) :].strip("_").split("_")) if col != code else {"last"}
        if tokens & stats and not tokens & {
            "std",
            "slope",
            "delta",
            "diff",
            "dev",
            "z",
            "count",
            "vs",
        }:
            # stored features are float32 (0.21 reads back as 0.2099999934): the vocabulary's
            # slack keeps a limit value inside its range, as at ingest
            lo, hi = vocab.codes[code].range
            out[col] = tolerant_limits(float(lo), float(hi), vocab.range_tolerance)
    return out


def drift_tests(kinds: Mapping[str, ColumnKind], config: MonitorConfig) -> dict[str, DriftTest]:
    d = config.drift
    return {c: d.per_feature.get(c, getattr(d, kind)) for c, kind in kinds.items()}


def sample_reference(features: pd.DataFrame, config: MonitorConfig) -> pd.DataFrame:
    """``reference_size`` rows of the training features: balanced over patients when the
    drift tests run per patient (the same sampling as the current window, see
    ``prediction_log.patient_sample_rows``), else random rows."""
    if len(features) <= config.reference_size:
        return features.reset_index(drop=True)
    if config.drift.unit == "patient" and "patient_id" in features.columns:
        from monitoring.prediction_log import patient_sample_rows

        sample = patient_sample_rows(features, config.reference_size, config.seed)
        return sample.reset_index(drop=True)
    return features.sample(config.reference_size, random_state=config.seed).reset_index(drop=True)


# --------------------------------------------------------------------------- current window
@dataclass
class CurrentWindow:
    """A uniform sample of the window for the drift tests plus exact quality counts."""

    sample: pd.DataFrame
    rows: int
    missing: dict[str, int]
    out_of_range: dict[str, int]
    new_category: dict[str, int]
    new_values: dict[str, list[str]]
    probability_sum: float
    probability_n: int
    start: pd.Timestamp | None = None
    end: pd.Timestamp | None = None
    columns_absent: list[str] = field(default_factory=list)
    #: predictions in the window (``rows`` is what the quality counts were taken over)
    window_rows: int | None = None


def collect_current(
    chunks: Iterable[pd.DataFrame],
    expected_rows: int,
    kinds: Mapping[str, ColumnKind],
    ranges: Mapping[str, tuple[float, float]],
    ref_categories: Mapping[str, set[str]],
    config: MonitorConfig,
) -> CurrentWindow:
    """Stream chunks once: exact counts over all rows, a Bernoulli sample of ~current_size."""
    rng = np.random.default_rng(config.seed)
    rate = min(1.0, config.current_size / max(expected_rows, 1))
    cols = list(kinds)
    missing = dict.fromkeys(cols, 0)
    oor = dict.fromkeys(ranges, 0)
    newcat = {c: 0 for c, k in kinds.items() if k == "categorical"}
    newvals: dict[str, set[str]] = {c: set() for c in newcat}
    parts = []
    rows, psum, pn = 0, 0.0, 0
    for chunk in chunks:
        for c in cols:
            if c not in chunk.columns:
                chunk[c] = np.nan
        rows += len(chunk)
        na = chunk[cols].isna().sum()
        for c in cols:
            missing[c] += int(na[c])
        for c, (lo, hi) in ranges.items():
            v = chunk[c].to_numpy(dtype=float)
            oor[c] += int(np.count_nonzero((v < lo) | (v > hi)))
        for c in newcat:
            s = chunk[c].dropna().astype(str)
            fresh = s[~s.isin(ref_categories.get(c, set()))]
            newcat[c] += len(fresh)
            if len(newvals[c]) < 20:
                newvals[c].update(fresh.unique()[:20].tolist())
        if PREDICTION in chunk.columns:
            p = chunk[PREDICTION].dropna()
            psum += float(p.sum())
            pn += len(p)
        keep = chunk if rate >= 1 else chunk[rng.random(len(chunk)) < rate]
        parts.append(keep)
    sample = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    return CurrentWindow(
        sample=sample,
        rows=rows,
        missing=missing,
        out_of_range=oor,
        new_category=newcat,
        new_values={c: sorted(v) for c, v in newvals.items()},
        probability_sum=psum,
        probability_n=pn,
    )


def _as_category(s: pd.Series) -> pd.Series:
    """Text categories; 0/1 floats become "0"/"1" so the log's floats match the reference."""

    def one(v: Any) -> Any:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        if isinstance(v, float | np.floating) and float(v).is_integer():
            return str(int(v))
        return str(v)

    # the mapping is applied to the distinct values only (a Python call per row cost ~1 s per
    # column at a million rows); factorize marks missing values with code -1 -> None
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    table = np.array([one(u) for u in np.asarray(uniques, dtype=object)] + [None], dtype=object)
    return pd.Series(table[codes], index=s.index, dtype=object, name=s.name)


# --------------------------------------------------------------------------- noise floor
def _units(frame: pd.DataFrame) -> pd.Series:
    """Independent sampling units: patients when known, else rows."""
    if "patient_id" in frame.columns and frame["patient_id"].notna().all():
        return frame["patient_id"].astype(str)
    return pd.Series(np.arange(len(frame)).astype(str), index=frame.index)


def patient_units(frame: pd.DataFrame, kinds: Mapping[str, ColumnKind]) -> pd.DataFrame:
    """``per_patient`` of a frame as ``evaluate`` prepares it (categories as text).

    Comparing many windows against one reference (a scheduler, the benchmark), compute this
    once for the reference and pass it to ``evaluate(reference_units=...)``: the per-patient
    medians of a reference of a few thousand patients cost seconds per run otherwise.
    """
    return per_patient(_categories_as_text(frame, kinds), kinds)


def _categories_as_text(frame: pd.DataFrame, kinds: Mapping[str, ColumnKind]) -> pd.DataFrame:
    """A copy with every non-numerical column as text: one dtype per side for Evidently."""
    out = frame.copy()
    for c, k in kinds.items():
        if k != "numerical" and c in out.columns:
            out[c] = _as_category(out[c])
    return out


def per_patient(frame: pd.DataFrame, kinds: Mapping[str, ColumnKind]) -> pd.DataFrame:
    """One row per patient: median of numerical columns (and the risk), share of the
    patient's rows with a binary flag set, first value of categorical columns.

    Rows of one patient are strongly correlated (the same person scored every hour), so a
    row-level test on a cohort of 150 patients acts as if it had 30,000 independent draws.
    A flag's per-patient share (not its first value) is compared like a numerical feature:
    a proportion test on one row per patient breaks down on rare flags (one patient with a
    flag rare in training gave p < 1e-6 in a 100-patient window).
    """
    num = [c for c in kinds if kinds.get(c) == "numerical" and c in frame.columns]
    num += [PREDICTION] if PREDICTION in frame.columns else []
    binary = [c for c, k in kinds.items() if k == "binary" and c in frame.columns]
    cat = [c for c, k in kinds.items() if k == "categorical" and c in frame.columns]
    keys = frame["patient_id"].astype(str)
    g = frame.groupby(keys, sort=False)
    parts = [g[num].median()] if num else []
    if binary:
        flags = frame[binary].apply(lambda s: pd.to_numeric(s, errors="coerce")).astype(float)
        parts.append(flags.groupby(keys, sort=False).mean())
    if cat:
        parts.append(g[cat].first())
    out = pd.concat(parts, axis=1) if parts else pd.DataFrame(index=g.size().index)
    return out.rename_axis("patient_id").reset_index()


#: split-half score maxima by reference fingerprint: they do not depend on the current
#: window, so repeated runs against one reference (a scheduler, the benchmark) compute them once
_FLOOR_CACHE: dict[tuple[Any, ...], dict[str, float]] = {}


def _split_scores(
    reference: pd.DataFrame,
    ids: pd.Series,
    tests: Mapping[str, tuple[str, float, str]],
    splits: int,
    seed: int,
) -> dict[str, float]:
    """Largest drift score between random unit half-splits of the reference, per column."""
    if not tests:
        return {}
    cols = list(tests)
    key = (
        int(pd.util.hash_pandas_object(reference[cols], index=False).sum()),
        int(pd.util.hash_pandas_object(ids, index=False).sum()),
        tuple(sorted(tests.items())),
        splits,
        seed,
    )
    if key in _FLOOR_CACHE:
        return _FLOOR_CACHE[key]
    uniq = ids.unique()
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for _ in range(splits):
        mask = ids.isin(set(rng.permutation(uniq)[: len(uniq) // 2])).to_numpy()
        for c, (score, _) in stattests.scores(reference[mask], reference[~mask], tests).items():
            out[c] = max(out.get(c, 0.0), score)
    if len(_FLOOR_CACHE) >= 8:
        _FLOOR_CACHE.pop(next(iter(_FLOOR_CACHE)))
    _FLOOR_CACHE[key] = out
    return out


def noise_floor(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    tests: Mapping[str, tuple[str, float, str]],
    columns: Iterable[str],
    config: MonitorConfig,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-feature drift score and missing-share difference expected from sampling alone.

    The largest value over random patient half-splits of the reference, scaled from two
    halves of ``n`` units to ``n`` reference vs ``m`` current units (sampling noise of a
    two-sample distance shrinks like sqrt(1/n + 1/m)).
    """
    splits = config.drift.calibration_splits
    if splits == 0:
        return {}, {}
    ids = _units(reference)
    uniq = ids.unique()
    if len(uniq) < 4:
        return {}, {}
    n, m = len(uniq), max(_units(current).nunique(), 1)
    scale = float(np.sqrt((1 / n + 1 / m) / (4 / n)))
    dist_tests = {c: t for c, t in tests.items() if t[0] in DISTANCE_METHODS}
    raw = _split_scores(reference, ids, dist_tests, splits, config.seed + 7)
    score_floor = {c: v * scale for c, v in raw.items()}
    cols = list(columns)
    miss_floor: dict[str, float] = {}
    if cols:
        best = _split_missing(reference, ids, cols, splits, config.seed + 11) * scale
        miss_floor = {c: float(v) for c, v in zip(cols, best, strict=True)}
    return score_floor, miss_floor


#: split-half missing-share maxima of the last references, held by a weak reference to the
#: frame (they depend on the reference only; recomputing costs seconds at a million rows)
_MISSING_CACHE: dict[int, tuple[Any, tuple[Any, ...], np.ndarray]] = {}


def _split_missing(
    reference: pd.DataFrame, ids: pd.Series, cols: list[str], splits: int, seed: int
) -> np.ndarray:
    """Largest missing-share difference between random unit half-splits (unscaled)."""
    key = (tuple(cols), len(reference), splits, seed)
    hit = _MISSING_CACHE.get(id(reference))
    if hit is not None and hit[0]() is reference and hit[1] == key:
        return hit[2]
    # missing counts per unit once, then each split is a sum over units
    missing = reference[cols].isna().groupby(ids.to_numpy()).sum()
    rows = ids.value_counts().reindex(missing.index).to_numpy(dtype=float)
    miss = missing.to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    best = np.zeros(len(cols))
    for _ in range(splits):
        half = np.zeros(len(missing), bool)
        half[rng.permutation(len(missing))[: len(missing) // 2]] = True
        a = miss[half].sum(0) / rows[half].sum()
        b = miss[~half].sum(0) / rows[~half].sum()
        best = np.maximum(best, np.abs(a - b))
    for k in [k for k, v in _MISSING_CACHE.items() if v[0]() is None]:
        del _MISSING_CACHE[k]
    _MISSING_CACHE[id(reference)] = (weakref.ref(reference), key, best)
    return best


def segment_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    tests: Mapping[str, tuple[str, float, str]],
    config: MonitorConfig,
) -> tuple[dict[tuple[str, str], Tested], dict[str, dict[str, Any]]]:
    """Drift within each value of the ``segment_by`` columns (e.g. ``setting=home``).

    A shift confined to one device or care setting (a wearable's firmware offset) is diluted
    in the whole population; within its segment it is not. ``reference``/``current`` are
    the frames the overall tests ran on: one row per patient when ``drift.unit`` is
    ``patient`` (segments are then sized in patients), so the p-values stay honest. Returns
    every segment test, ``(feature, "setting=home") -> Tested``, and, per segment, its sizes,
    whether it was tested and what drifted in it.
    """
    out: dict[tuple[str, str], Tested] = {}
    info: dict[str, dict[str, Any]] = {}
    for col in config.segment_by:
        if col not in reference.columns or col not in current.columns:
            continue
        ref_v, cur_v = reference[col].astype(str), current[col].astype(str)
        for value in sorted((set(ref_v.unique()) | set(cur_v.unique())) - {"None", "nan"}):
            name = f"{col}={value}"
            rs, cs = reference[ref_v == value], current[cur_v == value]
            tested = min(len(rs), len(cs)) >= config.min_segment_units
            info[name] = {
                "reference_units": len(rs),
                "current_units": len(cs),
                "tested": tested,
                "drifted": [],
            }
            if not tested:
                continue
            seg_tests = {c: t for c, t in tests.items() if c != col}
            floor, _ = noise_floor(rs, cs, seg_tests, [], config)
            for c, tested_c in _tested(rs, cs, seg_tests, floor, config).items():
                out[(c, name)] = tested_c
                if tested_c.drifted:
                    info[name]["drifted"].append(c)
    return out, info


@dataclass(frozen=True)
class Tested:
    """One drift test as the verdict applies it: the score and the threshold it must pass.

    ``threshold`` is the configured one, raised to ``noise_margin`` x the noise floor for
    distance methods; the report's widget uses this very threshold, so widget and verdict
    agree by construction.
    """

    method: str
    score: float
    threshold: float
    drifted: bool

    def severity(self) -> float:
        """> 1 when drifted; comparable across methods for ranking."""
        if stattests.TESTS[self.method].p_value:
            return self.threshold / max(self.score, 1e-300)
        return self.score / max(self.threshold, 1e-300)


def _tested(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    tests: Mapping[str, tuple[str, float, str]],
    floor: Mapping[str, float],
    config: MonitorConfig,
) -> dict[str, Tested]:
    """Run ``tests`` and apply the noise floor to the distance methods' thresholds."""
    margin = config.drift.noise_margin
    out: dict[str, Tested] = {}
    for c, (score, _) in stattests.scores(reference, current, tests).items():
        method, threshold, _kind = tests[c]
        if method in DISTANCE_METHODS:
            threshold = max(threshold, margin * floor.get(c, 0.0))
        out[c] = Tested(method, score, threshold, stattests.TESTS[method].drifted(score, threshold))
    return out


# --------------------------------------------------------------------------- verdict
@dataclass
class MonitorResult:
    summary: dict[str, Any]
    snapshots: dict[str, Any]

    @property
    def verdict(self) -> str:
        return str(self.summary["verdict"])

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


def _describe(c: str, f: Mapping[str, Any]) -> str:
    parts = [f"{f['method']} {f['score']:.3g}"] if f["value_drift_overall"] else []
    parts += [f"{k}: {v:.3g}" for k, v in f.get("segments_drifted", {}).items()]
    return f"{c} ({'; '.join(parts)})"


def _fmt_list(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (
        f" and {len(items) - limit} more" if len(items) > limit else ""
    )


@dataclass
class DriftFrames:
    """The frames and tests of one evaluation: rows (quality) and tested units (drift)."""

    ref: pd.DataFrame  # rows, categories as text
    cur: pd.DataFrame
    ref_t: pd.DataFrame  # what the drift tests see: one row per patient, or the rows
    cur_t: pd.DataFrame
    by_patient: bool
    per_unit: dict[str, tuple[str, float, str]]  # column -> (method, threshold, kind)
    flat: dict[str, tuple[str, float, str]]  # tested over rows although per patient
    tests: dict[str, DriftTest]
    usable: list[str]
    dropped: list[str]
    has_pred: bool


def drift_frames(
    reference: pd.DataFrame,
    current: CurrentWindow,
    kinds: Mapping[str, ColumnKind],
    config: MonitorConfig,
    reference_units: pd.DataFrame | None = None,
) -> DriftFrames:
    """Prepare both sides once: categories as text, per patient if configured, the tests."""
    tests = dict(drift_tests(kinds, config))
    cur = _categories_as_text(current.sample, kinds)
    ref = _categories_as_text(reference, kinds)
    has_pred = (
        PREDICTION in ref.columns and PREDICTION in cur.columns and ref[PREDICTION].notna().any()
    )
    # a test needs at least one non-missing value per column on each side
    usable = [c for c in kinds if cur[c].notna().any() and ref[c].notna().any()]
    to_test = {
        c: (t.method, t.threshold, "num" if kinds[c] == "numerical" else "cat")
        for c, t in tests.items()
        if c in usable
    }
    pt = config.drift.prediction
    if has_pred:
        to_test[PREDICTION] = (pt.method, pt.threshold, "num")
    by_patient = (
        config.drift.unit == "patient"
        and "patient_id" in ref.columns
        and "patient_id" in cur.columns
        and bool(ref["patient_id"].notna().all())
        and bool(cur["patient_id"].notna().all())
    )
    ref_t, cur_t, flat = ref, cur, {}
    if by_patient:
        ref_t = reference_units if reference_units is not None else per_patient(ref, kinds)
        cur_t = per_patient(cur, kinds)
        # a flag becomes each patient's share of flagged rows: the numerical test applies
        # (unless the feature has its own test in per_feature)
        nt = config.drift.numerical
        for c, k in kinds.items():
            if k == "binary" and c in to_test and c not in config.drift.per_feature:
                to_test[c] = (nt.method, nt.threshold, "num")
                tests[c] = nt
        # a feature constant across the reference's patients (a score that is nearly always
        # 0) has no spread to norm a distance by at patient level: it is tested over rows
        flat = {
            c: t
            for c, t in to_test.items()
            if t[2] == "num" and t[0] in DISTANCE_METHODS and ref_t[c].nunique() <= 1
        }
    per_unit = {c: t for c, t in to_test.items() if c not in flat}
    dropped = [c for c in kinds if c not in usable]
    return DriftFrames(
        ref, cur, ref_t, cur_t, by_patient, per_unit, flat, tests, usable, dropped, has_pred
    )


@dataclass
class DriftFindings:
    overall: dict[str, Tested]
    segments: dict[tuple[str, str], Tested]
    segment_info: dict[str, dict[str, Any]]
    floor: dict[str, float]
    miss_floor: dict[str, float]

    def drifted_segments(self, c: str) -> dict[str, float]:
        return {seg: t.score for (col, seg), t in self.segments.items() if col == c and t.drifted}

    def value_drift(self, c: str) -> bool:
        return (c in self.overall and self.overall[c].drifted) or bool(self.drifted_segments(c))

    def severity(self, c: str) -> float:
        found = [self.overall[c].severity()] if c in self.overall else []
        found += [t.severity() for (col, _), t in self.segments.items() if col == c]
        return max(found, default=0.0)


def drift_findings(
    frames: DriftFrames,
    reference: pd.DataFrame,
    kinds: Mapping[str, ColumnKind],
    config: MonitorConfig,
) -> DriftFindings:
    """Every drift test of the window: overall, within each segment, and the noise floors."""
    f = frames
    rows = [] if f.by_patient else list(kinds)
    floor, miss_floor = noise_floor(f.ref_t, f.cur_t, f.per_unit, rows, config)
    overall = _tested(f.ref_t, f.cur_t, f.per_unit, floor, config)
    if f.by_patient:  # missing shares stay over rows, split by patient all the same
        # ``reference``, not its category-converted copy: the same missing pattern, and the
        # caller's frame keeps the split-half cache valid across runs
        flat_floor, miss_floor = noise_floor(reference, f.cur, f.flat, list(kinds), config)
        overall.update(_tested(f.ref, f.cur, f.flat, flat_floor, config))
        floor.update(flat_floor)
    segments, info = segment_drift(f.ref_t, f.cur_t, f.per_unit, config)
    return DriftFindings(overall, segments, info, floor, miss_floor)


def _report_widgets(
    frames: DriftFrames, found: DriftFindings, limit: int
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, tuple[str, float]], list[str], list[str]]:
    """The tested frames plus one column per shown segment test, and the widgets to show.

    Shown: the tests furthest past their threshold (drifted first), ``limit`` of them; a
    segment's test is the column ``"<feature> | setting=home"`` holding values only for that
    segment's units, which is what the segment test saw.
    """
    entries: list[tuple[tuple[str, str | None], Tested]] = [
        ((c, None), t) for c, t in found.overall.items() if c not in frames.flat
    ]
    entries += [((c, seg), t) for (c, seg), t in found.segments.items()]
    entries.sort(key=lambda e: e[1].severity(), reverse=True)
    ref, cur = frames.ref_t.copy(), frames.cur_t.copy()
    widgets: dict[str, tuple[str, float]] = {}
    numerical: list[str] = []
    categorical: list[str] = []
    for (c, seg), t in entries[:limit]:
        name = c if seg is None else f"{c} | {seg}"
        if seg is not None:
            col, value = seg.split("=", 1)
            ref[name] = ref[c].where(ref[col].astype(str) == value)
            cur[name] = cur[c].where(cur[col].astype(str) == value)
        widgets[name] = (t.method, t.threshold)
        kind = frames.per_unit.get(c, ("", 0.0, "num"))[2]
        if c != PREDICTION:
            (numerical if kind == "num" else categorical).append(name)
    return ref, cur, widgets, numerical, categorical


def _feature_table(
    reference: pd.DataFrame,
    current: CurrentWindow,
    kinds: Mapping[str, ColumnKind],
    codes: Mapping[str, str],
    frames: DriftFrames,
    found: DriftFindings,
    config: MonitorConfig,
) -> dict[str, dict[str, Any]]:
    """Per feature: its test, score, threshold applied, segments drifted, quality shares."""
    n_ref, n_cur = max(len(reference), 1), max(current.rows, 1)
    margin = config.drift.noise_margin
    out: dict[str, dict[str, Any]] = {}
    for c in kinds:
        t = frames.tests[c]
        o = found.overall.get(c)
        ref_miss = float(reference[c].isna().sum()) / n_ref
        cur_miss = current.missing.get(c, 0) / n_cur
        md = cur_miss - ref_miss > max(
            config.quality.max_missing_increase, margin * found.miss_floor.get(c, 0.0)
        )
        out[c] = {
            "kind": kinds[c],
            "code": codes.get(c),
            "method": t.method,
            "threshold": t.threshold,
            "score": None if o is None else o.score,
            "threshold_applied": None if o is None else o.threshold,
            "noise_floor": round(found.floor[c], 4) if c in found.floor else None,
            "tested_over": "rows" if c in frames.flat or not frames.by_patient else "patients",
            "segments_drifted": {
                k: float(f"{v:.4g}") for k, v in found.drifted_segments(c).items()
            },
            "value_drift_overall": bool(o is not None and o.drifted),
            "value_drift": found.value_drift(c),
            "missing_share_reference": round(ref_miss, 4),
            "missing_share_current": round(cur_miss, 4),
            "missing_drift": bool(md),
            "out_of_range_share": round(current.out_of_range[c] / n_cur, 4)
            if c in current.out_of_range
            else None,
            "new_category_share": round(current.new_category[c] / n_cur, 4)
            if c in current.new_category
            else None,
        }
    return out


class _Reasons:
    """Findings -> reasons with a level each; the verdict is the highest level."""

    def __init__(self) -> None:
        self.level = 0
        self.items: list[str] = []

    def flag(self, lvl: int, reason: str) -> None:
        self.level = max(self.level, lvl)
        self.items.append(f"[{VERDICTS[lvl]}] {reason}")

    def info(self, reason: str) -> None:
        self.items.append(f"[info] {reason}")


def _drift_reasons(
    r: _Reasons,
    per_feature: Mapping[str, Mapping[str, Any]],
    drifted: list[str],
    found: DriftFindings,
    frames: DriftFrames,
    config: MonitorConfig,
) -> dict[str, Any] | None:
    """Reasons from value, missingness and predicted-risk drift; returns the risk finding."""
    v = config.verdict
    n = len(per_feature)
    value = sorted((c for c in per_feature if per_feature[c]["value_drift"]), key=found.severity)
    value.reverse()
    missing = [c for c in per_feature if per_feature[c]["missing_drift"]]
    lvl = 1 if len(drifted) >= v.warn_drifted_features else 0
    if value:
        detail = [_describe(c, per_feature[c]) for c in value]
        r.flag(lvl, f"value drift in {len(value)} of {n} features: {_fmt_list(detail)}")
    if missing:
        detail = [
            f"{c} ({per_feature[c]['missing_share_reference']:.2f} -> "
            f"{per_feature[c]['missing_share_current']:.2f})"
            for c in missing
        ]
        r.flag(lvl, f"missing share up in {len(missing)} features: {_fmt_list(detail)}")
    share = len(drifted) / max(n, 1)
    if share >= v.retrain_drift_share:
        r.flag(2, f"drift share {share:.2f} >= retrain threshold {v.retrain_drift_share:.2f}")
    t = found.overall.get(PREDICTION)
    if not frames.has_pred or t is None:
        return None
    if t.drifted:
        both = v.retrain_on_prediction_drift and len(drifted) >= v.warn_drifted_features
        r.flag(2 if both else 1, f"predicted risk drifted ({t.method} {t.score:.3g})")
    return {
        "method": t.method,
        "threshold": config.drift.prediction.threshold,
        "threshold_applied": t.threshold,
        "score": t.score,
        "drift": t.drifted,
    }


def _quality_reasons(
    r: _Reasons,
    reference: pd.DataFrame,
    current: CurrentWindow,
    ranges: Mapping[str, tuple[float, float]],
    config: MonitorConfig,
) -> None:
    q, n_ref, n_cur = config.quality, max(len(reference), 1), max(current.rows, 1)
    for c, n in current.out_of_range.items():
        lo, hi = ranges[c]
        ref_v = reference[c].to_numpy(dtype=float)
        ref_share = float(np.count_nonzero((ref_v < lo) | (ref_v > hi))) / n_ref
        if n / n_cur - ref_share > q.max_out_of_range_share:
            r.flag(
                1,
                f"{c}: {n / n_cur:.1%} of values outside the plausible range [{lo:.4g}, {hi:.4g}] "
                f"({ref_share:.1%} in the reference)",
            )
    for c, n in current.new_category.items():
        if n / n_cur > q.max_new_category_share:
            r.flag(
                1,
                f"{c}: {n / n_cur:.1%} of rows have categories unseen in training: "
                f"{current.new_values[c]}",
            )


def _performance_reasons(r: _Reasons, perf: Mapping[str, Any], config: MonitorConfig) -> None:
    o, pc = perf["overall"], config.performance
    if not perf["evaluated"] or o["auroc"] is None:
        if o["n"]:
            r.info(
                f"performance not judged: {o['n']} labelled predictions with {o['positives']} "
                f"events (need {pc.min_labelled} and {pc.min_positives})"
            )
        return
    if o["auroc"] < pc.retrain_auroc:
        r.flag(
            2,
            f"AUROC {o['auroc']:.3f} < retrain floor {pc.retrain_auroc:.2f} on {o['n']} labelled predictions",
        )
    elif o["auroc"] < pc.warn_auroc:
        r.flag(
            1,
            f"AUROC {o['auroc']:.3f} < warn floor {pc.warn_auroc:.2f} on {o['n']} labelled predictions",
        )
    if o["ece"] is not None and o["ece"] > pc.max_calibration_error:
        r.flag(1, f"calibration error {o['ece']:.3f} > {pc.max_calibration_error:.2f}")


def _window(current: CurrentWindow) -> dict[str, Any]:
    return {
        "start": None if current.start is None else current.start.isoformat(),
        "end": None if current.end is None else current.end.isoformat(),
        "rows": current.window_rows if current.window_rows is not None else current.rows,
        "sampled_rows": len(current.sample),
        "quality_rows": current.rows,
        "quality_exact": current.rows == (current.window_rows or current.rows),
    }


def insufficient(
    current: CurrentWindow, units: int, unit: str, config: MonitorConfig, reference_units: int
) -> dict[str, Any]:
    """Summary of a window too small to test: no drift verdict either way."""
    need = config.min_units
    return {
        "verdict": "insufficient_data",
        "status": "insufficient_data",
        "exit_code": EXIT_CODES["insufficient_data"],
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "reasons": [
            f"[info] {units} {unit}s in the window ({current.window_rows or current.rows} "
            f"predictions); the drift and quality tests need at least {need} "
            "(monitor.min_units): no verdict on so little data"
        ],
        "drifted_features": [],
        "drift_unit": unit,
        "current_units": units,
        "reference_units": reference_units,
        "window": _window(current),
    }


def evaluate(
    reference: pd.DataFrame,
    current: CurrentWindow,
    kinds: Mapping[str, ColumnKind],
    codes: Mapping[str, str],
    ranges: Mapping[str, tuple[float, float]],
    ref_categories: Mapping[str, set[str]],
    config: MonitorConfig,
    labelled: pd.DataFrame | None = None,
    timestamp: datetime | None = None,
    tags: Iterable[str] = (),
    report: bool = True,
    reference_units: pd.DataFrame | None = None,
    alert_threshold: float | None = None,
) -> MonitorResult:
    """Findings -> reasons -> verdict, and the reports built from the same frames and tests.

    ``report=False`` skips the Evidently snapshots (the findings and verdict are the same):
    the benchmark's hundreds of resamples need the verdict only. ``reference_units``:
    ``patient_units(reference, kinds)`` computed once by a caller that reuses the reference.
    ``alert_threshold``: the served model's, for performance at the alerts clinicians get.
    """
    frames = drift_frames(reference, current, kinds, config, reference_units)
    unit = "patient" if frames.by_patient else "row"
    tags = list(tags)
    meta = {
        "window_start": str(current.start),
        "window_end": str(current.end),
        "rows": str(current.window_rows or current.rows),
    }
    if len(frames.cur_t) < config.min_units:
        too_few = insufficient(current, len(frames.cur_t), unit, config, len(frames.ref_t))
        snaps: dict[str, Any] = {"drift": None}
        if report:
            snaps["summary"] = er.summary_snapshot(
                _dashboard_values(too_few, -1), timestamp=timestamp, tags=tags, metadata=meta
            )
        return MonitorResult(summary=too_few, snapshots=snaps)
    found = drift_findings(frames, reference, kinds, config)
    per_feature = _feature_table(reference, current, kinds, codes, frames, found, config)
    drifted = [c for c, f in per_feature.items() if f["value_drift"] or f["missing_drift"]]
    drifted.sort(key=lambda c: _overall_severity(c, per_feature[c], found, config), reverse=True)
    reasons = _Reasons()
    pred = _drift_reasons(reasons, per_feature, drifted, found, frames, config)
    _quality_reasons(reasons, reference, current, ranges, config)
    if frames.dropped:
        reasons.info(f"not assessed (no values on one side): {_fmt_list(frames.dropped)}")
    if current.columns_absent:
        reasons.info(f"features not in the prediction log: {_fmt_list(current.columns_absent)}")
    perf: dict[str, Any] = {"evaluated": False}
    if labelled is not None and len(labelled):
        perf = performance(labelled, config, alert_threshold)
        _performance_reasons(reasons, perf, config)
    if not reasons.items:
        reasons.items.append("[ok] no drift, quality or performance finding above its threshold")
    verdict = VERDICTS[reasons.level]
    signals: dict[str, int] = {}
    for c in drifted:
        if codes.get(c):
            signals[codes[c]] = signals.get(codes[c], 0) + 1
    risk_mean = current.probability_sum / current.probability_n if current.probability_n else None
    summary: dict[str, Any] = {
        "verdict": verdict,
        "status": "monitored",
        "exit_code": EXIT_CODES[verdict],
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "reasons": reasons.items,
        "drifted_features": drifted,
        "drifted_signals": dict(sorted(signals.items(), key=lambda kv: -kv[1])),
        "drift_share": round(len(drifted) / max(len(kinds), 1), 4),
        "monitored_features": len(kinds),
        "drift_unit": unit,
        "current_units": len(frames.cur_t),
        "reference_units": len(frames.ref_t),
        "segments": found.segment_info,
        "window": _window(current),
        "reference_rows": len(reference),
        "predicted_risk": {
            "mean_current": risk_mean,
            "drift": None
            if pred is None
            else {**pred, "mean_reference": float(reference[PREDICTION].mean())},
        },
        "performance": perf,
        "features": per_feature,
    }
    snapshots: dict[str, Any] = {"drift": None}
    if report:
        snapshots = _snapshots(
            frames, found, summary, labelled, alert_threshold, config, timestamp, tags, meta
        )
    return MonitorResult(summary=summary, snapshots=snapshots)


def _overall_severity(
    c: str, f: Mapping[str, Any], found: DriftFindings, config: MonitorConfig
) -> float:
    """Value or missingness, whichever is further past its bar (the order reasons list)."""
    rise = f["missing_share_current"] - f["missing_share_reference"]
    return max(found.severity(c), rise / max(config.quality.max_missing_increase, 1e-9))


def _dashboard_values(summary: Mapping[str, Any], level: int) -> dict[str, float]:
    values = {
        "drift_share_percent": 100.0 * float(summary.get("drift_share") or 0.0),
        "drifted_features": float(len(summary.get("drifted_features") or [])),
        "verdict_level": float(level),
    }
    risk = (summary.get("predicted_risk") or {}).get("mean_current")
    if risk is not None:
        values["predicted_risk_mean"] = float(risk)
    perf = summary.get("performance") or {}
    if perf.get("evaluated") and perf["overall"]["auroc"] is not None:
        values["auroc"] = float(perf["overall"]["auroc"])
    return values


def _snapshots(
    frames: DriftFrames,
    found: DriftFindings,
    summary: dict[str, Any],
    labelled: pd.DataFrame | None,
    alert_threshold: float | None,
    config: MonitorConfig,
    timestamp: datetime | None,
    tags: list[str],
    meta: dict[str, str],
) -> dict[str, Any]:
    """Evidently snapshots: drift widgets of the verdict's tests, performance, the summary."""
    ref, cur, widgets, numerical, categorical = _report_widgets(
        frames, found, config.report_columns
    )
    summary["report_widgets"] = {
        name: {"method": m, "threshold": t, "drifted": _widget_drifted(name, found)}
        for name, (m, t) in widgets.items()
    }
    out: dict[str, Any] = {
        "drift": er.drift_report(
            ref,
            cur,
            numerical=numerical,
            categorical=categorical,
            widgets=widgets,
            prediction=PREDICTION if PREDICTION in widgets else None,
            timestamp=timestamp,
            tags=tags,
            metadata=meta,
        )
    }
    o = summary["performance"].get("overall") or {}
    if labelled is not None and o.get("positives") and 0 < o["positives"] < o["n"]:
        out["performance"] = er.performance_report(
            labelled, threshold=alert_threshold, timestamp=timestamp, tags=tags, metadata=meta
        )
    verdict = summary["verdict"]
    out["summary"] = er.summary_snapshot(
        _dashboard_values(summary, VERDICTS.index(verdict)),
        timestamp=timestamp,
        tags=[f"verdict:{verdict}", *tags],
        metadata={**meta, "verdict": verdict},
    )
    return out


def _widget_drifted(name: str, found: DriftFindings) -> bool:
    col, _, seg = name.partition(" | ")
    t = found.segments.get((col, seg)) if seg else found.overall.get(col)
    return bool(t is not None and t.drifted)


def reference_categories(
    reference: pd.DataFrame, kinds: Mapping[str, ColumnKind]
) -> dict[str, set[str]]:
    return {
        c: set(reference[c].dropna().astype(str).unique())
        for c, k in kinds.items()
        if k == "categorical"
    }


def monitor_log(
    features: pd.DataFrame,
    log_path: str,
    config: MonitorConfig,
    vocab: Vocabulary,
    dictionary: Mapping[str, Any] | None = None,
    window_end: datetime | None = None,
    timestamp: datetime | None = None,
    tags: Iterable[str] = (),
    alert_threshold: float | None = None,
) -> MonitorResult:
    """Reference = sampled training features; current = the log window (read in chunks)."""
    from monitoring import prediction_log as plog

    reference = sample_reference(features, config)
    kinds = column_kinds(reference, config.exclude)
    plog.ensure_monitor_index(log_path)
    window = plog.find_window(log_path, config.window_days, config.role, end=window_end)
    if window.rows == 0:
        raise ValueError(
            f"{log_path}: no {config.role!r} predictions in the {config.window_days:g}-day window"
        )
    logged = plog.logged_feature_names(log_path, config.role)
    absent = sorted(c for c in kinds if c not in logged)
    kinds = {c: k for c, k in kinds.items() if c in logged}
    if not kinds:
        raise ValueError(f"{log_path}: the logged features share no column with the reference")
    codes = feature_codes(kinds, vocab, dictionary)
    ranges = vocabulary_ranges(codes, vocab, config.quality.range_stats)
    cats = reference_categories(reference, kinds)
    schema = {c: ("str" if k == "categorical" else "float") for c, k in kinds.items()}
    if config.exact_quality:
        chunks = plog.iter_window(log_path, window, config.role, schema, config.chunk_rows)
        expected = window.rows
    else:
        chunks = plog.sample_window(
            log_path,
            window,
            config.role,
            schema,
            config.current_size,
            config.seed,
            config.chunk_rows,
            by_patient=config.drift.unit == "patient",
        )
        expected = min(window.rows, config.current_size)
    current = collect_current(chunks, expected, kinds, ranges, cats, config)
    current.start, current.end, current.columns_absent = window.start, window.end, absent
    current.window_rows = window.rows
    current.probability_sum, current.probability_n = plog.window_risk(log_path, window, config.role)
    labelled = plog.read_labelled(log_path, window, config.role)
    logger.info(
        "monitoring %d logged predictions (%d sampled) against %d reference rows, %d features",
        current.rows,
        len(current.sample),
        len(reference),
        len(kinds),
    )
    return evaluate(
        reference,
        current,
        kinds,
        codes,
        ranges,
        cats,
        config,
        labelled=labelled,
        timestamp=timestamp or window.end.floor("s").to_pydatetime(),
        tags=tags,
        alert_threshold=alert_threshold,
    )


class FrameMonitor:
    """A reference feature frame prepared once, to monitor in-memory feature frames against.

    For callers that hold the current rows themselves (tests, benchmarks, a scheduler that
    compares many windows with one reference): the steps of :func:`monitor_log` without the
    prediction log. The per-patient reference is computed on first use and kept.
    """

    def __init__(self, reference: pd.DataFrame, config: MonitorConfig, vocab: Vocabulary) -> None:
        self.reference = reference
        self.config = config
        self.kinds = column_kinds(reference, config.exclude)
        self.codes = feature_codes(self.kinds, vocab)
        self.ranges = vocabulary_ranges(self.codes, vocab, config.quality.range_stats)
        self.cats = reference_categories(reference, self.kinds)
        self._units: pd.DataFrame | None = None

    def evaluate(self, current: pd.DataFrame, report: bool = False) -> MonitorResult:
        cw = collect_current(
            [current], len(current), self.kinds, self.ranges, self.cats, self.config
        )
        if (
            self._units is None
            and self.config.drift.unit == "patient"
            and "patient_id" in self.reference.columns
        ):
            self._units = patient_units(self.reference, self.kinds)
        return evaluate(
            self.reference,
            cw,
            self.kinds,
            self.codes,
            self.ranges,
            self.cats,
            self.config,
            report=report,
            reference_units=self._units,
        )
