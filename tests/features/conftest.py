"""Shared fixtures for the feature tests: config, vocabulary and a small synthetic cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.vocabulary import Vocabulary, load_vocabulary
from features.config import FeaturesConfig

T0 = pd.Timestamp("2026-01-05T00:00:00Z")


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return load_vocabulary()


@pytest.fixture(scope="session")
def config() -> FeaturesConfig:
    return FeaturesConfig()


def make_cohort(
    n_patients: int = 12, days: float = 10.0, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Irregular ward and home vitals, wearable steps/sleep, some labs, a few events."""
    rng = np.random.default_rng(seed)
    obs = []
    pats = []
    outs = []
    for i in range(n_patients):
        pid = f"p_{i:020x}"
        setting = "ward" if i % 2 == 0 else "home"
        start = T0 + pd.Timedelta(hours=float(rng.integers(0, 48)))
        end = start + pd.Timedelta(days=days * float(rng.uniform(0.5, 1.0)))
        span_s = (end - start).total_seconds()
        for code, n, lo, hi in [
            ("heart_rate", 300, 40, 140),
            ("resp_rate", 80, 6, 30),
            ("spo2", 120, 82, 100),
            ("sbp", 60, 80, 230),
            ("body_temp", 40, 34.5, 40.0),
            ("o2_support", 20, 0, 1),
            ("consciousness", 15, 0, 4),
            ("steps", 200, 0, 400),
            ("sleep_duration", int(days), 3, 9),
            ("lactate", 5, 0.5, 6),
        ]:
            k = int(rng.integers(max(1, n // 3), n + 1))
            secs = np.sort(rng.uniform(-3 * 86400, span_s, size=k)).round()
            vals = rng.uniform(lo, hi, size=k)
            if code in ("o2_support", "consciousness", "steps"):
                vals = np.round(vals)
            obs.append(
                pd.DataFrame(
                    {
                        "patient_id": pid,
                        "time": start + pd.to_timedelta(secs, unit="s"),
                        "code": code,
                        "value": vals,
                        "source": setting,
                    }
                )
            )
        pats.append(
            {
                "patient_id": pid,
                "setting": setting,
                "age": float(rng.integers(20, 95)),
                "sex": "F" if rng.random() < 0.5 else "M",
                "cm_copd": int(rng.random() < 0.3),
                "cm_heart_failure": int(rng.random() < 0.2),
                "spo2_scale2": int(rng.random() < 0.2),
                "followup_start": start,
                "followup_end": end,
                "consent_care": True,
                "consent_model_training": True,
                "consent_research": True,
            }
        )
        if rng.random() < 0.5:
            outs.append(
                {
                    "patient_id": pid,
                    "time": start + pd.Timedelta(seconds=float(rng.uniform(0.3, 1.0) * span_s)),
                    "event": str(rng.choice(["icu_transfer", "rapid_response", "death"])),
                }
            )
    o = pd.concat(obs, ignore_index=True)
    o["time"] = o["time"].dt.as_unit("ns")
    o = o.sort_values(["patient_id", "time", "code"], kind="stable").reset_index(drop=True)
    p = pd.DataFrame(pats)
    for c in ("followup_start", "followup_end"):
        p[c] = pd.to_datetime(p[c], utc=True).dt.as_unit("ns")
    out = pd.DataFrame(outs, columns=["patient_id", "time", "event"])
    out["time"] = pd.to_datetime(out["time"], utc=True).dt.as_unit("ns")
    return o, p, out


@pytest.fixture(scope="session")
def cohort() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return make_cohort()
