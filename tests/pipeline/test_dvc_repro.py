"""Pipeline test: ``dvc repro`` of the real dvc.yaml on a tiny simulated cohort.

Runs in a temporary git repository with a copy of the project's pipeline definition, code
and configuration, real DVC, real MLflow (SQLite store in the temp dir) and the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("repo")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # tiny and quick, but the same stages and code
    params["simulate"]["n_patients"] = 80
    params["simulate"]["event_rate"] = 0.25
    params["train"]["cv_folds"] = 0
    params["evaluate"]["bootstrap_reps"] = 20
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text(
        "/data\n/artifacts\n/mlruns.db\n/mlartifacts\n/logs\n/workspace\n"
    )

    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlruns.db",
        "VITALRISK_AUDIT_LOG": str(repo / "logs" / "audit.jsonl"),
        "VITALRISK_PREDICTION_LOG": str(repo / "logs" / "predictions.sqlite"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "DVC_NO_ANALYTICS": "1",
    }
    _run(["git", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo, env)
    _run(["vitalrisk", "simulate", "--out", "data", "--params", "params.yaml"], repo, env)
    _run([sys.executable, "-m", "dvc", "add", "-q", "data"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny cohort"], repo, env)
    _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    return repo, env


def test_repro_produces_registered_model_and_metrics(repo: tuple[Path, dict[str, str]]) -> None:
    path, env = repo
    ingest = json.loads((path / "reports" / "ingest.json").read_text())
    assert ingest, "ingest report is empty"
    metrics = json.loads((path / "reports" / "metrics.json").read_text())
    flat = json.dumps(metrics)
    assert "auroc" in flat.lower() and "news2" in flat.lower()
    register = json.loads((path / "reports" / "register.json").read_text())
    assert "champion" in json.dumps(register)
    assert (path / "artifacts" / "features" / "features.parquet").is_file()
    assert (path / "dvc.lock").is_file()

    shown = _run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], path, env)
    assert "metrics.json" in shown.stdout
    status = _run([sys.executable, "-m", "dvc", "status", "--json"], path, env)
    changed = {k for k in json.loads(status.stdout or "{}") if k != "monitor"}
    assert not changed, f"dvc status not clean after repro: {status.stdout}"


def test_param_change_reruns_only_affected_stages(repo: tuple[Path, dict[str, str]]) -> None:
    path, env = repo
    _run(["git", "add", "-A"], path, env)
    _run(["git", "commit", "-qm", "repro", "--allow-empty"], path, env)
    out = _run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "train.learning_rate=0.1"], path, env
    )
    text = out.stdout + out.stderr
    assert "Running stage 'train'" in text
    assert "Running stage 'ingest'" not in text and "Running stage 'features'" not in text
