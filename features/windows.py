"""Series order shared by the executors: sorted by key, ties by value, duplicates dropped.

Why this shape: features are needed only at prediction times, not at every observation, so
prefix sums per code and a binary search per window bound give every window statistic in
O(n + m log n) with no per-row rolling. Patients are kept apart by a composite integer key
``patient_index * span + time`` (one search serves all patients at once).

Prefix sums are *segment-local* (they restart at each patient's first observation of a
code), and values and times are centred on that first observation, so a patient's features
are the same bits whether computed in a batch of thousands, alone (serving) or in a Dask
partition. All windows are half-open on the left, ``(t - w, t]``: an observation at the
prediction time is used, nothing after it.
"""

from __future__ import annotations

import numpy as np


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
