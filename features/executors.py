"""The two executors of a :class:`~features.plan.Plan`: each computes a :class:`Bank`.

- :func:`stacked_bank` (a few queries, serving): every code in ONE series keyed
  ``(code * n_pat + patient) * span + t`` (segments are still one patient's observations of
  one code), then the searches, window sums, moments and min/max of all (code, bound, query)
  combinations in a few stacked calls. For a handful of queries a per-code loop would be
  hundreds of calls on arrays of a few elements, i.e. all overhead.
- :func:`per_code_bank` (large inputs, one chunk of patients): one code at a time through
  compiled kernels (``features/kernels.py``), so the temporaries are one code's rows, only
  the prefix sums that code's statistics need are built (one patient at a time, in a buffer
  that stays in cache), and bounds move forward with the (sorted) queries instead of being
  searched.

Both take their prefix sums and window statistics from the same kernels
(``kernels.segment_moments`` per (code, patient) segment: through ``prefix_moments`` over
the stacked series, or per patient inside ``query_code``; ``kernels.interval_stats`` /
``query_code`` with the arithmetic of ``features/arith.py``); the
searches are exact integer work and min/max exact comparisons, so every bank value is
bit-identical; ``tests/features/test_executors.py`` checks this. The families' combine steps
then turn the bank into features, the same code for both.

Arguments of both, for one chunk: ``origin`` per local patient (ns, a multiple of the unit,
before all of its times); ``p_idx`` (local patient, 0..n_pat-1), ``c_idx`` (index into the
plan's codes), ``t_ns``, ``val``: the chunk's observation rows; ``qp``/``qt``: its queries,
sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.plan import MOMENT_STATS, Bank, Plan
from features.windows import sort_series

HOUR_NS = 3_600_000_000_000


@dataclass(frozen=True)
class TimeKeys:
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


def _time_units(keys: TimeKeys, t_ns: np.ndarray, origin: np.ndarray) -> np.ndarray:
    t_u = t_ns - origin
    if keys.unit > 1:
        t_u = -(-t_u // keys.unit)  # ceil: an observation never moves earlier
    return t_u


def _empty_bank(plan: Plan, m: int) -> Bank:
    n_iv = len(plan.iv_code)
    n_run, w_max = plan.run_lo.shape
    return Bank(
        idx=np.zeros((len(plan.slot_code), m), dtype=np.int64),
        stats={s: np.full((n_iv, m), np.nan) for s in MOMENT_STATS},
        run_min=np.full((n_run, w_max, m), np.nan),
        run_max=np.full((n_run, w_max, m), np.nan),
        last=np.full((plan.n_codes, m), np.nan),
        since=np.full((plan.n_codes, m), np.nan),
        patient_index=np.zeros(m, dtype=np.intp),
        patient={},
    )


# --------------------------------------------------------------------------------------------
# large inputs: one code at a time, compiled kernels (features/kernels.py)


def per_code_bank(
    plan: Plan,
    keys: TimeKeys,
    origin: np.ndarray,
    p_idx: np.ndarray,
    c_idx: np.ndarray,
    t_ns: np.ndarray,
    val: np.ndarray,
    n_pat: int,
    qp: np.ndarray,
    qt: np.ndarray,
    t_max: int | None = None,
) -> Bank:
    """The bank of one chunk, code by code. Rows with an unknown code (-1), a non-finite
    value, a time after ``t_max`` (default: the last query) or of a patient without a query
    are skipped."""
    from features import kernels

    m = len(qp)
    bank = _empty_bank(plan, m)
    hpu = keys.hpu
    qt_u = (qt - origin[qp]) // keys.unit
    backs = plan.slot_units(keys.unit)
    queried = np.zeros(n_pat, dtype=np.bool_)
    queried[qp] = True
    bounds, p_all, t_all, v_all = kernels.by_code(
        p_idx,
        c_idx,
        t_ns,
        val,
        origin,
        keys.unit,
        plan.n_codes,
        int(qt.max()) if t_max is None and m else int(t_max or 0),
        queried,
    )
    st = bank.stats
    for ci in range(plan.n_codes):
        a, b = bounds[ci], bounds[ci + 1]
        if a == b:  # no rows: empty windows (count 0, sum 0, the rest NaN), no last value
            st["count"][plan.code_ivs[ci]] = 0.0
            st["sum"][plan.code_ivs[ci]] = 0.0
            continue
        p, t, v = p_all[a:b], t_all[a:b], v_all[a:b]
        if not kernels.is_sorted(p, t):
            order = np.lexsort((v, t, p))
            p, t, v = p[order], t[order], v[order]
        p, t, v = kernels.dedupe_ties(p, t, v)
        need = plan.code_moments[ci]
        ivs, runs, slots = plan.code_ivs[ci], plan.code_runs[ci], plan.code_slots[ci]
        kernels.query_code(
            p,
            t,
            v,
            n_pat,
            "v" in need,
            "vv" in need,
            bool(need & {"t", "tv", "tt"}),
            qp,
            qt_u,
            slots,
            backs[slots],
            int(plan.hi_slot[ci]),
            int(plan.lb_slot[ci]),
            ivs,
            plan.iv_lo[ivs],
            plan.iv_hi[ivs],
            plan.iv_need[ivs],
            runs,
            plan.run_lo[runs],
            plan.run_windows[runs],
            plan.run_need[runs],
            ci,
            hpu,
            HOUR_NS / keys.unit,
            bank.idx,
            bank.last,
            bank.since,
            st["mean"],
            st["sum"],
            st["count"],
            st["std"],
            st["slope"],
            bank.run_min,
            bank.run_max,
        )
    return bank


# --------------------------------------------------------------------------------------------
# few queries: every code in one pass


def stacked_bank(
    plan: Plan,
    keys: TimeKeys,
    origin: np.ndarray,
    p_idx: np.ndarray,
    c_idx: np.ndarray,
    t_ns: np.ndarray,
    val: np.ndarray,
    n_pat: int,
    qp: np.ndarray,
    qt: np.ndarray,
) -> Bank:
    """The bank of one chunk with every code in one series (few queries)."""
    m = len(qp)
    span, unit, hpu = keys.span, keys.unit, keys.hpu
    n_codes = plan.n_codes
    qt_u = (qt - origin[qp]) // unit

    # -- one series: (code, patient, time), ties ordered by value, exact duplicates dropped --
    t_u = _time_units(keys, t_ns, origin[p_idx])
    key = (c_idx.astype(np.int64) * n_pat + p_idx) * span + t_u
    key, t_u, v = sort_series(key, t_u, val)
    n = len(key)
    seg = np.searchsorted(key, np.arange(n_codes * n_pat + 1, dtype=np.int64) * span)

    # -- centred moments, their prefix sums and error sums: the per-code executor's kernel,
    # with one segment per (code, patient) --------------------------------------------------
    from features import kernels

    _, P, E, C = kernels.prefix_moments(key // span, t_u, v, n_codes * n_pat, True, True, True)

    # -- every bound of every code in one search ----------------------------------------------
    cq = np.arange(n_codes, dtype=np.int64)[:, None] * n_pat + qp[None, :]  # segment ids
    sk = (cq * span)[plan.slot_code]
    bound = np.maximum(sk + (qt_u[None, :] - plan.slot_units(unit)[:, None]), sk - 1)
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
    stats = _stacked_stats(
        P, E, C, v, idx[plan.iv_lo], idx[plan.iv_hi], seg[cq[plan.iv_code]], HOUR_NS / unit
    )
    run_min, run_max = _stacked_runs(plan, idx, v, m)
    return Bank(
        idx=idx,
        stats=stats,
        run_min=run_min,
        run_max=run_max,
        last=last,
        since=since,
        patient_index=np.zeros(m, dtype=np.intp),
        patient={},
    )


def _stacked_stats(
    P: np.ndarray,
    E: np.ndarray,
    C: np.ndarray,
    v: np.ndarray,
    lo: np.ndarray,
    up: np.ndarray,
    seg_first: np.ndarray,
    per_hour: float,
) -> dict[str, np.ndarray]:
    """Every interval's statistics, by the kernel ``query_code`` uses for one code."""
    from features import kernels

    nf = (up - lo).astype(np.float64)
    if not len(v):
        nan = np.full(lo.shape, np.nan)
        return {"mean": nan, "sum": np.zeros(lo.shape), "count": nf, "std": nan, "slope": nan}
    shape = lo.shape
    mean, total, std, slope = kernels.interval_stats(
        P, E, C, v, lo.ravel(), up.ravel(), seg_first.ravel(), per_hour
    )
    return {
        "mean": mean.reshape(shape),
        "sum": total.reshape(shape),
        "count": nf,
        "std": std.reshape(shape),
        "slope": slope.reshape(shape),
    }


def _stacked_runs(plan: Plan, idx: np.ndarray, v: np.ndarray, m: int) -> list[np.ndarray]:
    """Running min/max over windows: the same pieces as ``_code_runs``, one reduceat each."""
    n_run, w_max = plan.run_lo.shape
    if not n_run:
        return [np.zeros((0, w_max, m)), np.zeros((0, w_max, m))]
    # (run, query, window descending): consecutive pieces touch, so the gaps between them
    # that reduceat also reduces stay short
    s = idx[plan.run_lo][:, ::-1, :].transpose(0, 2, 1).ravel()
    e = idx[plan.run_end][:, ::-1, :].transpose(0, 2, 1).ravel()
    ii = np.empty(2 * len(s), dtype=np.intp)
    ii[0::2] = s
    ii[1::2] = e
    v_ext = np.append(v, 0.0)
    empty = e <= s
    runs = []
    for red, acc in ((np.minimum, np.fmin), (np.maximum, np.fmax)):
        piece = red.reduceat(v_ext, ii)[0::2]
        piece[empty] = np.nan
        piece = piece.reshape(n_run, m, w_max).transpose(0, 2, 1)[:, ::-1, :]
        runs.append(acc.accumulate(piece, axis=1) + 0.0)  # + 0.0: zeros as +0.0
    return runs
