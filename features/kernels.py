"""Compiled kernels of the per-code executor, and the window statistics as ufuncs (numba).

Why compiled: the per-code executor spends its time in loops over one code's observations
(prefix sums with their error terms, tie handling) and over queries (binary searches per
bound, window sums, running min/max); in numpy each step is a pass over the data and a
temporary. Each kernel here is one pass, releases the GIL (chunks run on threads) and is
cached on disk after the first compile.

Every floating-point step is a call of ``features.arith`` in the same order as the stacked
executor's numpy code, so both executors give the same bits (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba as nb
import numpy as np

from features.arith import (
    stat_mean,
    stat_slope,
    stat_std,
    stat_sum,
    sum_error,
    two_prod,
    window_sum,
)

F = TypeVar("F", bound=Callable[..., Any])


def _jit(fn: F) -> F:
    """Compiled on first call, cached on disk, without the GIL (chunks run on threads)."""
    return cast(F, nb.njit(cache=True, nogil=True)(fn))


#: moment rows of the prefix sums: v, vv, t, tv, tt (value and time centred per segment)
N_MOMENTS = 5


@_jit
def patient_rows(
    row_p: np.ndarray,
    row_c: np.ndarray,
    t_ns: np.ndarray,
    val: np.ndarray,
    n_pat: int,
    t_max: int,
    queried: np.ndarray,
) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the observation rows: are they grouped by patient (non-decreasing, no
    unknown patient), where each patient's rows start (n_pat + 1), and the first and last
    time of each patient's usable rows (known code, finite value, not after ``t_max``, a
    queried patient); patients without usable rows get ``lo > hi``."""
    n = len(row_p)
    starts = np.zeros(n_pat + 1, dtype=np.int64)
    lo = np.full(n_pat, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(n_pat, np.iinfo(np.int64).min, dtype=np.int64)
    grouped = True
    prev = 0
    for i in range(n):
        p = row_p[i]
        if p < 0 or p < prev:
            grouped = False
            if p < 0:
                continue
        prev = p
        starts[p + 1] += 1
        t = t_ns[i]
        if row_c[i] >= 0 and queried[p] and t <= t_max and np.isfinite(val[i]):
            if t < lo[p]:
                lo[p] = t
            if t > hi[p]:
                hi[p] = t
    for k in range(n_pat):
        starts[k + 1] += starts[k]
    return grouped, starts, lo, hi


@_jit
def by_code(
    p_idx: np.ndarray,
    c_idx: np.ndarray,
    t_ns: np.ndarray,
    val: np.ndarray,
    origin: np.ndarray,
    unit: int,
    n_codes: int,
    t_max: int,
    queried: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Usable rows grouped by code (stable): known code, finite value, not after ``t_max``,
    queried patient; times as integer units after each patient's origin (rounded up: an
    observation never moves earlier). Returns (bounds, p, t, v)."""
    n = len(c_idx)
    bounds = np.zeros(n_codes + 1, dtype=np.int64)
    for i in range(n):
        c = c_idx[i]
        if c >= 0 and queried[p_idx[i]] and t_ns[i] <= t_max and np.isfinite(val[i]):
            bounds[c + 1] += 1
    for c in range(n_codes):
        bounds[c + 1] += bounds[c]
    pos = bounds[:-1].copy()
    m = bounds[n_codes]
    p_out = np.empty(m, dtype=np.int64)
    t_out = np.empty(m, dtype=np.int64)
    v_out = np.empty(m, dtype=np.float64)
    for i in range(n):
        c = c_idx[i]
        p = p_idx[i]
        if not (c >= 0 and queried[p] and t_ns[i] <= t_max and np.isfinite(val[i])):
            continue
        k = pos[c]
        pos[c] = k + 1
        d = t_ns[i] - origin[p]
        if unit > 1:
            d = -((-d) // unit)
        p_out[k] = p
        t_out[k] = d
        v_out[k] = val[i]
    return bounds, p_out, t_out, v_out


@_jit
def is_sorted(p: np.ndarray, t: np.ndarray) -> bool:
    for i in range(1, len(p)):
        if p[i] < p[i - 1] or (p[i] == p[i - 1] and t[i] < t[i - 1]):
            return False
    return True


@_jit
def dedupe_ties(
    p: np.ndarray, t: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (patient, time): ties at one time ordered by value (stably), exact
    duplicates (same time and value) dropped, as ``features.windows.sort_series``."""
    n = len(p)
    ties = False
    for i in range(1, n):
        if p[i] == p[i - 1] and t[i] == t[i - 1]:
            ties = True
            break
    if not ties:
        return p, t, v
    po = p.copy()
    to = t.copy()
    vo = v.copy()
    i = 0
    while i < n:
        j = i + 1
        while j < n and po[j] == po[i] and to[j] == to[i]:
            j += 1
        for a in range(i + 1, j):  # insertion sort of the tie run by value (stable)
            x = vo[a]
            b = a - 1
            while b >= i and vo[b] > x:
                vo[b + 1] = vo[b]
                b -= 1
            vo[b + 1] = x
        i = j
    w = 0
    for i in range(n):
        if i > 0 and po[i] == po[i - 1] and to[i] == to[i - 1] and vo[i] == vo[w - 1]:
            continue
        po[w] = po[i]
        to[w] = to[i]
        vo[w] = vo[i]
        w += 1
    return po[:w], to[:w], vo[:w]


@_jit
def segment_moments(
    t: np.ndarray,
    v: np.ndarray,
    s0: int,
    s1: int,
    P: np.ndarray,
    E: np.ndarray,
    off: int,
    need_vv: bool,
    need_t: bool,
) -> None:
    """The centred moments' prefix sums and error sums of the segment ``[s0, s1)`` (one
    patient's rows of one code), into columns ``i - off`` of ``P`` and ``E``
    (:func:`prefix_moments` documents them): the one formulation both executors use."""
    v0 = v[s0]
    t0 = t[s0]
    p0 = e0 = p1 = e1 = p2 = e2 = p3 = e3 = p4 = e4 = 0.0
    for i in range(s0, s1):
        r = i - off
        x = v[i] - v0
        s = p0 + x
        e0 = e0 + (sum_error(p0, x, s) + 0.0)
        p0 = s
        P[0, r] = p0
        E[0, r] = e0
        if need_vv:
            m1, r1 = two_prod(x, x)
            s = p1 + m1
            e1 = e1 + (sum_error(p1, m1, s) + r1)
            p1 = s
            P[1, r] = p1
            E[1, r] = e1
        if need_t:
            h = float(t[i] - t0)
            s = p2 + h
            e2 = e2 + (sum_error(p2, h, s) + 0.0)
            p2 = s
            m3, r3 = two_prod(h, x)
            s = p3 + m3
            e3 = e3 + (sum_error(p3, m3, s) + r3)
            p3 = s
            m4, r4 = two_prod(h, h)
            s = p4 + m4
            e4 = e4 + (sum_error(p4, m4, s) + r4)
            p4 = s
            P[2, r] = p2
            E[2, r] = e2
            P[3, r] = p3
            E[3, r] = e3
            P[4, r] = p4
            E[4, r] = e4


@_jit
def prefix_moments(
    p: np.ndarray,
    t: np.ndarray,
    v: np.ndarray,
    n_pat: int,
    need_v: bool,
    need_vv: bool,
    need_t: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Segment starts per patient, prefix sums ``P`` of the centred moments with their error
    sums ``E`` (both (5, n); rows not needed are not written), and the running count of
    value changes ``C``.

    Within a segment (one patient): ``x = v - v[first]``, ``h = t - t[first]`` (integer
    time units, exact as a double up to 2^53); the moments ``x, x*x, h, h*x, h*h`` with each
    product's rounding error (``two_prod``). ``P`` is the running sum from the segment's
    first row (where every moment is +0.0, so this is what ``np.cumsum`` gives), ``E`` sums
    the rounding errors of ``P``'s additions (``sum_error``) plus the products' errors.
    """
    n = len(v)
    starts = np.zeros(n_pat + 1, dtype=np.int64)
    for i in range(n):
        starts[p[i] + 1] += 1
    for k in range(n_pat):
        starts[k + 1] += starts[k]
    P = np.empty((N_MOMENTS, n))
    E = np.empty((N_MOMENTS, n))
    C = np.empty(n, dtype=np.int64)
    changes = 0
    for i in range(n):
        if i > 0 and p[i] == p[i - 1] and v[i] != v[i - 1]:
            changes += 1
        C[i] = changes
    if not need_v:
        return starts, P, E, C
    for q in range(n_pat):
        s0, s1 = starts[q], starts[q + 1]
        if s1 > s0:
            segment_moments(t, v, s0, s1, P, E, 0, need_vv, need_t)
    return starts, P, E, C


#: block length of the min/max summaries (``block_extremes``)
BLOCK = 16


@_jit
def block_extremes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each block of ``BLOCK`` rows: long min/max windows read blocks."""
    nb_ = (len(v) + BLOCK - 1) // BLOCK
    bmin = np.empty(nb_)
    bmax = np.empty(nb_)
    for b in range(nb_):
        mn = v[b * BLOCK]
        mx = mn
        for i in range(b * BLOCK + 1, min(len(v), (b + 1) * BLOCK)):
            x = v[i]
            if x < mn:
                mn = x
            if x > mx:
                mx = x
        bmin[b] = mn
        bmax[b] = mx
    return bmin, bmax


@_jit
def _extremes(
    v: np.ndarray, bmin: np.ndarray, bmax: np.ndarray, lo: int, hi: int, mn: float, mx: float
) -> tuple[float, float]:
    """(min, max) of ``mn``/``mx`` (NaN = none yet) and ``v[lo:hi]``, whole blocks at once."""
    i = lo
    head = min(hi, ((lo + BLOCK - 1) // BLOCK) * BLOCK)
    while i < head:
        x = v[i]
        if not x >= mn:  # NaN start, or smaller
            mn = x
        if not x <= mx:
            mx = x
        i += 1
    while i + BLOCK <= hi:
        b = i // BLOCK
        if not bmin[b] >= mn:
            mn = bmin[b]
        if not bmax[b] <= mx:
            mx = bmax[b]
        i += BLOCK
    while i < hi:
        x = v[i]
        if not x >= mn:
            mn = x
        if not x <= mx:
            mx = x
        i += 1
    return mn, mx


@_jit
def _sums(P: np.ndarray, E: np.ndarray, k: int, lo: int, up: int, s0: int) -> tuple[float, float]:
    """Window sum (hi, lo) of moment ``k`` over rows [lo, up) of a segment starting at s0."""
    if up <= lo:
        return 0.0, 0.0
    pa = 0.0
    ea = 0.0
    if lo > s0:
        pa = P[k, lo - 1]
        ea = E[k, lo - 1]
    return window_sum(P[k, up - 1], E[k, up - 1], pa, ea)


@_jit
def query_code(
    p: np.ndarray,
    t: np.ndarray,
    v: np.ndarray,
    n_pat: int,
    need_v: bool,
    need_vv: bool,
    need_t: bool,
    qp: np.ndarray,
    qt_u: np.ndarray,
    slot_ids: np.ndarray,
    slot_backs: np.ndarray,
    hi_slot: int,
    lb_slot: int,
    iv_ids: np.ndarray,
    iv_lo: np.ndarray,
    iv_hi: np.ndarray,
    iv_need: np.ndarray,
    run_ids: np.ndarray,
    run_lo: np.ndarray,
    run_windows: np.ndarray,
    run_need: np.ndarray,
    ci: int,
    hpu: float,
    per_hour: float,
    idx: np.ndarray,
    last: np.ndarray,
    since: np.ndarray,
    s_mean: np.ndarray,
    s_sum: np.ndarray,
    s_count: np.ndarray,
    s_std: np.ndarray,
    s_slope: np.ndarray,
    run_min: np.ndarray,
    run_max: np.ndarray,
) -> None:
    """One code's part of the bank for every query (layout: ``features.plan``), from the
    code's rows ``p, t, v`` (sorted by patient and time, ties deduplicated).

    Patient by patient: the prefix sums of the patient's rows (``segment_moments``, only the
    moments ``need_*`` asks for; value changes counted in ``C``) go to a scratch buffer of
    one patient's length, which stays in cache while the patient's queries read it, instead
    of prefix arrays over the whole code. Queries come sorted by (patient, time), so each
    bound only moves forward within a patient: one pointer per slot sweeps the patient's
    rows once. Patients without a query are skipped."""
    starts = np.zeros(n_pat + 1, dtype=np.int64)
    for i in range(len(p)):
        starts[p[i] + 1] += 1
    for k in range(n_pat):
        starts[k + 1] += starts[k]
    cap = 1
    for k in range(n_pat):
        if starts[k + 1] - starts[k] > cap:
            cap = starts[k + 1] - starts[k]
    P = np.empty((N_MOMENTS, cap))
    E = np.empty((N_MOMENTS, cap))
    C = np.empty(cap, dtype=np.int64)
    ptr = np.zeros(len(slot_ids), dtype=np.int64)
    if len(run_ids):
        bmin, bmax = block_extremes(v)
    else:
        bmin = bmax = np.zeros(0)
    prev_q = -1
    for j in range(len(qp)):
        q = qp[j]
        s0, s1 = starts[q], starts[q + 1]
        if q != prev_q:
            ptr[:] = s0
            prev_q = q
            changes = 0
            for i in range(s0, s1):
                if i > s0 and v[i] != v[i - 1]:
                    changes += 1
                C[i - s0] = changes
            if need_v and s1 > s0:
                segment_moments(t, v, s0, s1, P, E, s0, need_vv, need_t)
        qtu = qt_u[j]
        for k in range(len(slot_ids)):
            bound = qtu - slot_backs[k]  # never before the patient: rows start at s0
            x = ptr[k]
            while x < s1 and t[x] <= bound:
                x += 1
            ptr[k] = x
            idx[slot_ids[k], j] = x
        hi = idx[hi_slot, j]
        if hi > idx[lb_slot, j]:
            last[ci, j] = v[hi - 1]
            since[ci, j] = (qtu - t[hi - 1]) * hpu
        for a in range(len(iv_ids)):
            lo = idx[iv_lo[a], j]
            up = idx[iv_hi[a], j]
            row = iv_ids[a]
            n = float(up - lo)
            s_count[row, j] = n
            if not (iv_need[a, 0] or iv_need[a, 1] or iv_need[a, 3] or iv_need[a, 4]):
                continue
            v0 = v[s0] if s1 > s0 else 0.0
            first = v[lo] if up > lo else 0.0
            const = 1.0 if up > lo and C[up - 1 - s0] == C[lo - s0] else 0.0
            # (the scratch buffer's column i - s0 is row i)
            lo -= s0
            up -= s0
            svh, svl = _sums(P, E, 0, lo, up, 0)
            if iv_need[a, 0]:
                s_mean[row, j] = stat_mean(n, v0, first, const, svh, svl)
            if iv_need[a, 1]:
                s_sum[row, j] = stat_sum(n, v0, first, const, svh, svl)
            if iv_need[a, 3]:
                qh, ql = _sums(P, E, 1, lo, up, 0)
                s_std[row, j] = stat_std(n, const, svh, svl, qh, ql)
            if iv_need[a, 4]:
                th, tl = _sums(P, E, 2, lo, up, 0)
                tvh, tvl = _sums(P, E, 3, lo, up, 0)
                tth, ttl = _sums(P, E, 4, lo, up, 0)
                s_slope[row, j] = stat_slope(
                    n, const, svh, svl, th, tl, tvh, tvl, tth, ttl, per_hour
                )
        for a in range(len(run_ids)):
            r = run_ids[a]
            prev = hi
            mn = math.nan
            mx = math.nan
            for w in range(run_windows[a]):
                lo = idx[run_lo[a, w], j]
                mn, mx = _extremes(v, bmin, bmax, lo, prev, mn, mx)
                if run_need[a, 0]:
                    run_min[r, w, j] = mn + 0.0  # zeros as +0.0
                if run_need[a, 1]:
                    run_max[r, w, j] = mx + 0.0
                prev = lo


@_jit
def interval_stats(
    P: np.ndarray,
    E: np.ndarray,
    C: np.ndarray,
    v: np.ndarray,
    lo: np.ndarray,
    up: np.ndarray,
    s0: np.ndarray,
    per_hour: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mean, sum, std and slope of rows [lo, up) of segments starting at ``s0`` (flat
    arrays): the stacked executor's statistics, with ``query_code``'s arithmetic."""
    n_iv = len(lo)
    mean = np.empty(n_iv)
    total = np.empty(n_iv)
    std = np.empty(n_iv)
    slope = np.empty(n_iv)
    for a in range(n_iv):
        lo_, up_, first_row = lo[a], up[a], s0[a]
        n = float(up_ - lo_)
        v0 = v[first_row] if up_ > lo_ else 0.0
        first = v[lo_] if up_ > lo_ else 0.0
        const = 1.0 if up_ > lo_ and C[up_ - 1] == C[lo_] else 0.0
        svh, svl = _sums(P, E, 0, lo_, up_, first_row)
        qh, ql = _sums(P, E, 1, lo_, up_, first_row)
        th, tl = _sums(P, E, 2, lo_, up_, first_row)
        tvh, tvl = _sums(P, E, 3, lo_, up_, first_row)
        tth, ttl = _sums(P, E, 4, lo_, up_, first_row)
        mean[a] = stat_mean(n, v0, first, const, svh, svl)
        total[a] = stat_sum(n, v0, first, const, svh, svl)
        std[a] = stat_std(n, const, svh, svl, qh, ql)
        slope[a] = stat_slope(n, const, svh, svl, th, tl, tvh, tvl, tth, ttl, per_hour)
    return mean, total, std, slope


def warm_up() -> None:
    """Load (or compile) every kernel now, e.g. on a thread while a stage reads its inputs:
    the first call of a numba function in a process costs ~0.3-0.5 s even from the cache."""
    i64 = np.zeros(2, dtype=np.int64)
    f8 = np.zeros(2)
    c8 = np.zeros(2, dtype=np.int8)
    yes = np.ones(2, dtype=np.bool_)
    patient_rows(i64, c8, i64, f8, 1, 0, yes[:1])
    by_code(i64, c8, i64, f8, i64[:1], 1, 1, 0, yes[:1])
    is_sorted(i64, i64)
    dedupe_ties(i64, i64, f8)
    _, P, E, C = prefix_moments(i64, i64, f8, 1, True, True, True)
    interval_stats(P, E, C, f8, i64, i64, i64, 1.0)
    s2 = np.zeros(2, dtype=np.intp)
    query_code(
        i64, i64, f8, 1, True, True, True, i64[:0], i64[:0], s2, i64, 0, 1, s2, s2, s2,
        np.zeros((2, 5), np.bool_), s2[:0], np.zeros((0, 1), np.intp), s2[:0],
        np.zeros((0, 2), np.bool_), 0, 1.0, 1.0, np.zeros((2, 0), np.int64),
        np.zeros((1, 0)), np.zeros((1, 0)), np.zeros((2, 0)), np.zeros((2, 0)),
        np.zeros((2, 0)), np.zeros((2, 0)), np.zeros((2, 0)),
        np.zeros((0, 1, 0)), np.zeros((0, 1, 0)),
    )  # fmt: skip
