"""The reviewers' history view (``evidently ui``) and closing the loop (``dvc repro``)."""

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from monitoring import evidently_reports as er
from pipelines.monitor import retrain

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_evidently_ui_lists_the_project_with_its_dashboard_series(tmp_path):
    ws = tmp_path / "workspace"
    for day, level in enumerate([0, 1, 2]):
        snap = er.summary_snapshot(
            {
                "drift_share_percent": 10.0 * day,
                "drifted_features": float(day),
                "verdict_level": level,
                "predicted_risk_mean": 0.05,
            },
            timestamp=dt.datetime(2026, 11, 1 + day),
        )
        er.add_to_workspace(ws, "vitalrisk-monitoring", [snap])
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "evidently"), "ui", "--workspace", str(ws), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "DO_NOT_TRACK": "1"},
    )
    base = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        projects = None
        while time.monotonic() < deadline:
            try:
                projects = httpx.get(f"{base}/projects", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert projects is not None, "evidently ui did not answer"
        (project,) = [p for p in projects if p["name"] == "vitalrisk-monitoring"]
        pid = project["id"]
        snaps = httpx.get(f"{base}/projects/{pid}/snapshots", timeout=10).json()
        assert len(snaps) == 3
        dash = httpx.get(f"{base}/v2/dashboards/{pid}", timeout=10).json()
        titles = {p["title"] for p in dash["panels"]}
        assert {"Drifted features over time", "Verdict over time", "Predicted risk level"} <= titles
        # counters show whole numbers the verdict is made of, never a share rounded to 0
        counters = {
            p["title"] for p in dash["panels"] if p["plot_params"].get("plot_type") == "counter"
        }
        assert counters == {
            "Latest verdict (-1 insufficient data, 0 ok, 1 warn, 2 retrain)",
            "Drifted features (latest run)",
        }
        tab = dash["tabs"][0]["panels"]
        assert len(tab) == len(set(tab)) == len(dash["panels"])
        series = httpx.post(
            f"{base}/v2/snapshots/{pid}/data_series_batch",
            json={
                "series_filter": [
                    {
                        "metric": "evidently:metric_v2:MeanValue",
                        "metric_labels": {"column": "verdict_level"},
                        "tags": ["summary"],
                        "metadata": {},
                    }
                ]
            },
            timeout=10,
        ).json()
        assert series["series"][0]["values"] == [0.0, 1.0, 2.0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def dvc_repo(tmp_path):
    """A tiny DVC repo whose one stage counts the raw files under data/."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "a.csv").write_text("x\n1\n")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "add", "data", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(
        "stages:\n  count:\n    cmd: find data -type f | sort > files.txt\n"
        "    deps: [data]\n    outs: [files.txt]\n"
    )
    return repo


def test_retrain_adds_new_data_and_runs_dvc_repro(dvc_repo, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    (new / "outcomes.csv").write_text("patient_id,time,event\n")
    recorded = (dvc_repo / "data.dvc").read_text()
    dry = retrain(dvc_repo, str(new), "data", dry_run=True)
    assert "count" in dry.stdout
    assert not (dvc_repo / "files.txt").exists()  # --dry runs nothing
    assert not (dvc_repo / "data" / "feedback").exists()
    retrain(dvc_repo, str(new), "data", dry_run=False)
    files = (dvc_repo / "files.txt").read_text().split()
    assert "data/a.csv" in files
    assert any(f.startswith("data/feedback/") and f.endswith("outcomes.csv") for f in files)
    assert (dvc_repo / "data.dvc").read_text() != recorded  # the new data is re-recorded
    # nothing new: dvc repro finds the pipeline up to date
    again = retrain(dvc_repo, None, "data", dry_run=False)
    assert "up to date" in again.stdout.lower() or "didn't change" in again.stdout.lower()


def test_retrain_reports_a_failing_repro(tmp_path):
    from core.errors import UserError

    repo = tmp_path / "norepo"
    repo.mkdir()
    with pytest.raises(UserError, match="dvc repro failed"):
        retrain(repo, None, "data", dry_run=False)
