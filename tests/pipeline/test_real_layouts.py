"""``dvc repro`` to a registered model on files shaped like real layouts, with params only.

Repository 1: a PhysioNet/CinC 2019 PSV directory (every column, SepsisLabel, no anchors:
relative time), FHIR ndjson with every Observation status, HL7 v2 ORU^R01 messages, a
patients and an outcomes table. Repository 2: a one-row-per-patient cohort CSV with
unit-less, categorical, non-vocabulary numeric and censored columns. Both run the project's
real dvc.yaml with real DVC and MLflow; the only changes are params (and, for repository 1,
the vocabulary's ``include`` line that enables the PhysioNet entries).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.ingest.test_formats import HL7, PSV_COLUMNS, PSV_VALUES, fhir_every_status

ROOT = Path(__file__).resolve().parents[2]
COPY = [
    "dvc.yaml",
    "config",
    "core",
    "ingest",
    "simulate",
    "features",
    "models",
    "serving",
    "monitoring",
    "pipelines",
    "governance",
    ".dvcignore",
]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def _repo(tmp: Path, params_update, write_data) -> tuple[Path, dict[str, str]]:  # type: ignore[no-untyped-def]
    repo = tmp / "repo"
    repo.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update({"cv_folds": 0, "min_child_samples": 10, "n_estimators": 60})
    params["evaluate"].update({"bootstrap_reps": 10, "subgroup_bootstrap_reps": 10})
    params["ingest"]["missing_consent"] = "include"  # de-identified test data, no consent table
    params_update(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text(
        "/data\n/artifacts\n/mlruns.db\n/mlartifacts\n/logs\n/workspace\n"
    )
    write_data(repo / "data", repo)
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlruns.db",
        "VITALRISK_AUDIT_LOG": str(repo / "logs" / "audit.jsonl"),
        "VITALRISK_PREDICTION_LOG": str(repo / "logs" / "predictions.sqlite"),
        "VITALRISK_PSEUDONYM_KEY": "layout-test-key",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "DVC_NO_ANALYTICS": "1",
    }
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
        [sys.executable, "-m", "dvc", "add", "-q", "data"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "data"],
        [sys.executable, "-m", "dvc", "repro"],
    ):
        _run(cmd, repo, env)
    return repo, env


# -- repository 1: PSV + FHIR + HL7 -------------------------------------------------------------


def _psv_files(d: Path, rng: np.random.Generator) -> None:
    d.mkdir(parents=True)
    for i in range(60):
        onset = int(rng.integers(10, 22)) if i % 3 == 0 else 10**6  # SepsisLabel from here
        rows = []
        for h in range(1, 31):
            vals = list(PSV_VALUES)
            sick = h >= onset - 6
            vals[0] = f"{rng.normal(112 if sick else 80, 6):.0f}"  # HR
            vals[6] = f"{rng.normal(27 if sick else 16, 2):.0f}"  # Resp
            vals[1] = f"{min(rng.normal(92 if sick else 97, 1.5), 100):.0f}"  # O2Sat
            for j in range(8, 34):  # labs: mostly absent, as in the real data
                if rng.random() > 0.1:
                    vals[j] = "NaN"
            rows.append(
                "|".join([*vals, "67", str(i % 2), "1", "0", "-3.5", str(h), str(int(h >= onset))])
            )
        (d / f"p{i:06d}.psv").write_text(PSV_COLUMNS + "\n" + "\n".join(rows) + "\n")


def _ward_files(data: Path, rng: np.random.Generator) -> None:
    start = pd.Timestamp("2026-01-04T00:00:00Z")
    pats, res, outs = [], [], []
    for i in range(12):
        pid = f"MRN-{500 + i}"
        sick = i % 3 == 0
        pats.append(
            f"{pid},ward,{60 + i},{'F' if i % 2 else 'M'},{start.isoformat()},{(start + pd.Timedelta(hours=60)).isoformat()}"
        )
        res.append({"resourceType": "Patient", "id": pid, "gender": "female" if i % 2 else "male"})
        for h in range(0, 48, 2):
            t = (start + pd.Timedelta(hours=h)).isoformat().replace("+00:00", "Z")
            for code, val in (
                ("8867-4", rng.normal(115 if sick and h > 30 else 78, 5)),
                ("9279-1", rng.normal(26 if sick and h > 30 else 15, 2)),
            ):
                res.append(
                    {
                        "resourceType": "Observation",
                        "id": f"{pid}-{code}-{h}",
                        "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                        "subject": {"reference": f"Patient/{pid}"},
                        "effectiveDateTime": t,
                        "valueQuantity": {
                            "value": round(float(val)),
                            "unit": "/min",
                            "code": "/min",
                        },
                    }
                )
        if sick:
            outs.append(f"{pid},{(start + pd.Timedelta(hours=44)).isoformat()},icu_transfer")
    for r in fhir_every_status():  # every status, for patient MRN-000010
        res.append(r)
    pats.append(
        f"MRN-000010,ward,70,F,{start.isoformat()},{(start + pd.Timedelta(hours=60)).isoformat()}"
    )
    pats.append(
        f"MRN-000020,ward,76,F,{start.isoformat()},{(start + pd.Timedelta(hours=60)).isoformat()}"
    )
    (data / "fhir").mkdir()
    (data / "fhir" / "Observation.ndjson").write_text("\n".join(json.dumps(r) for r in res) + "\n")
    (data / "feed.hl7").write_text(HL7)
    (data / "patients.csv").write_text(
        "patient_id,setting,age,sex,followup_start,followup_end\n" + "\n".join(pats) + "\n"
    )
    (data / "outcomes.csv").write_text("patient_id,time,event\n" + "\n".join(outs) + "\n")


def _observation_params(p: dict) -> None:
    p["features"]["prediction_times"] = {
        "icu": {"mode": "cadence", "every_hours": 1},
        "ward": {"mode": "cadence", "every_hours": 2},
    }
    p["features"]["labels"]["horizon_hours"] = {"icu": 6, "ward": 24}
    p["features"]["labels"]["event_types"] = ["sepsis", "icu_transfer"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    def data(d: Path, repo: Path) -> None:
        rng = np.random.default_rng(12)
        _psv_files(d / "training", rng)
        _ward_files(d, rng)
        v = repo / "config" / "vocabulary.yaml"
        v.write_text(v.read_text().replace("include: []", "include: [physionet2019.yaml]"))

    return _repo(tmp_path_factory.mktemp("layouts"), _observation_params, data)


def test_layouts_reach_a_registered_model(layouts: tuple[Path, dict[str, str]]) -> None:
    repo, _ = layouts
    report = json.loads((repo / "reports" / "ingest.json").read_text())
    t = report["totals"]
    assert report["balanced"]
    assert (
        t["read"]
        == t["accepted"]
        + t["quarantined"]
        + t["consent_excluded"]
        + t["duplicates"]
        + t["unmapped"]
    )
    assert (
        report["unmapped"] == {"99999-0 (unmapped code)": 0}
        or report["unmapped"]["99999-9 (unmapped code)"] == 1
    )
    formats = {f["format"] for f in report["files"].values()}
    assert {"psv", "fhir_ndjson", "hl7v2", "patients", "outcomes"} <= formats
    q = pd.read_parquet(repo / "artifacts" / "quarantine" / "quarantine.parquet")
    reasons = " | ".join(q["reason"])
    for needle in (
        "status entered-in-error",
        "status cancelled",
        "superseded",
        "data absent",
        "OBX-11 status 'W'",
    ):
        assert needle in reasons
    obs = pd.read_parquet(repo / "artifacts" / "observations" / "observations.parquet")
    assert obs["code"].astype(str).nunique() >= 36  # the PhysioNet columns reached the output
    outcomes = pd.read_parquet(repo / "artifacts" / "observations" / "outcomes.parquet")
    assert set(outcomes["event"]) == {"sepsis", "icu_transfer"}
    register = json.loads((repo / "reports" / "register.json").read_text())
    assert register["version"] and register["alias"] in ("champion", "challenger")
    card = (repo / "reports" / "model_card.md").read_text()
    assert "sepsis or icu transfer" in card and "icu: 6 h; ward: 24 h" in card
    assert "ICU transfer, rapid response" not in card


# -- repository 2: a one-row-per-patient cohort -------------------------------------------------


def _cohort_csv(d: Path, repo: Path) -> None:
    rng = np.random.default_rng(3)
    n = 400
    age = rng.normal(65, 12, n).round()
    apache = rng.normal(50, 15, n).round()
    dx = rng.choice(["cardiac", "sepsis", "respiratory", "other"], n)
    hazard = 0.002 * np.exp(0.04 * (age - 65) + 0.05 * (apache - 50) + 0.8 * (dx == "sepsis"))
    tte, cens = rng.exponential(1 / hazard), rng.uniform(60, 400, n)
    event = tte <= cens
    df = pd.DataFrame(
        {
            "patient_id": [f"SUBJ-{i:05d}" for i in range(n)],
            "index_time": (
                pd.Timestamp("2024-01-01T00:00:00Z")
                + pd.to_timedelta(rng.integers(0, 300, n), unit="D")
            ).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "setting": rng.choice(["ward", "icu"], n),
            "age": age,
            "sex": rng.choice(["F", "M"], n),
            "heart_rate": rng.normal(85, 15, n).round(),
            "resp_rate": rng.normal(19, 4, n).round(),
            "sbp": rng.normal(120, 20, n).round(),
            "glucose": rng.normal(130, 40, n).round(),  # no unit
            "apache_score": apache.astype(object),
            "diagnosis_group": dx,
            "event": np.where(event, "death", ""),
            "time_to_event_days": np.minimum(tte, cens).round(2),
            "event_observed": event.astype(int),
        }
    )
    df.loc[3, "apache_score"] = "n/a"
    d.mkdir()
    df.to_csv(d / "cohort.csv", index=False)


def _cohort_params(p: dict) -> None:
    p["ingest"]["wide_columns"]["glucose"] = {"code": "glucose", "unit": "mg/dL"}
    p["ingest"]["cohort_categorical"] = ["sex", "setting", "diagnosis_group"]
    p["train"].update(
        {
            "cohort_horizon_days": 180,
            "categorical_features": ["diagnosis_group"],
            "monotone_constraints": {},
        }
    )


@pytest.fixture(scope="module")
def cohort_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return _repo(tmp_path_factory.mktemp("cohort"), _cohort_params, _cohort_csv)


def test_cohort_reaches_a_registered_model(cohort_repo: tuple[Path, dict[str, str]]) -> None:
    repo, _ = cohort_repo
    report = json.loads((repo / "reports" / "ingest.json").read_text())
    assert report["balanced"] and report["totals"]["quarantined"] == 1  # apache_score "n/a"
    q = pd.read_parquet(repo / "artifacts" / "quarantine" / "quarantine.parquet")
    assert "cohort column 'apache_score'" in q["reason"].iloc[0]
    run = json.loads((repo / "artifacts" / "model" / "run.json").read_text())
    names = set(run["feature_names"])
    assert {"apache_score", "diagnosis_group", "glucose", "news2_total", "news2_partial"} <= names
    label = run["metadata"]["label"]
    assert label["horizon_days"] == 180 and label["excluded_censored_before_horizon"] > 0
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert 0.5 < metrics["model"]["auroc"] <= 1.0
    assert (repo / "reports" / "plots" / "importance.csv").is_file()  # SHAP on the cohort rows
    register = json.loads((repo / "reports" / "register.json").read_text())
    assert register["version"] and register["alias"] in ("champion", "challenger")
    card = (repo / "reports" / "model_card.md").read_text()
    assert "death within the label horizon (180 days after the index time)" in card
