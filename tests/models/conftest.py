"""Synthetic feature frames in the ``artifacts/features/features.parquet`` format."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest


def pseudonym(i: int, salt: str = "t") -> str:
    return "p_" + hashlib.sha256(f"{salt}{i}".encode()).hexdigest()[:20]


def make_frame(
    n_patients: int = 300, rows_per_patient: int = 10, seed: int = 0, signal: float = 1.0
) -> pd.DataFrame:
    """Feature frame with a known risk structure: worse vitals -> higher risk.

    Rows are 4-hourly prediction times; ``label`` is drawn from a logistic model of the vitals,
    so a good model beats NEWS2 (which only sees coarse bands).
    """
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-01-01", tz="UTC")
    rows = []
    for i in range(n_patients):
        frail = rng.normal()
        age = float(np.clip(rng.normal(65, 15), 18, 99))
        sex_f = float(rng.integers(0, 2))
        t0 = start + pd.Timedelta(hours=int(rng.integers(0, 24 * 60)))
        for k in range(rows_per_patient):
            drift = frail * 0.5 + rng.normal(scale=0.7)
            rows.append(
                {
                    "patient_id": pseudonym(i),
                    "time": t0 + pd.Timedelta(hours=4 * k),
                    "setting": "ward" if i % 3 else "home",
                    "heart_rate": 80 + 12 * drift + rng.normal(scale=5),
                    "resp_rate": 16 + 3 * drift + rng.normal(scale=1.5),
                    "spo2": 96 - 1.5 * drift + rng.normal(scale=1),
                    "sbp": 125 - 10 * drift + rng.normal(scale=8),
                    "body_temp": 37 + 0.3 * drift + rng.normal(scale=0.2),
                    "age": age,
                    "sex_f": sex_f,
                    "_z": drift,
                }
            )
    f = pd.DataFrame(rows)
    news2 = (
        (f["resp_rate"] >= 21).astype(int) * 2
        + (f["resp_rate"] >= 25).astype(int)
        + (f["spo2"] <= 95).astype(int)
        + (f["spo2"] <= 93).astype(int)
        + (f["spo2"] <= 91).astype(int)
        + (f["heart_rate"] >= 91).astype(int)
        + (f["heart_rate"] >= 111).astype(int)
        + (f["heart_rate"] >= 131).astype(int)
        + (f["sbp"] <= 110).astype(int)
        + (f["sbp"] <= 100).astype(int)
        + (f["sbp"] <= 90).astype(int)
        + (f["body_temp"] >= 38.1).astype(int)
    )
    f["news2_total"] = news2.astype(float)
    logit = -3.2 + signal * (1.3 * f["_z"] + 0.02 * (f["age"] - 65))
    f["label"] = (rng.random(len(f)) < 1 / (1 + np.exp(-logit))).astype(int)
    f = f.drop(columns="_z")
    f.loc[rng.random(len(f)) < 0.03, "body_temp"] = np.nan  # missing values happen
    cols = ["patient_id", "time", "setting", "label"]
    return f[cols + [c for c in f.columns if c not in cols]]


@pytest.fixture(scope="session")
def frame() -> pd.DataFrame:
    return make_frame()


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory):
    """An initialised, empty MLflow SQLite DB; copying it saves the schema migrations (~3 s)."""
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("mlflow_template")
    uri = f"sqlite:///{d}/mlruns.db"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    MlflowClient(tracking_uri=uri).search_experiments()
    return d / "mlruns.db"


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch, mlflow_template_db):
    """A real MLflow SQLite store (fresh copy of the template) + audit log in tmp_path."""
    shutil.copy(mlflow_template_db, tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VITALRISK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("VITALRISK_MLFLOW_ARTIFACTS", raising=False)
    monkeypatch.setenv("USER", "tester")
    return tmp_path
