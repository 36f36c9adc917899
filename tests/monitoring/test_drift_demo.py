"""The drift demo: its own patients (no source id of the training cohort), no raw identifier
under reports/, its own Evidently project, and a real champion scoring it."""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from governance.pseudonym import get_key, pseudonymise
from monitoring import evidently_reports as er
from pipelines.cli import main
from tests.governance.leakscan import scan

pytestmark = pytest.mark.slow


@pytest.fixture
def champion(tmp_path, monkeypatch):
    """A registered champion trained on the training feature code's columns."""
    from tests.serving.factory import register_models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("VITALRISK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.chdir(tmp_path)
    models = register_models(tmp_path / "work", challenger=False)
    features = tmp_path / "features.parquet"
    models["frame"].to_parquet(features)
    (tmp_path / "params.yaml").write_text(
        (Path(__file__).resolve().parents[2] / "params.yaml").read_text()
    )
    return tmp_path, features


def test_drift_demo_uses_other_people_and_leaves_no_raw_ids(champion):
    root, features = champion
    argv = ["monitor", "--drift-demo", "older", "--demo-patients", "40", "--exit-zero"]
    argv += ["--features", str(features), "--params", "params.yaml", "--workspace", "ws"]
    assert main(argv) == 0
    out = root / "reports" / "monitoring_demo" / "older"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workspace"]["project"] == "vitalrisk-monitoring-demo"
    assert er.list_workspace_runs(root / "ws", "vitalrisk-monitoring") == []
    assert not (out / "raw").exists()
    # the demo's patients are numbered from MRN-900001: none shares a training cohort id
    demo_log = out / "predictions.sqlite"
    with closing(sqlite3.connect(demo_log)) as con:
        demo_ids = {r[0] for r in con.execute("SELECT DISTINCT patient_id FROM predictions")}
        settings = {r[0] for r in con.execute("SELECT DISTINCT setting FROM predictions")}
    assert settings <= {"ward", "home"} and settings
    key = get_key()
    training = {pseudonymise(f"MRN-{i:06d}", key) for i in range(1, 100_001)}
    assert demo_ids and not demo_ids & training
    # nothing under reports/ carries a raw source identifier
    raw = {f"MRN-{900_000 + i:06d}" for i in range(1, 41)} | {f"MRN-{i:06d}" for i in range(1, 41)}
    assert scan(root / "reports", raw) == []
    assert not [p for p in (root / "reports").rglob("*") if re.search(r"MRN-\d+", p.name)]
