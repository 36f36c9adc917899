"""NEWS2 (Royal College of Physicians, 2017) sub-scores and total from the latest values.

The chart is defined on charted resolution: integers for respiration rate, SpO2, systolic BP
and pulse, one decimal for temperature. Values are rounded half up to that resolution before
banding, so 90.4/min scores as 90 and 90.5/min as 91.

Missing parameters (never measured or older than ``news2.max_age_hours``) score 0 in the total
(as on a paper chart with a blank row) and are counted in ``news2_n_missing``; their sub-score
column is NaN. Missing oxygen counts as air, missing consciousness as alert.
"""

from __future__ import annotations

import numpy as np

#: NEWS2 parameter -> vocabulary key
NEWS2_CODES = {
    "rr": "resp_rate",
    "spo2": "spo2",
    "o2": "o2_support",
    "sbp": "sbp",
    "hr": "heart_rate",
    "temp": "body_temp",
    "consciousness": "consciousness",
}


def _round_half_up(x: np.ndarray, decimals: int = 0) -> np.ndarray:
    f = 10.0**decimals
    return np.floor(np.asarray(x, dtype=np.float64) * f + 0.5 + 1e-9)


_BANDS: dict[tuple[tuple[float, ...], tuple[float, ...]], tuple[np.ndarray, np.ndarray]] = {}


def _band(x: np.ndarray, uppers: list[float], scores: list[float]) -> np.ndarray:
    """Score of the first band whose inclusive upper bound is >= x (last score above all)."""
    key = (tuple(uppers), tuple(scores))
    arrays = _BANDS.get(key)
    if arrays is None:  # the chart as arrays, once (serving scores a few rows per call)
        arrays = _BANDS.setdefault(
            key, (np.asarray(uppers, dtype=np.float64), np.asarray(scores, dtype=np.float64))
        )
    ups, scs = arrays
    out = scs[np.minimum(np.searchsorted(ups, x, side="left"), len(scs) - 1)]
    return np.where(np.isnan(x), np.nan, out)


def score_resp_rate(rr: np.ndarray) -> np.ndarray:
    # <=8: 3 | 9-11: 1 | 12-20: 0 | 21-24: 2 | >=25: 3
    return _band(_round_half_up(rr), [8, 11, 20, 24], [3, 1, 0, 2, 3])


def score_spo2_scale1(spo2: np.ndarray) -> np.ndarray:
    # <=91: 3 | 92-93: 2 | 94-95: 1 | >=96: 0
    return _band(_round_half_up(spo2), [91, 93, 95], [3, 2, 1, 0])


def score_spo2_scale2(spo2: np.ndarray, on_oxygen: np.ndarray) -> np.ndarray:
    """Scale 2 (target 88-92 %, hypercapnic respiratory failure).

    <=83: 3 | 84-85: 2 | 86-87: 1 | 88-92: 0 | >=93 on air: 0 |
    93-94 on oxygen: 1 | 95-96 on oxygen: 2 | >=97 on oxygen: 3
    """
    s = _round_half_up(spo2)
    low = _band(s, [83, 85, 87, 92], [3, 2, 1, 0, 0])
    high_o2 = _band(s, [94, 96], [1, 2, 3])
    oxy = np.asarray(on_oxygen, dtype=np.float64) > 0.5
    return np.where(np.isnan(s), np.nan, np.where((s >= 93) & oxy, high_o2, low))


def score_oxygen(o2: np.ndarray) -> np.ndarray:
    # oxygen: 2 | air: 0
    o = np.asarray(o2, dtype=np.float64)
    return np.where(np.isnan(o), np.nan, np.where(o > 0.5, 2.0, 0.0))


def score_sbp(sbp: np.ndarray) -> np.ndarray:
    # <=90: 3 | 91-100: 2 | 101-110: 1 | 111-219: 0 | >=220: 3
    return _band(_round_half_up(sbp), [90, 100, 110, 219], [3, 2, 1, 0, 3])


def score_heart_rate(hr: np.ndarray) -> np.ndarray:
    # <=40: 3 | 41-50: 1 | 51-90: 0 | 91-110: 1 | 111-130: 2 | >=131: 3
    return _band(_round_half_up(hr), [40, 50, 90, 110, 130], [3, 1, 0, 1, 2, 3])


def score_temperature(temp: np.ndarray) -> np.ndarray:
    # <=35.0: 3 | 35.1-36.0: 1 | 36.1-38.0: 0 | 38.1-39.0: 1 | >=39.1: 2  (in tenths)
    return _band(_round_half_up(temp, 1), [350, 360, 380, 390], [3, 1, 0, 1, 2])


def score_consciousness(acvpu: np.ndarray) -> np.ndarray:
    # alert (0): 0 | new confusion, voice, pain, unresponsive (1-4): 3
    a = np.asarray(acvpu, dtype=np.float64)
    return np.where(np.isnan(a), np.nan, np.where(a >= 0.5, 3.0, 0.0))


def news2_scores(latest: dict[str, np.ndarray], scale2: np.ndarray) -> dict[str, np.ndarray]:
    """Sub-scores, total and missing count from latest values per NEWS2 parameter.

    ``latest`` maps the keys of :data:`NEWS2_CODES` to arrays (NaN = not measured);
    ``scale2`` is a boolean array selecting SpO2 scale 2.
    """
    m = len(scale2)
    nan = np.full(m, np.nan)
    get = {k: np.asarray(latest.get(k, nan), dtype=np.float64) for k in NEWS2_CODES}
    o2 = get["o2"]
    on_oxygen = np.where(np.isnan(o2), 0.0, o2)
    spo2 = np.where(
        np.asarray(scale2, dtype=bool),
        score_spo2_scale2(get["spo2"], on_oxygen),
        score_spo2_scale1(get["spo2"]),
    )
    sub = {
        "news2_rr": score_resp_rate(get["rr"]),
        "news2_spo2": spo2,
        "news2_o2": score_oxygen(o2),
        "news2_sbp": score_sbp(get["sbp"]),
        "news2_hr": score_heart_rate(get["hr"]),
        "news2_temp": score_temperature(get["temp"]),
        "news2_consciousness": score_consciousness(get["consciousness"]),
    }
    stacked = np.vstack(list(sub.values())) if m else np.zeros((len(sub), 0))
    out = dict(sub)
    out["news2_total"] = np.nansum(stacked, axis=0) if m else np.zeros(0)
    out["news2_n_missing"] = np.isnan(stacked).sum(axis=0).astype(np.float64)
    out["news2_spo2_scale"] = np.where(np.asarray(scale2, dtype=bool), 2.0, 1.0)
    return out
