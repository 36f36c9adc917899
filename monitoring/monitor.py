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
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from core.vocabulary import Vocabulary
from monitoring import evidently_reports as er
from monitoring.config import DISTANCE_METHODS, DriftTest, MonitorConfig

logger = logging.getLogger(__name__)

ColumnKind = Literal["numerical", "binary", "categorical"]
VERDICTS = ("ok", "warn", "retrain")
#: exit codes a scheduler can act on (2 stays "bad input", 1 an unexpected crash)
EXIT_CODES = {"ok": 0, "warn": 10, "retrain": 20}
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
            lo, hi = vocab.codes[code].range
            out[col] = (float(lo), float(hi))
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
        for c, (score, _) in er.stat_test_scores(reference[mask], reference[~mask], tests).items():
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
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Drift within each value of the ``segment_by`` columns (e.g. ``setting=home``).

    A shift confined to one device or care setting (a wearable's firmware offset) is diluted
    in the whole population; within its segment it is not. ``reference``/``current`` are
    the frames the overall tests ran on: one row per patient when ``drift.unit`` is
    ``patient`` (segments are then sized in patients), so the p-values stay honest. Returns
    ``feature -> {"setting=home": score}`` for the drifted features and, per segment, its
    sizes, whether it was tested and what drifted in it.
    """
    out: dict[str, dict[str, float]] = {}
    info: dict[str, dict[str, Any]] = {}
    margin = config.drift.noise_margin
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
            for c, (score, drifted) in er.stat_test_scores(rs, cs, seg_tests).items():
                if drifted and score >= margin * floor.get(c, 0.0):
                    out.setdefault(c, {})[name] = score
                    info[name]["drifted"].append(c)
    return out, info


# --------------------------------------------------------------------------- performance
def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(float(y[m].mean()) - float(p[m].mean()))
    return total / max(len(y), 1)


def _perf(y: np.ndarray, p: np.ndarray) -> dict[str, float | int | None]:
    both = 0 < y.sum() < len(y)
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "auroc": float(roc_auc_score(y, p)) if both else None,
        "auprc": float(average_precision_score(y, p)) if both else None,
        "brier": float(brier_score_loss(y, p)) if len(y) else None,
        "ece": expected_calibration_error(y, p) if len(y) else None,
        "observed_rate": float(y.mean()) if len(y) else None,
        "mean_predicted": float(p.mean()) if len(y) else None,
    }


def performance(labelled: pd.DataFrame, config: MonitorConfig) -> dict[str, Any]:
    """Overall and per-period AUROC, AUPRC, Brier, calibration of fed-back outcomes."""
    y = labelled["label"].to_numpy(dtype=int)
    p = labelled[PREDICTION].to_numpy(dtype=float)
    overall = _perf(y, p)
    by_period = []
    if len(labelled):
        period = labelled["scored_at"].dt.floor(config.performance.period)
        for start, grp in labelled.groupby(period):
            row = _perf(grp["label"].to_numpy(dtype=int), grp[PREDICTION].to_numpy(dtype=float))
            by_period.append({"period_start": pd.Timestamp(start).isoformat(), **row})
    enough = (
        overall["n"] >= config.performance.min_labelled  # type: ignore[operator]
        and overall["positives"] >= config.performance.min_positives  # type: ignore[operator]
    )
    return {"evaluated": bool(enough), "overall": overall, "over_time": by_period}


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
    parts = [f"{f['method']} {f['score']:.3g}"] if f["score"] is not None else []
    parts += [f"{k}: {v:.3g}" for k, v in f.get("segments_drifted", {}).items()]
    return f"{c} ({'; '.join(parts)})"


def _fmt_list(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (
        f" and {len(items) - limit} more" if len(items) > limit else ""
    )


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
) -> MonitorResult:
    """Run the Evidently report(s) and turn the findings into a verdict with reasons.

    ``report=False`` skips the Evidently snapshots (the findings and verdict are the same):
    the benchmark's hundreds of resamples need the verdict only. ``reference_units``:
    ``patient_units(reference, kinds)`` computed once by a caller that reuses the reference.
    """
    row_tests = drift_tests(kinds, config)
    tests = dict(row_tests)  # per patient, flags get the numerical test below
    numerical = [c for c, k in kinds.items() if k == "numerical"]
    categorical = [c for c, k in kinds.items() if k != "numerical"]
    cur = _categories_as_text(current.sample, kinds)
    ref = _categories_as_text(reference, kinds)
    has_pred = (
        PREDICTION in ref.columns and PREDICTION in cur.columns and ref[PREDICTION].notna().any()
    )
    # Evidently needs at least one non-missing value per column on each side
    usable = [c for c in kinds if cur[c].notna().any() and ref[c].notna().any()]
    dropped = [c for c in kinds if c not in usable]
    tags = list(tags)
    meta = {
        "window_start": str(current.start),
        "window_end": str(current.end),
        "rows": str(current.window_rows or current.rows),
    }
    pt = config.drift.prediction
    to_test = {
        c: (t.method, t.threshold, "num" if kinds[c] == "numerical" else "cat")
        for c, t in tests.items()
        if c in usable
    }
    if has_pred:
        to_test[PREDICTION] = (pt.method, pt.threshold, "num")
    by_patient = (
        config.drift.unit == "patient"
        and "patient_id" in ref.columns
        and "patient_id" in cur.columns
        and ref["patient_id"].notna().all()
        and cur["patient_id"].notna().all()
    )
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
    else:
        ref_t, cur_t = ref, cur
    # a feature constant across the reference's patients (a score that is nearly always 0)
    # has no spread to norm a distance by at patient level: it is tested over rows instead
    flat = (
        {
            c: t
            for c, t in to_test.items()
            if t[2] == "num" and t[0] in DISTANCE_METHODS and ref_t[c].nunique() <= 1
        }
        if by_patient
        else {}
    )
    per_unit = {c: t for c, t in to_test.items() if c not in flat}
    results = er.stat_test_scores(ref_t, cur_t, per_unit)
    floor, miss_floor = noise_floor(
        ref_t, cur_t, per_unit, [] if by_patient else list(kinds), config
    )
    if by_patient:  # missing shares stay over rows, split by patient all the same
        # ``reference``, not its category-converted copy: the same missing pattern, and the
        # caller's frame keeps the split-half cache valid across runs
        flat_floor, miss_floor = noise_floor(reference, cur, flat, list(kinds), config)
        results.update(er.stat_test_scores(ref, cur, flat))
        floor.update(flat_floor)
    scores = {c: r[0] for c, r in results.items()}
    margin = config.drift.noise_margin
    # drifted: past the configured threshold (Evidently's verdict) AND past the noise floor
    flags = {c: r[1] and r[0] >= margin * floor.get(c, 0.0) for c, r in results.items()}
    segments, segment_info = segment_drift(ref_t, cur_t, to_test, config)
    for c in segments:
        flags[c] = True

    def severity(c: str) -> float:
        t = tests.get(c, pt)
        overall = t.severity(scores[c]) if c in scores else 0.0
        return max([overall, *(t.severity(x) for x in segments.get(c, {}).values())])

    shown = sorted((c for c in kinds if c in scores), key=severity, reverse=True)
    shown = shown[: config.report_columns]
    snap = (
        None
        if not report
        else er.drift_report(
            ref,
            cur,
            numerical=[c for c in numerical if c in usable],
            categorical=[c for c in categorical if c in usable],
            # the report's widgets test rows: each column type keeps its configured test
            tests={c: (row_tests[c].method, row_tests[c].threshold) for c in shown},
            ranges={c: r for c, r in ranges.items() if c in usable and kinds[c] == "numerical"},
            categories={
                c: sorted(ref_categories.get(c, set()))
                for c in categorical
                if c in usable and kinds[c] == "categorical"
            },
            prediction=PREDICTION if has_pred else None,
            prediction_test=(pt.method, pt.threshold),
            timestamp=timestamp,
            tags=tags,
            metadata=meta,
        )
    )

    per_feature: dict[str, dict[str, Any]] = {}
    value_drifted: list[str] = []
    missing_drifted: list[str] = []
    n_ref = max(len(reference), 1)
    n_cur = max(current.rows, 1)
    for c in kinds:
        t = tests[c]
        score = scores.get(c)
        ref_miss = float(reference[c].isna().sum()) / n_ref
        cur_miss = current.missing.get(c, 0) / n_cur
        vd = flags.get(c, False)
        md = cur_miss - ref_miss > max(
            config.quality.max_missing_increase, margin * miss_floor.get(c, 0.0)
        )
        per_feature[c] = {
            "kind": kinds[c],
            "code": codes.get(c),
            "method": t.method,
            "threshold": t.threshold,
            "score": score,
            "noise_floor": round(floor[c], 4) if c in floor else None,
            "segments_drifted": {k: float(f"{v:.4g}") for k, v in segments.get(c, {}).items()},
            "value_drift": bool(vd),
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
        if vd:
            value_drifted.append(c)
        if md:
            missing_drifted.append(c)

    def overall(c: str) -> float:  # value or missingness, whichever is further past its bar
        f = per_feature[c]
        rise = f["missing_share_current"] - f["missing_share_reference"]
        return max(severity(c), rise / max(config.quality.max_missing_increase, 1e-9))

    drifted = sorted(set(value_drifted) | set(missing_drifted), key=overall, reverse=True)
    value_drifted.sort(key=severity, reverse=True)
    share = len(drifted) / max(len(kinds), 1)

    level = 0
    reasons: list[str] = []

    def flag(lvl: int, reason: str) -> None:
        nonlocal level
        level = max(level, lvl)
        reasons.append(f"[{VERDICTS[lvl]}] {reason}")

    v = config.verdict
    if value_drifted:
        detail = [_describe(c, per_feature[c]) for c in value_drifted]
        flag(
            1 if len(drifted) >= v.warn_drifted_features else 0,
            f"value drift in {len(value_drifted)} of {len(kinds)} features: {_fmt_list(detail)}",
        )
    if missing_drifted:
        detail = [
            f"{c} ({per_feature[c]['missing_share_reference']:.2f} -> {per_feature[c]['missing_share_current']:.2f})"
            for c in missing_drifted
        ]
        flag(
            1 if len(drifted) >= v.warn_drifted_features else 0,
            f"missing share up in {len(missing_drifted)} features: {_fmt_list(detail)}",
        )
    signals: dict[str, int] = {}
    for c in drifted:
        if codes.get(c):
            signals[codes[c]] = signals.get(codes[c], 0) + 1
    if share >= v.retrain_drift_share:
        flag(2, f"drift share {share:.2f} >= retrain threshold {v.retrain_drift_share:.2f}")
    pred = None
    if has_pred and PREDICTION in scores:
        pd_flag = flags[PREDICTION]
        pred = {
            "method": pt.method,
            "threshold": pt.threshold,
            "score": scores[PREDICTION],
            "drift": bool(pd_flag),
            "mean_reference": float(reference[PREDICTION].mean()),
        }
        if pd_flag:
            both = v.retrain_on_prediction_drift and len(drifted) >= v.warn_drifted_features
            flag(2 if both else 1, f"predicted risk drifted ({pt.method} {scores[PREDICTION]:.3g})")
    risk_mean = current.probability_sum / current.probability_n if current.probability_n else None
    q = config.quality
    for c, n in current.out_of_range.items():
        lo, hi = ranges[c]
        ref_v = reference[c].to_numpy(dtype=float)
        ref_share = float(np.count_nonzero((ref_v < lo) | (ref_v > hi))) / n_ref
        if n / n_cur - ref_share > q.max_out_of_range_share:
            flag(
                1,
                f"{c}: {n / n_cur:.1%} of values outside the plausible range [{lo:g}, {hi:g}] "
                f"({ref_share:.1%} in the reference)",
            )
    for c, n in current.new_category.items():
        if n / n_cur > q.max_new_category_share:
            flag(
                1,
                f"{c}: {n / n_cur:.1%} of rows have categories unseen in training: {current.new_values[c]}",
            )
    if dropped:
        reasons.append(f"[info] not assessed (no values on one side): {_fmt_list(dropped)}")
    if current.columns_absent:
        reasons.append(
            f"[info] features not in the prediction log: {_fmt_list(current.columns_absent)}"
        )

    perf: dict[str, Any] = {"evaluated": False}
    snapshots: dict[str, Any] = {"drift": snap}
    if labelled is not None and len(labelled):
        perf = performance(labelled, config)
        o = perf["overall"]
        pc = config.performance
        if perf["evaluated"] and o["auroc"] is not None:
            if o["auroc"] < pc.retrain_auroc:
                flag(
                    2,
                    f"AUROC {o['auroc']:.3f} < retrain floor {pc.retrain_auroc:.2f} on {o['n']} labelled predictions",
                )
            elif o["auroc"] < pc.warn_auroc:
                flag(
                    1,
                    f"AUROC {o['auroc']:.3f} < warn floor {pc.warn_auroc:.2f} on {o['n']} labelled predictions",
                )
            if o["ece"] is not None and o["ece"] > pc.max_calibration_error:
                flag(1, f"calibration error {o['ece']:.3f} > {pc.max_calibration_error:.2f}")
        if report and o["positives"] and 0 < o["positives"] < o["n"]:
            snapshots["performance"] = er.performance_report(
                labelled, timestamp=timestamp, tags=tags, metadata=meta
            )

    verdict = VERDICTS[level]
    if not reasons:
        reasons.append("[ok] no drift, quality or performance finding above its threshold")
    summary: dict[str, Any] = {
        "verdict": verdict,
        "status": "monitored",
        "exit_code": EXIT_CODES[verdict],
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "reasons": reasons,
        "drifted_features": drifted,
        "drifted_signals": dict(sorted(signals.items(), key=lambda kv: -kv[1])),
        "drift_share": round(share, 4),
        "monitored_features": len(kinds),
        "drift_unit": "patient" if by_patient else "row",
        "segments": segment_info,
        "window": {
            "start": None if current.start is None else current.start.isoformat(),
            "end": None if current.end is None else current.end.isoformat(),
            "rows": current.window_rows if current.window_rows is not None else current.rows,
            "sampled_rows": len(current.sample),
            "quality_rows": current.rows,
            "quality_exact": current.rows == (current.window_rows or current.rows),
        },
        "reference_rows": len(reference),
        "predicted_risk": {"mean_current": risk_mean, "drift": pred},
        "performance": perf,
        "features": per_feature,
    }
    values = {
        "drift_share": share,
        "drifted_features": float(len(drifted)),
        "verdict_level": float(level),
    }
    if risk_mean is not None:
        values["predicted_risk_mean"] = risk_mean
    if perf.get("evaluated") and perf["overall"]["auroc"] is not None:
        values["auroc"] = perf["overall"]["auroc"]
    if report:
        snapshots["summary"] = er.summary_snapshot(
            values,
            timestamp=timestamp,
            tags=[f"verdict:{verdict}", *tags],
            metadata={**meta, "verdict": verdict},
        )
    return MonitorResult(summary=summary, snapshots=snapshots)


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
