"""Prediction times and labels.

A prediction time is when the model would have been asked for a risk; its label says whether a
qualifying event followed within the setting's horizon. Times that cannot be labelled honestly
are excluded and counted by reason, never labelled negative:

- ``after_event``: at or after the patient's first qualifying event (the patient is no longer
  at risk of a *first* deterioration);
- ``outside_followup``: before follow-up start or after its end (censoring / end of monitoring);
- ``partial_horizon``: no event, but the horizon runs past the end of follow-up, so a later
  event could not have been seen;
- ``no_setting``: the patient's setting has no prediction-time or horizon configuration.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from features.config import FeaturesConfig

log = logging.getLogger(__name__)

HOUR_NS = 3_600_000_000_000
EXCLUSION_REASONS = ("after_event", "outside_followup", "partial_horizon", "no_setting")


def _ns(s: pd.Series | pd.Index) -> np.ndarray:
    """UTC nanoseconds since the epoch (NaT -> int64 min); no copy for ns-resolution input.

    Naive times are taken as UTC (the observation contract is timezone-aware UTC).
    """
    if not isinstance(s.dtype, pd.DatetimeTZDtype):
        s = pd.Series(pd.to_datetime(s, utc=True))
    arr = s.array
    if getattr(arr, "unit", "ns") != "ns":
        arr = arr.as_unit("ns")
    return np.asarray(arr.asi8)


def _unique_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_inverse=True)`` for strings with few distinct values: a hash
    pass and a sort of the distinct values instead of sorting every row (the settings of
    ~200 k prediction times: 50 ms -> 5 ms)."""
    codes, uniq = pd.factorize(np.asarray(a), use_na_sentinel=False)
    uniq = np.asarray(uniq)
    order = np.argsort(uniq, kind="stable")
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order))
    return uniq[order].astype(np.asarray(a).dtype), rank[codes]


def _from_ns(a: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(np.asarray(a, dtype=np.int64), unit="ns", utc=True))


def observation_spans(observations: pd.DataFrame) -> pd.DataFrame:
    """First and last observation time per patient (fallback for a missing follow-up)."""
    g = observations.groupby("patient_id", observed=True, sort=False)["time"]
    out = pd.DataFrame({"first": g.min(), "last": g.max()})
    out.index = out.index.astype(str)
    return out


def prediction_times(
    patients: pd.DataFrame, config: FeaturesConfig, observations: pd.DataFrame | None = None
) -> pd.DataFrame:
    """``patient_id``, ``time``, ``setting`` for every patient per the setting's mode.

    Follow-up start/end bound the times; where they are missing the first/last observation
    is used (``observations`` needed then, and for ``each_observation``).
    """
    pats = patients.reset_index(drop=True)
    pid = pats["patient_id"].astype(str).to_numpy()
    setting = (
        pats["setting"].astype(str).to_numpy() if "setting" in pats else np.full(len(pats), "")
    )
    start = _ns(pats["followup_start"]) if "followup_start" in pats else None
    end = _ns(pats["followup_end"]) if "followup_end" in pats else None
    nat = np.iinfo(np.int64).min
    if start is None:
        start = np.full(len(pats), nat)
    if end is None:
        end = np.full(len(pats), nat)
    start, end = start.copy(), end.copy()
    need_span = (start == nat) | (end == nat)
    if need_span.any():
        if observations is None:
            raise ValueError("patients without follow-up start/end need observations")
        spans = observation_spans(observations)
        first = pd.Series(_ns(spans["first"]), index=spans.index).reindex(pid).fillna(nat)
        last = pd.Series(_ns(spans["last"]), index=spans.index).reindex(pid).fillna(nat)
        start = np.where(start == nat, first.to_numpy(dtype=np.int64), start)
        end = np.where(end == nat, last.to_numpy(dtype=np.int64), end)
    # rows as (patient row, time): strings only at the end, per patient, not per time
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for name, pt in config.prediction_times.items():
        sel = np.flatnonzero((setting == name) & (start != nat) & (end != nat))
        if len(sel) == 0:
            continue
        step = round(pt.every_hours * HOUR_NS)
        offset = round(
            (pt.offset_hours if pt.offset_hours is not None else pt.every_hours) * HOUR_NS
        )
        first_t = start[sel] + offset
        if pt.mode == "once":
            ok = first_t <= end[sel]
            parts.append((sel[ok], first_t[ok]))
        elif pt.mode == "cadence":
            n = np.where(end[sel] >= first_t, (end[sel] - first_t) // step + 1, 0)
            rep = np.repeat(np.arange(len(sel)), n)
            k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            parts.append((sel[rep], first_t[rep] + k * step))
        else:  # each_observation
            if observations is None:
                raise ValueError("prediction_times mode each_observation needs observations")
            wanted = set(pid[sel])
            o = observations[observations["patient_id"].astype(str).isin(wanted)]
            ot = pd.DataFrame({"patient_id": o["patient_id"].astype(str), "_t": _ns(o["time"])})
            ot = ot.drop_duplicates()
            bounds = pd.DataFrame(
                {"patient_id": pid[sel], "_s": start[sel], "_e": end[sel], "_row": sel}
            )
            ot = ot.merge(bounds, on="patient_id")
            ot = ot[(ot["_t"] >= ot["_s"]) & (ot["_t"] <= ot["_e"])]
            parts.append((ot["_row"].to_numpy(dtype=np.intp), ot["_t"].to_numpy(np.int64)))
    if not parts:
        return pd.DataFrame(
            {
                "patient_id": pd.Series(dtype=str),
                "time": pd.Series(dtype="datetime64[ns, UTC]"),
                "setting": pd.Series(dtype=str),
            }
        )
    row = np.concatenate([r for r, _ in parts])
    tt = np.concatenate([t for _, t in parts]).astype(np.int64, copy=False)
    # each patient row's rank among the sorted distinct ids (equal ids share it)
    rank, _ = pd.factorize(pd.Series(pid, dtype=object), sort=True)
    codes = rank[row]
    order = np.lexsort((tt, codes))
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = (codes[order][1:] != codes[order][:-1]) | (tt[order][1:] != tt[order][:-1])
    sel_rows = order[keep]
    # the setting of an id is that of its first patient row
    _, first_row = np.unique(rank, return_index=True)
    return pd.DataFrame(
        {
            "patient_id": pid[row[sel_rows]],
            "time": _from_ns(tt[sel_rows]),
            "setting": setting[first_row[codes[sel_rows]]],
        }
    )


def label_times(
    times: pd.DataFrame,
    patients: pd.DataFrame,
    outcomes: pd.DataFrame,
    config: FeaturesConfig,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Labelled times (``label`` 0/1, ``horizon_hours``) and counts of excluded times by reason."""
    pats = patients.drop_duplicates("patient_id").set_index(patients["patient_id"].astype(str))
    pid = times["patient_id"].astype(str).to_numpy()
    t = _ns(times["time"])
    nat = np.iinfo(np.int64).min
    setting = (
        times["setting"].astype(str).to_numpy()
        if "setting" in times
        else pats["setting"].reindex(pid).astype(str).to_numpy()
    )

    at = pats.index.get_indexer(pid)  # each time's patient row (-1: not in the table)
    known = at >= 0

    def per_patient(col: str) -> np.ndarray:
        if col not in pats:
            return np.full(len(pid), nat)
        return np.where(known, _ns(pats[col])[at], nat)  # (missing -> NaT, as reindex)

    fstart, fend = per_patient("followup_start"), per_patient("followup_end")
    ev = outcomes
    if config.labels.event_types:
        ev = ev[ev["event"].astype(str).isin(config.labels.event_types)]
    first_ev = pd.Series(_ns(ev["time"]), index=ev["patient_id"].astype(str).to_numpy())
    first_ev = first_ev.groupby(level=0).min()
    fe = first_ev.reindex(pid).to_numpy(dtype="float64")
    has_ev = ~np.isnan(fe)
    fe_i = np.where(has_ev, fe, 0).astype(np.int64)

    names, inverse = _unique_inverse(setting)  # a few settings, many rows
    horizon_h = np.array(
        [config.labels.horizon_hours.get(str(s), np.nan) for s in names], dtype=np.float64
    )[inverse]
    no_setting = np.isnan(horizon_h) | ~np.isin(setting, list(config.prediction_times))
    h_ns = np.where(no_setting, 0, np.nan_to_num(horizon_h) * HOUR_NS).astype(np.int64)

    after_event = has_ev & (t >= fe_i)
    outside = ((fstart != nat) & (t < fstart)) | ((fend != nat) & (t > fend))
    positive = has_ev & (fe_i > t) & (fe_i <= t + h_ns)
    partial = ~positive & (fend != nat) & (t + h_ns > fend)

    reason = np.zeros(len(pid), dtype=np.int8)  # 0 = kept, else 1 + EXCLUSION_REASONS index
    for mask, name in (
        (partial, "partial_horizon"),
        (outside, "outside_followup"),
        (after_event, "after_event"),
        (no_setting, "no_setting"),
    ):
        reason[mask] = 1 + EXCLUSION_REASONS.index(name)  # later assignments take precedence
    keep = reason == 0
    n_reason = np.bincount(reason, minlength=1 + len(EXCLUSION_REASONS))
    counts = {r: int(n_reason[1 + i]) for i, r in enumerate(EXCLUSION_REASONS)}
    out = times.loc[keep, ["patient_id", "time"]].reset_index(drop=True)
    out["patient_id"] = out["patient_id"].astype(str)
    out["setting"] = setting[keep]
    out["label"] = positive[keep].astype(np.int64)
    out["horizon_hours"] = horizon_h[keep]
    return out, counts


def prevalence_by_setting(setting: np.ndarray, label: np.ndarray) -> dict[str, dict[str, float]]:
    """Rows, positives and prevalence per care setting (the stage report's ``by_setting``)."""
    # distinct values first, then their strings (what astype(str) gives row by row)
    codes, uniq = pd.factorize(np.asarray(setting, dtype=object), use_na_sentinel=False)
    names, inv_u = _unique_inverse(np.array([str(x) for x in uniq], dtype=str))
    inv = inv_u[codes]
    rows = np.bincount(inv, minlength=len(names))
    pos = np.bincount(inv, weights=np.asarray(label, dtype=np.float64), minlength=len(names))
    return {
        str(n): {"rows": int(r), "positives": int(p), "prevalence": float(p / r) if r else 0.0}
        for n, r, p in zip(names.tolist(), rows.tolist(), pos.tolist(), strict=True)
    }
