"""The one feature entry point for training and serving.

``compute_features`` turns long observations into one row of point-in-time features per
(patient, prediction time); batch training, the Dask backend and the one-patient helper
``features_for_patient`` call it. Underneath it, ``features_from_arrays`` takes plain arrays
(:class:`FeatureInputs`): the service calls that directly and skips building DataFrames;
``compute_features`` is ``feature_inputs`` (frames -> arrays) followed by it, so training and
serving cannot drift apart.

What the features are is the feature families' business (``features/families/``, one module
each, registered in one list): their specs make the dictionary, their requests make one
:class:`~features.plan.Plan`, and their combine steps turn a bank into features. This module
prepares the arrays, cuts them into chunks of whole patients and runs an executor
(``features/executors.py``) per chunk: the stacked one for a few queries (serving), the
per-code one for large inputs. Both give the same bits.

Only observations at or before the prediction time, and within ``lookback_hours`` of it, are
used. Which features exist is fixed by the config, the vocabulary and the static covariate
list, never by which data happen to be present: a code with no observations yields NaN
columns, so training and serving see the same columns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from features.config import FeaturesConfig
from features.executors import TimeKeys, per_code_bank, stacked_bank
from features.families import registered_families
from features.families.static import static_columns
from features.labels import HOUR_NS, _ns, label_times, prediction_times, prevalence_by_setting
from features.plan import Context, Family, FeatureSpec, Plan, build_plan

__all__ = ["FeatureSpec", "static_columns"]

log = logging.getLogger(__name__)

ID_COLUMNS = ["patient_id", "time", "setting"]
#: integer time resolution of the search keys: nanoseconds (exact), coarser only when one
#: patient's time range exceeds ~70 years
_UNITS_NS = (1, 1_000, 1_000_000, 1_000_000_000)
_KEY_LIMIT = 1 << 62


def feature_codes(config: FeaturesConfig, vocab: Vocabulary) -> list[str]:
    if config.codes == "all":
        return list(vocab.codes)
    unknown = [c for c in config.codes if c not in vocab.codes]
    if unknown:
        raise ValueError(f"features.codes: {unknown} not in the vocabulary")
    return list(config.codes)


def input_codes(config: FeaturesConfig, vocab: Vocabulary) -> list[str]:
    """Vocabulary keys whose observations the features use (feature codes + the families'
    extra codes, e.g. the NEWS2 parameters), sorted."""
    extra: set[str] = set()
    for fam in registered_families():
        extra |= fam.input_codes(config, vocab)
    return sorted(set(feature_codes(config, vocab)) | extra)


@dataclass(frozen=True)
class _Prepared:
    """Everything that depends only on config, vocabulary, patient fields and families."""

    ctx: Context
    families: tuple[Family, ...]
    specs: tuple[FeatureSpec, ...]
    names: tuple[str, ...]
    col_of: Mapping[str, int]
    plan: Plan


#: _Prepared by (config JSON, vocabulary entries used, patient fields, families): rebuilding it
#: per call would be a large share of a one-patient call
_PREPARED: dict[tuple[Any, ...], _Prepared] = {}
_PREPARED_MAX = 64


#: the last lookups by object identity (config, vocabulary, fields, families): serving calls
#: with the same objects every time, and the JSON key below costs ~70 µs per call
_LAST: dict[tuple[int, int, tuple[str, ...], tuple[int, ...]], tuple[Any, Any, _Prepared]] = {}


def _prepared(config: FeaturesConfig, vocab: Vocabulary, fields: Iterable[str]) -> _Prepared:
    families = tuple(registered_families())
    fields = tuple(fields)
    fast = (id(config), id(vocab), fields, tuple(id(f) for f in families))
    seen = _LAST.get(fast)
    if seen is not None and seen[0] is config and seen[1] is vocab:
        return seen[2]
    key = (
        config.model_dump_json(),
        tuple((c, s.display, s.unit, s.group, s.kind) for c, s in vocab.codes.items()),
        fields,
        tuple(id(f) for f in families),
    )
    hit = _PREPARED.get(key)
    if hit is None:
        ctx = Context(
            config=config,
            vocab=vocab,
            fcodes=tuple(feature_codes(config, vocab)),
            all_codes=tuple(input_codes(config, vocab)),
            patient_fields=fields,
        )
        active = [f for f in families if f.active(ctx)]
        specs = [s for c in ctx.fcodes for f in active for s in f.code_specs(ctx, c)]
        specs += [s for f in active for s in f.specs(ctx)]
        names = tuple(s.name for s in specs)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"feature name clash: {dup}")
        col_of = {n: i for i, n in enumerate(names)}
        hit = _Prepared(
            ctx=ctx,
            families=families,
            specs=tuple(specs),
            names=names,
            col_of=col_of,
            plan=build_plan(ctx, active, col_of, len(names)),
        )
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.clear()
        _PREPARED[key] = hit
    if len(_LAST) >= _PREPARED_MAX:
        _LAST.clear()
    _LAST[fast] = (config, vocab, hit)  # holds the objects: their ids stay theirs
    return hit


def feature_specs(
    config: FeaturesConfig, vocab: Vocabulary, static_cols: list[str]
) -> list[FeatureSpec]:
    """Every feature column, in output order, with its dictionary entry (cached)."""
    return list(_prepared(config, vocab, static_cols).specs)


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
    q = query_inputs(patients, times, config, vocab)
    all_codes = list(q.codes)
    cdtype = np.int8 if len(all_codes) < 127 else np.int16
    if len(q.patient_ids) and len(observations):
        q.obs_patient = _category_index(observations["patient_id"], q.patient_ids)
        q.obs_code = _category_index(
            observations["code"], np.array(all_codes, dtype=object), cdtype
        )
        q.obs_time_ns = _ns(observations["time"])
        q.obs_value = observations["value"].to_numpy(dtype=np.float64)
    return q


def query_inputs(
    patients: pd.DataFrame, times: pd.DataFrame, config: FeaturesConfig, vocab: Vocabulary
) -> FeatureInputs:
    """:func:`feature_inputs` without observations: the patients, their queries and fields
    (the streaming stage adds each chunk's observation rows to these)."""
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
    prep = _prepared(config, vocab, [str(c) for c in patients.columns])
    keep = ["setting", *(f for fam, _, _ in prep.plan.parts for f in fam.patient_fields(prep.ctx))]
    return FeatureInputs(
        patient_ids=pids,
        obs_patient=np.zeros(0, dtype=np.int32),
        obs_code=np.zeros(0, dtype=cdtype),
        codes=all_codes,
        obs_time_ns=np.zeros(0, dtype=np.int64),
        obs_value=np.zeros(0),
        query_patient=codes_.astype(np.int64),
        query_time_ns=_ns(times["time"]),
        patient_columns=_patient_columns(patients, pids, keep),
    )


#: a chunk takes the stacked executor up to this many queries ...
_SMALL_QUERIES = 64
#: ... and this many observation rows
_SMALL_OBS = 1 << 15


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
    prep = _prepared(config, vocab, pcols.keys())
    plan = prep.plan
    qp, qt = _distinct_queries(inputs)
    m = len(qt)
    rows = _patient_rows(inputs, list(prep.ctx.all_codes), n_pat, qp, qt)
    keys, origin = _time_keys(config, rows.lo_t, rows.hi_t, n_pat, qp, qt)
    max_pat = max(1, _KEY_LIMIT // keys.span - 1)

    # -- chunks of whole patients, processed on threads ----------------------------------------
    cum = rows.starts[1:]
    cuts = [0]
    while cuts[-1] < n_pat:
        target = (cum[cuts[-1] - 1] if cuts[-1] else 0) + CHUNK_OBSERVATIONS
        nxt = max(cuts[-1] + 1, min(int(np.searchsorted(cum, target, "right")), n_pat))
        cuts.append(min(nxt, cuts[-1] + max_pat))
    p_bounds = rows.starts[cuts]
    q_bounds = np.searchsorted(qp, cuts)
    per_patient = {fam.name: fam.per_patient(prep.ctx, pcols, n_pat) for fam, _, _ in plan.parts}

    out = np.empty((len(prep.specs), m), dtype=np.dtype(config.dtype))
    out[plan.unwritten] = np.nan
    t_max = int(qt.max()) if m else 0

    def run_chunk(k: int) -> None:
        p_lo, p_hi = cuts[k], cuts[k + 1]
        o_lo, o_hi = p_bounds[k], p_bounds[k + 1]
        q_lo, q_hi = q_bounds[k], q_bounds[k + 1]
        if q_hi == q_lo:
            return
        args = (
            plan,
            keys,
            origin[p_lo:p_hi],
            rows.p[o_lo:o_hi].astype(np.int64) - p_lo,
            rows.c[o_lo:o_hi],
            rows.t[o_lo:o_hi],
            rows.v[o_lo:o_hi],
            p_hi - p_lo,
            qp[q_lo:q_hi] - p_lo,
            qt[q_lo:q_hi],
        )
        if (
            q_hi - q_lo <= _SMALL_QUERIES
            and o_hi - o_lo <= _SMALL_OBS
            and plan.n_codes * (p_hi - p_lo) <= max_pat
        ):
            bank = stacked_bank(*_usable(*args, t_max))
        else:
            bank = per_code_bank(*args, t_max=t_max)
        bank.patient_index = qp[q_lo:q_hi]
        bank.patient = per_patient
        for fam, part, cols in plan.parts:
            if len(cols):
                out[cols, q_lo:q_hi] = fam.combine(part, bank)

    n_chunks = len(cuts) - 1
    n_threads = min(config.threads or os.cpu_count() or 1, n_chunks) if n_chunks > 1 else 1
    if n_threads > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(run_chunk, range(n_chunks)))
    else:
        for k in range(n_chunks):
            run_chunk(k)

    setting = (
        np.asarray(pcols["setting"], dtype=object)
        if "setting" in pcols
        else np.full(n_pat, None, dtype=object)
    )
    return FeatureArrays(
        names=list(prep.names),
        values=out,
        patient_id=pids[qp].astype(object),
        time_ns=qt,
        setting=setting[qp] if m else np.array([], dtype=object),
    )


def _distinct_queries(inputs: FeatureInputs) -> tuple[np.ndarray, np.ndarray]:
    """Queries as distinct (patient, time), sorted by both."""
    qp_all = np.asarray(inputs.query_patient, dtype=np.int64)
    qt_all = np.asarray(inputs.query_time_ns, dtype=np.int64)
    order = np.lexsort((qt_all, qp_all))
    qp, qt = qp_all[order], qt_all[order]
    if len(qp) > 1:
        new = np.ones(len(qp), dtype=bool)
        new[1:] = (qp[1:] != qp[:-1]) | (qt[1:] != qt[:-1])
        qp, qt = qp[new], qt[new]
    return qp, qt


@dataclass
class _Rows:
    """Observation rows grouped by patient: ``starts`` (n_pat + 1) bound each patient's rows;
    ``lo_t``/``hi_t`` are the first/last time of each patient's usable rows."""

    p: np.ndarray
    c: np.ndarray
    t: np.ndarray
    v: np.ndarray
    starts: np.ndarray
    lo_t: np.ndarray
    hi_t: np.ndarray


def _patient_rows(
    inputs: FeatureInputs, all_codes: list[str], n_pat: int, qp: np.ndarray, qt: np.ndarray
) -> _Rows:
    """The rows, with codes as indices into ``all_codes``, grouped by patient.

    Rows stay as given (no copy) when they already are grouped by patient (the observations
    contract sorts by patient); the executors skip unusable rows (unknown code, non-finite
    value, later than every query, a patient without a query). No lower time bound: a
    patient's prefix sums start at their first observation whatever the batch, which keeps
    batch and single-patient results bit-identical.
    """
    from features import kernels

    cdtype = np.int8 if len(all_codes) < 127 else np.int16
    row_p = np.asarray(inputs.obs_patient)
    if not (len(qt) and len(row_p)):
        z = np.zeros(0, dtype=np.int64)
        i64 = np.iinfo(np.int64)
        return _Rows(
            z,
            z.astype(cdtype),
            z,
            np.zeros(0),
            np.zeros(n_pat + 1, np.int64),
            np.full(n_pat, i64.max, dtype=np.int64),  # no usable rows
            np.full(n_pat, i64.min, dtype=np.int64),
        )
    row_c = np.asarray(inputs.obs_code)
    if list(inputs.codes) != all_codes:
        pos = {c: i for i, c in enumerate(all_codes)}
        code_map = np.array([pos.get(str(c), -1) for c in inputs.codes] + [-1], dtype=cdtype)
        row_c = code_map[row_c]  # -1 stays -1 (the appended entry)
    t_ns = np.asarray(inputs.obs_time_ns, dtype=np.int64)
    val = np.asarray(inputs.obs_value, dtype=np.float64)
    queried = np.zeros(n_pat, dtype=np.bool_)
    queried[qp] = True
    t_max = int(qt.max())
    grouped, starts, lo_t, hi_t = kernels.patient_rows(
        row_p, row_c, t_ns, val, n_pat, t_max, queried
    )
    if not grouped:  # unknown patients dropped, then grouped (stably) by patient
        keep = np.flatnonzero(row_p >= 0)
        order = keep[np.argsort(row_p[keep], kind="stable")]
        row_p, row_c, t_ns, val = row_p[order], row_c[order], t_ns[order], val[order]
    return _Rows(row_p, row_c, t_ns, val, starts, lo_t, hi_t)


def _usable(
    plan: Plan,
    keys: TimeKeys,
    origin: np.ndarray,
    p: np.ndarray,
    c: np.ndarray,
    t: np.ndarray,
    v: np.ndarray,
    n_pat: int,
    qp: np.ndarray,
    qt: np.ndarray,
    t_max: int,
) -> tuple[Any, ...]:
    """The stacked executor's arguments with the unusable rows of a chunk dropped."""
    queried = np.zeros(n_pat, dtype=bool)
    queried[qp] = True
    ok = (c >= 0) & (t <= t_max) & np.isfinite(v) & queried[p]
    if not ok.all():
        p, c, t, v = p[ok], c[ok], t[ok], v[ok]
    return plan, keys, origin, p, c, t, v, n_pat, qp, qt


def _time_keys(
    config: FeaturesConfig,
    lo_t: np.ndarray,
    hi_t: np.ndarray,
    n_pat: int,
    qp: np.ndarray,
    qt: np.ndarray,
) -> tuple[TimeKeys, np.ndarray]:
    """(keys, per-patient origin): integer time keys of the call, from each patient's
    queries (less the lookback) and usable rows."""
    m = len(qt)
    lookback_ns = round(config.lookback_hours * HOUR_NS)
    first_q = np.searchsorted(qp, np.arange(n_pat))
    if m:
        last_q = np.searchsorted(qp, np.arange(1, n_pat + 1)) - 1
        lo_p = qt[np.minimum(first_q, m - 1)] - lookback_ns
        hi_p = qt[last_q]
        queried = last_q >= first_q
        if not queried.all():  # patients without queries: their rows are not used
            lo_p = np.where(queried, lo_p, 0)
            hi_p = np.where(queried, hi_p, 0)
        lo_p = np.minimum(lo_p, lo_t)  # (no usable rows: lo_t is the int64 maximum)
        hi_p = np.maximum(hi_p, hi_t)
    else:
        lo_p = hi_p = np.zeros(n_pat, dtype=np.int64)
    range_ns = int((hi_p - lo_p).max()) + 2 if m else 2
    unit = _time_unit(range_ns)
    origin = (lo_p // unit) * unit - unit  # aligned: rounding does not depend on the batch
    return TimeKeys(unit=unit, span=range_ns // unit + 4), origin


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


def _sorted_distinct(pid: np.ndarray, t_ns: np.ndarray) -> bool:
    """Rows strictly increasing by (patient id, time)."""
    if len(pid) < 2:
        return True
    a, b = pid[:-1], pid[1:]
    return bool(((b > a) | ((b == a) & (t_ns[1:] > t_ns[:-1]))).all())


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
    # (prediction_times already gives that order, so this is a check, not a sort)
    pid, tns = labelled["patient_id"].to_numpy(), _ns(labelled["time"])
    if not _sorted_distinct(pid, tns):
        lab = labelled.drop_duplicates(["patient_id", "time"]).sort_values(
            ["patient_id", "time"], kind="stable"
        )
        pid, tns = lab["patient_id"].to_numpy(), _ns(lab["time"])
        labelled = lab
    if not (
        np.array_equal(pid, feats["patient_id"].to_numpy())
        and np.array_equal(tns, _ns(feats["time"]))
    ):
        raise AssertionError("feature rows do not match the labelled prediction times")
    label = labelled["label"].to_numpy(dtype=np.int64)
    feats.insert(3, "label", label)
    by_setting = prevalence_by_setting(feats["setting"].to_numpy(), label)
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


def read_observations(
    path: str | Path, filters: Any = None, options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Observations with ``patient_id``/``code`` as categoricals: compact and fast to index.

    ``path``: a file or a Hive-partitioned dataset directory, local or a URL (core.storage).
    """
    from core import storage

    if filters is not None or storage.is_dir(path, options):
        table = storage.read_table(
            path,
            columns=OBS_READ_COLUMNS,
            read_dictionary=["patient_id", "code"],
            filters=filters,
            options=options,
        )
        return table.to_pandas(split_blocks=True, self_destruct=True)
    # One column at a time: Arrow buffers of one column only are alive during conversion,
    # which keeps the peak memory of a big read close to the frame's own size.
    cols: dict[str, pd.Series] = {}
    for c in OBS_READ_COLUMNS:
        dict_cols = [c] if c in ("patient_id", "code") else None
        table = storage.read_table(path, columns=[c], read_dictionary=dict_cols, options=options)
        cols[c] = table.to_pandas(split_blocks=True, self_destruct=True)[c]
        del table
    return pd.DataFrame(cols, copy=False)


#: how the feature matrix is written (one place: the in-memory and the streaming stage)
_PARQUET = {"compression": "snappy"}


def write_features(
    frame: pd.DataFrame, path: str | Path, options: Mapping[str, Any] | None = None
) -> None:
    """Parquet with float columns passed zero-copy (NaN stays NaN, no dictionary encoding)."""
    import pyarrow as pa

    arrays, names = [], []
    for name in frame.columns:
        col = frame[name]
        arrays.append(
            pa.array(col.to_numpy()) if col.dtype.kind == "f" else pa.Array.from_pandas(col)
        )
        names.append(str(name))
    write_feature_table(pa.Table.from_arrays(arrays, names=names), path, None, options).close()


def feature_table(arrays: FeatureArrays, label: np.ndarray) -> Any:
    """The stage's rows as an Arrow table: ids, time, setting, label, then the features
    (each feature row of ``arrays.values`` passed zero-copy)."""
    import pyarrow as pa

    cols = [
        pa.array(arrays.patient_id.tolist(), type=pa.string()),
        pa.array(arrays.time_ns, type=pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
        pa.array([None if x is None else str(x) for x in arrays.setting.tolist()], pa.string()),
        pa.array(np.asarray(label, dtype=np.int64)),
        *(pa.array(arrays.values[j]) for j in range(len(arrays.names))),
    ]
    return pa.Table.from_arrays(
        cols, names=["patient_id", "time", "setting", "label", *arrays.names]
    )


def write_feature_table(
    table: Any, path: str | Path, writer: Any, options: Mapping[str, Any] | None = None
) -> Any:
    """Append ``table`` to the Parquet file of ``writer`` (opened on the first call).

    Float columns are written as required (non-null) fields: they come from numpy arrays,
    where a missing value is NaN, never an Arrow null, so the values read back are the same;
    Parquet then stores no definition levels for them (measured: ~30% of the writing)."""
    import pyarrow as pa

    table = _required_floats(table)
    if writer is None:
        from core import storage

        # dictionaries for the text columns only; min/max statistics only where a reader
        # prunes row groups (patient and time): the rest cost ~25% of the writing (measured)
        dict_cols = [f.name for f in table.schema if pa.types.is_string(f.type)]
        stats = [c for c in ("patient_id", "time") if c in table.schema.names]
        writer = storage.parquet_writer(
            path,
            table.schema,
            options,
            use_dictionary=dict_cols,
            write_statistics=stats,
            **_PARQUET,
        )
    writer.write_table(table)
    return writer


def _required_floats(table: Any) -> Any:
    """``table`` with its null-free floating-point fields marked non-nullable (zero-copy)."""
    import pyarrow as pa

    fields = [
        f.with_nullable(False)
        if f.nullable and pa.types.is_floating(f.type) and table.column(i).null_count == 0
        else f
        for i, f in enumerate(table.schema)
    ]
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return (
        table if schema.equals(table.schema) else pa.Table.from_arrays(table.columns, schema=schema)
    )
