"""Point-in-time window arithmetic on sorted arrays: prefix sums plus binary search.

Why this shape: features are needed only at prediction times, not at every observation, so
one pass of prefix sums per code and two ``searchsorted`` calls per window give every window
statistic in O(n + m log n) with no per-row rolling. Patients are kept apart by a composite
integer key ``patient_index * span + time`` so one search serves all patients at once.

Exactness: prefix sums are *segment-local* (they restart at each patient's first observation
of a code), and values and times are centred on that first observation. A patient's features
are therefore the same bits whether computed in a batch of thousands of patients, alone (the
serving path) or in a Dask partition.

All windows are half-open on the left, ``(t - w, t]``: an observation at the prediction time
is used, nothing after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: cells per block when computing segment-local prefix sums (bounds temporary memory)
_BLOCK_CELLS = 1 << 21
#: segments at least this long get their own cumsum call; shorter ones are batched
_LONG_SEGMENT = 256
#: centred moments kept as prefix sums, by name
MOMENTS = ("v", "vv", "t", "tv", "tt")


def segmented_cumsum(
    x: np.ndarray, starts: np.ndarray, lengths: np.ndarray, inplace: bool = False
) -> np.ndarray:
    """Inclusive prefix sums along the last axis of ``x`` (k, n), restarting at each segment.

    Long segments are summed one ``np.cumsum`` call each (cheap per element); short ones are
    bucketed by length (powers of two) and summed as padded blocks, so many tiny segments do
    not mean many Python calls. Either way each element is the same sequential float sum a
    1-D ``np.cumsum`` of that segment alone would give.
    """
    out = x if inplace else np.empty_like(x)
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    long_ = lengths >= _LONG_SEGMENT
    rows = [j for j in range(x.shape[0]) if x[j].any()] if len(x[0]) else []
    for j in range(x.shape[0]):
        if j not in rows:
            out[j] = 0.0
    for st, ln in zip(starts[long_].tolist(), lengths[long_].tolist(), strict=True):
        for j in rows:  # 1-D calls: numpy accumulates 2-D along axis 1 element-wise slowly
            np.cumsum(x[j, st : st + ln], out=out[j, st : st + ln])
    starts, lengths = starts[~long_], lengths[~long_]
    if len(starts) == 0:
        return out
    k = x.shape[0]
    levels = np.ceil(np.log2(lengths)).astype(np.int64)
    for lev in np.unique(levels):
        width = 1 << int(lev)
        sel = np.flatnonzero(levels == lev)
        step = max(1, _BLOCK_CELLS // (width * k))
        cols = np.arange(width)
        for a in range(0, len(sel), step):
            st = starts[sel[a : a + step]]
            ln = lengths[sel[a : a + step]]
            valid = cols[None, :] < ln[:, None]
            idx = (st[:, None] + cols[None, :])[valid]
            block = np.zeros((k, len(st), width), dtype=x.dtype)
            block[:, valid] = x[:, idx]
            np.cumsum(block, axis=2, out=block)
            out[:, idx] = block[:, valid]
    return out


def range_reduce(ufunc: np.ufunc, a_ext: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``ufunc`` over ``a[lo:hi]`` for each pair; NaN where empty.

    ``a_ext`` is the array with one sentinel element appended (so ``hi`` may equal ``len(a)``).
    Uses ``ufunc.reduceat`` on interleaved bounds; the odd (gap) results are discarded.
    """
    m = len(lo)
    if m == 0:
        return np.empty(0)
    idx = np.empty(2 * m, dtype=np.intp)
    idx[0::2] = lo
    idx[1::2] = hi
    res = ufunc.reduceat(a_ext, idx)[0::2].astype(np.float64, copy=False)
    res[hi <= lo] = np.nan
    return res


def sort_series(
    key: np.ndarray, t: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by ``key`` (stably); ties at one key ordered by value, so "last" does not
    depend on row order; exact duplicates (same key and value) dropped."""
    if len(key) < 2:
        return key, t, v
    d = np.diff(key)
    if d.min() < 0:
        order = np.argsort(key, kind="stable")
        key, t, v = key[order], t[order], v[order]
        d = np.diff(key)
    if not (d == 0).any():
        return key, t, v
    order = np.lexsort((v, key))
    key, t, v = key[order], t[order], v[order]
    dup = (key[1:] == key[:-1]) & (v[1:] == v[:-1])
    if dup.any():
        keep = np.concatenate([[True], ~dup])
        key, t, v = key[keep], t[keep], v[keep]
    return key, t, v


def centred_moments(
    out: np.ndarray,
    v: np.ndarray,
    t: np.ndarray,
    starts: np.ndarray,
    hours_per_unit: float,
    moments: frozenset[str] = frozenset(MOMENTS),
) -> None:
    """Fill ``out`` (5, n) with the moments of :data:`MOMENTS` per row, value and time centred
    on the first row of the row's segment (``starts``: segment bounds, len segments + 1);
    rows of moments not asked for are zero."""
    lengths = np.diff(starts)
    has = lengths > 0
    firsts = starts[:-1][has]
    v_c = out[0]
    np.subtract(v, np.repeat(v[firsts], lengths[has]), out=v_c)
    if "vv" in moments:
        np.multiply(v_c, v_c, out=out[1])
    else:
        out[1] = 0.0
    if moments & {"t", "tv", "tt"}:
        t_h = out[2]
        np.subtract(t, np.repeat(t[firsts], lengths[has]), out=t_h, casting="unsafe")
        t_h *= hours_per_unit
        np.multiply(t_h, v_c, out=out[3])
        np.multiply(t_h, t_h, out=out[4])
    else:
        out[2:] = 0.0


@dataclass
class CodeSeries:
    """One code's observations, sorted by (patient, time), with segment-local prefix sums.

    ``key`` = patient_index * span + t (integer time units). ``csum`` rows are the prefix sums
    of the centred moments in :data:`MOMENTS` order (value and time in hours, centred on the
    patient's first observation of this code); rows not requested are zero.
    """

    key: np.ndarray
    t: np.ndarray
    v: np.ndarray
    starts: np.ndarray  # per patient, len n_patients + 1
    csum: np.ndarray  # (5, n)
    v_ext: np.ndarray  # v with a sentinel, for range min/max
    _cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        pidx: np.ndarray,
        t: np.ndarray,
        v: np.ndarray,
        n_patients: int,
        span: int,
        hours_per_unit: float,
        moments: frozenset[str] = frozenset(MOMENTS),
    ) -> CodeSeries:
        key = pidx.astype(np.int64, copy=False) * span
        key += t
        key, t, v = sort_series(key, t, v)
        starts = np.searchsorted(key, np.arange(n_patients + 1, dtype=np.int64) * span)
        n = len(key)
        csum = np.zeros((5, n)) if not moments else np.empty((5, n))
        if moments and n:
            centred_moments(csum, v, t, starts, hours_per_unit, moments)
            csum = segmented_cumsum(csum, starts[:-1], np.diff(starts), inplace=True)
        v_ext = np.append(v, 0.0)
        return cls(key=key, t=t, v=v, starts=starts, csum=csum, v_ext=v_ext)

    # -- queries -----------------------------------------------------------------------------
    def upto(self, qkey: np.ndarray) -> np.ndarray:
        """Index one past the last observation at or before each query key."""
        return np.searchsorted(self.key, qkey, side="right")

    def after(self, qp: np.ndarray, qkey: np.ndarray, back: int, span: int) -> np.ndarray:
        """Index of the first observation later than ``t - back`` (never before the patient)."""
        bound = np.maximum(qkey - back, qp * span - 1)
        return np.searchsorted(self.key, bound, side="right")

    def first_value(self, qp: np.ndarray) -> np.ndarray:
        """Value of each queried patient's first observation: the centring origin."""
        if len(self.v) == 0:
            return np.zeros(len(qp))
        return self.v[np.minimum(self.starts[qp], len(self.v) - 1)]

    def window_sums(
        self, qp: np.ndarray, lo: np.ndarray, hi: np.ndarray, stats: set[str] | None = None
    ) -> np.ndarray:
        """Sums over rows [lo, hi) of the centred moments: (5, m); rows not needed are 0."""
        m = len(lo)
        out = np.zeros((5, m))
        if len(self.key) == 0 or m == 0:
            return out
        rows = [0, 1, 2, 3, 4]
        if stats is not None:
            rows = [0] if stats & {"mean", "sum", "std", "slope"} else []
            rows += [1] if "std" in stats else []
            rows += [2, 3, 4] if "slope" in stats else []
        if not rows:
            return out
        first = self.starts[qp] >= lo  # window starts at the patient's first row
        empty = hi <= lo
        for j in rows:
            d = self._prefix(j, hi) - np.where(first, 0.0, self._prefix(j, lo))
            d[empty] = 0.0
            out[j] = d
        return out

    def _prefix(self, j: int, end: np.ndarray) -> np.ndarray:
        """``csum[j][end - 1]`` (inclusive prefix before row ``end``), memoised per bound array.

        Every window of a code shares its upper bound and most share lower bounds, so the
        gathers are reused; the cache keeps the bound array alive, so its id stays unique.
        """
        key = (j, id(end))
        hit = self._cache.get(key)
        if hit is None:
            hit = (end, self.csum[j][np.maximum(end - 1, 0)])
            self._cache[key] = hit
        return hit[1]


def moments_to_stats(
    sums: np.ndarray, n: np.ndarray, v0: np.ndarray, stats: set[str]
) -> dict[str, np.ndarray]:
    """mean / std / slope / sum / count from centred window sums (NaN where undefined)."""
    out: dict[str, np.ndarray] = {}
    nf = n.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sv, svv, st, stv, stt = sums
        mean_c = sv / nf
        if "mean" in stats:
            out["mean"] = np.where(n > 0, v0 + mean_c, np.nan)
        if "sum" in stats:
            out["sum"] = np.where(n > 0, sv + v0 * nf, 0.0)
        if "count" in stats:
            out["count"] = nf
        if "std" in stats:
            var = (svv - sv * mean_c) / (nf - 1.0)
            out["std"] = np.where(n > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
        if "slope" in stats:
            den = stt - st * st / nf
            num = stv - st * sv / nf
            ok = (n > 1) & (den > 1e-9 * np.maximum(stt, 1e-300))
            out["slope"] = np.where(ok, num / den, np.nan)
    return out
