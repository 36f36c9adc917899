"""The synthetic cohort: deterministic bytes, every format, plausible rates, intended drifts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.cli import main
from simulate.cohort import simulate_cohort
from simulate.config import SimulateConfig

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _sim(out: Path, *extra: str) -> int:
    return main(
        ["simulate", "--out", str(out), "--n-patients", "10", "--params", str(PARAMS), *extra]
    )


def test_same_seed_same_bytes_and_every_format(tmp_path):
    assert _sim(tmp_path / "a", "--seed", "3") == 0
    assert _sim(tmp_path / "b", "--seed", "3") == 0
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b
    names = set(a)
    for f in (
        "patients.csv",
        "outcomes.csv",
        "ward_observations.csv",
        "home_observations.csv",
        "wearable_wide.csv",
        "fhir/Patient.ndjson",
        "fhir/Observation.ndjson",
        "psv/anchors.csv",
        "cohort.csv",
    ):
        assert f in names
    assert any(n.startswith("psv/MRN-") and n.endswith(".psv") for n in names)
    assert _sim(tmp_path / "c", "--seed", "4") == 0
    assert _digest(tmp_path / "c") != a


@pytest.fixture(scope="module")
def base() -> SimulateConfig:
    return SimulateConfig(n_patients=200, followup_days=(7, 8), seed=11)


@pytest.fixture(scope="module")
def cohort(base):
    return simulate_cohort(base)


def test_cohort_shape_and_rates(cohort):
    pats, obs, outs = cohort.patients, cohort.observations, cohort.outcomes
    rate = len(outs) / len(pats)
    assert 0.04 <= rate <= 0.18
    assert set(outs["event"]) <= {"icu_transfer", "rapid_response", "emergency_admission", "death"}
    ward = set(pats.loc[pats["setting"] == "ward", "patient_id"])
    codes_ward = set(obs.loc[obs["patient_id"].isin(ward), "code"])
    codes_home = set(obs.loc[~obs["patient_id"].isin(ward), "code"])
    assert {
        "resp_rate",
        "spo2",
        "o2_support",
        "sbp",
        "dbp",
        "heart_rate",
        "body_temp",
        "consciousness",
    } <= codes_ward
    assert {"heart_rate", "spo2", "sbp", "body_temp", "steps", "sleep_duration"} <= codes_home
    assert 0.8 < pats["consent_model_training"].mean() < 1.0
    # follow-up ends at the event for patients with one
    ends = pats.set_index("patient_id")["followup_end"]
    assert (ends.loc[outs["patient_id"]].to_numpy() == outs["time"].to_numpy()).all()
    assert obs["time"].min() >= pats["followup_start"].min()


def test_deterioration_is_visible_before_events(cohort):
    """Heart rate in the 12 h before an event is higher than the same patients' first day."""
    obs, outs = cohort.observations, cohort.outcomes
    hr = obs[obs["code"] == "heart_rate"].merge(outs, on="patient_id", suffixes=("", "_ev"))
    late = (
        hr[hr["time"] > hr["time_ev"] - pd.Timedelta(hours=12)]
        .groupby("patient_id")["value"]
        .mean()
    )
    first = hr.groupby("patient_id")["time"].transform("min")
    early = hr[hr["time"] < first + pd.Timedelta(hours=24)].groupby("patient_id")["value"].mean()
    diff = (late - early.reindex(late.index)).dropna()
    assert diff.median() > 3


@pytest.mark.parametrize("kind", ["hr_offset", "older", "spo2_missing"])
def test_drift_variants(base, cohort, kind):
    drifted = simulate_cohort(base.model_copy(update={"drift": kind}))
    p0, p1 = cohort.patients, drifted.patients
    home = set(p0.loc[p0["setting"] == "home", "patient_id"])

    def hr_home(c):
        o = c.observations
        return o[(o["code"] == "heart_rate") & o["patient_id"].isin(home)]

    if kind == "hr_offset":
        a, b = hr_home(cohort), hr_home(drifted)
        assert len(a) == len(b)
        assert np.mean(b["value"].to_numpy() - a["value"].to_numpy()) == pytest.approx(
            3.0, abs=0.05
        )
    elif kind == "older":
        assert p1["age"].mean() - p0["age"].mean() > 10
    else:

        def n_spo2(c):
            o = c.observations
            return int(((o["code"] == "spo2") & o["patient_id"].isin(home)).sum())

        assert n_spo2(drifted) < 0.6 * n_spo2(cohort)


def test_drift_cli_defaults_outside_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--n-patients", "3", "--drift", "older", "--params", str(PARAMS)]) == 0
    assert (tmp_path / "artifacts" / "drift" / "older" / "patients.csv").is_file()
    assert not (tmp_path / "data").exists()
