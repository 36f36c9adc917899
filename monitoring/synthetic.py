"""Synthetic feature frames and drifted variants, for testing the monitor like a model.

The frames mimic the feature matrix of docs/contracts.md (``<code>_<stat>_<window>h`` names,
``setting``, ``age``, ``sex_f``, ``news2_total``) with a latent severity that correlates the
vitals and drives a risk score, so that the monitor's behaviour (alarm on the drifted
variants, silence on fresh samples) can be measured without the whole pipeline.
The drifts are the simulator's (``vitalrisk simulate --drift KIND``), applied at feature level.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DRIFT_KINDS = ("none", "hr_offset", "older", "spo2_missing")

#: code -> (mean at rest, sd between patients, change per unit severity)
_VITALS = {
    "heart_rate": (78.0, 11.0, 14.0),
    "resp_rate": (16.0, 2.5, 4.0),
    "spo2": (96.0, 1.6, -3.0),
    "sbp": (128.0, 16.0, -12.0),
    "dbp": (76.0, 10.0, -6.0),
    "body_temp": (36.9, 0.35, 0.5),
}
_LEVEL_STATS = ("mean", "min", "max")
#: these statistics carry the level of a code (a device offset moves them)
LEVEL_TOKENS = ("last", "mean", "min", "max")


def feature_frame(
    n: int,
    seed: int,
    drift: str = "none",
    extra_features: int = 0,
    home_fraction: float = 0.5,
    codes: tuple[str, ...] | None = None,
    windows: tuple[int, ...] = (4, 24, 72),
) -> pd.DataFrame:
    """``n`` rows of features (plus ``probability`` and ``label``) with an optional drift.

    ``codes`` limits the vitals (fewer columns keep tests fast); heart rate and SpO2 are
    always included because the drifts act on them.
    """
    vitals = {
        c: v for c, v in _VITALS.items() if codes is None or c in {*codes, "heart_rate", "spo2"}
    }
    if drift not in DRIFT_KINDS:
        raise ValueError(f"drift {drift!r}: expected one of {DRIFT_KINDS}")
    rng = np.random.default_rng(seed)
    home = rng.random(n) < home_fraction
    age = np.clip(rng.normal(np.where(home, 60, 69), 15), 18, 97)
    if drift == "older":
        age = np.minimum(age + 12.0, 99.0)
    severity = np.clip(rng.gamma(1.2, 0.35, n) + (age - 65) / 120, 0, None)
    cols: dict[str, np.ndarray] = {
        "setting": np.where(home, "home", "ward"),
        "age": age.round(),
        "sex_f": (rng.random(n) < 0.5).astype(float),
        "cm_copd": (rng.random(n) < 0.12 + 0.002 * (age - 60).clip(0)).astype(float),
    }
    for code, (mu, sd, k) in vitals.items():
        level = mu + k * severity + rng.normal(0, sd, n)
        if code == "heart_rate" and drift == "hr_offset":
            level = level + 3.0 * home  # wearable firmware reads 3 bpm high
        spread = np.abs(rng.normal(sd * 0.3, sd * 0.1, n))
        cols[f"{code}_last"] = level + rng.normal(0, spread)
        for w in windows:
            noise = rng.normal(0, sd * 0.15, n)
            cols[f"{code}_mean_{w}h"] = level + noise
            cols[f"{code}_min_{w}h"] = level + noise - spread * np.sqrt(w) * 0.5
            cols[f"{code}_max_{w}h"] = level + noise + spread * np.sqrt(w) * 0.5
            cols[f"{code}_std_{w}h"] = spread * (1 + rng.normal(0, 0.1, n))
            rate = np.where(home, 6.0, 0.25) if code in {"heart_rate", "spo2"} else np.full(n, 0.25)
            if code == "spo2" and drift == "spo2_missing":
                rate = np.where(home, rate * 0.4, rate)
            cols[f"{code}_count_{w}h"] = rng.poisson(rate * w).astype(float)
    for i in range(extra_features):
        cols[f"lab_x{i}_mean_24h"] = rng.normal(severity * (i % 3), 1.0, n)
    df = pd.DataFrame(cols)
    for col in df.columns:  # SpO2 cannot read above 100 %
        if col.startswith("spo2_") and "_std_" not in col and "_count_" not in col:
            df[col] = df[col].clip(upper=100.0)
    for code in vitals:  # no observation in a window -> statistics missing
        for w in windows:
            empty = df[f"{code}_count_{w}h"].to_numpy() == 0
            for stat in (*_LEVEL_STATS, "std"):
                df.loc[empty, f"{code}_{stat}_{w}h"] = np.nan
    if drift == "spo2_missing":  # fewer SpO2 readings: more empty windows, more missing last
        gone = home & (rng.random(n) < 0.5)
        df.loc[gone, "spo2_last"] = np.nan
    df["news2_total"] = np.clip(np.round(severity * 4 + rng.normal(0, 1, n)), 0, 20)
    z = -3.2 + 1.6 * severity + 0.02 * (df["heart_rate_last"].fillna(78) - 78) + 0.01 * (age - 65)
    df["probability"] = 1 / (1 + np.exp(-z))
    df["label"] = (rng.random(n) < df["probability"]).astype(int)
    return df


def prediction_log_frame(
    features: pd.DataFrame, start: str, seed: int, hours: float = 72.0
) -> pd.DataFrame:
    """Rows for ``monitoring.prediction_log.write_predictions`` from a feature frame."""
    rng = np.random.default_rng(seed)
    n = len(features)
    model_cols = [c for c in features.columns if c not in {"probability", "label"}]
    feats = features[model_cols]
    records = feats.to_dict(orient="records")
    offsets = np.sort(rng.uniform(0, hours * 3600, n))
    return pd.DataFrame(
        {
            "request_id": [f"r{seed}-{i}" for i in range(n)],
            "scored_at": pd.Timestamp(start, tz="UTC") + pd.to_timedelta(offsets, unit="s"),
            "patient_id": [f"p_{i % 997:020x}" for i in range(n)],
            "model_name": "vitalrisk-deterioration",
            "model_version": "1",
            "role": "champion",
            "probability": features["probability"].to_numpy(),
            "news2_total": features["news2_total"].to_numpy(),
            "features": records,
        }
    )
