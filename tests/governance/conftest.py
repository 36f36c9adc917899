"""Tiny hand-made cohorts for the governance tests (pseudonymised like ingest output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from governance.pseudonym import pseudonymise

TEST_KEY = b"governance-test-key"


def make_cohort(n: int = 120, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Observations, patients, outcomes in the ingest contract's shape."""
    rng = np.random.default_rng(seed)
    ids = [pseudonymise(f"MRN-{i:05d}", TEST_KEY) for i in range(n)]
    start = pd.Timestamp("2026-01-05", tz="UTC") + pd.to_timedelta(rng.integers(0, 30, n), unit="D")
    patients = pd.DataFrame(
        {
            "patient_id": ids,
            "setting": np.where(np.arange(n) % 2 == 0, "ward", "home"),
            "age": np.where(np.arange(n) % 3 == 0, 67.0, 72.0),  # two age bands: 60-69, 70-79
            "sex": np.where(np.arange(n) % 4 < 2, "F", "M"),
            "cm_copd": rng.integers(0, 2, n),
            "followup_start": start,
            "followup_end": start + pd.Timedelta(days=10),
            "consent_care": True,
            "consent_model_training": np.arange(n) % 10 != 0,
            "consent_research": np.arange(n) % 5 != 0,
        }
    )
    rows = []
    for pid, t0 in zip(ids, start, strict=True):
        for h in range(4):
            rows.append((pid, t0 + pd.Timedelta(hours=6 * h), "heart_rate", 80.0 + h, "ward"))
            rows.append((pid, t0 + pd.Timedelta(hours=6 * h), "spo2", 96.0, "ward"))
    obs = pd.DataFrame(rows, columns=["patient_id", "time", "code", "value", "source"])
    outcomes = pd.DataFrame(
        {"patient_id": ids[:5], "time": start[:5] + pd.Timedelta(days=2), "event": "icu_transfer"}
    )
    return obs, patients, outcomes


@pytest.fixture
def cohort_dir(tmp_path: Path) -> Path:
    d = tmp_path / "observations"
    d.mkdir()
    obs, patients, outcomes = make_cohort()
    obs.to_parquet(d / "observations.parquet", index=False)
    patients.to_parquet(d / "patients.parquet", index=False)
    outcomes.to_parquet(d / "outcomes.parquet", index=False)
    return d
