"""Pipeline tests: ``dvc repro`` and DVC experiments of the real dvc.yaml on a tiny cohort.

Runs in a temporary git repository with a copy of the project's pipeline definition, code,
configuration and ``.gitignore``, real DVC, real MLflow and the real CLI. No
``MLFLOW_TRACKING_URI``: the stages use the project's own store (``mlflow.db`` in the repo),
which is what ``--temp`` and queued experiments used to lose.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
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
    ".gitignore",
]
MODEL = "vitalrisk-deterioration"

pytestmark = pytest.mark.slow


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


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
    params["evaluate"]["subgroup_bootstrap_reps"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    bindir = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))},
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(repo),
        "VITALRISK_AUDIT_LOG": str(repo / "logs" / "audit.jsonl"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    _run(["git", "init", "-q"], repo, env)
    _run(_dvc("init", "-q"), repo, env)
    _run(_dvc("config", "core.analytics", "false"), repo, env)
    _run(["vitalrisk", "simulate", "--out", "data", "--params", "params.yaml"], repo, env)
    _run(_dvc("add", "-q", "data"), repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny cohort"], repo, env)
    _run(_dvc("repro"), repo, env)
    # the tiny model may fail the gate; a person makes version 1 the champion
    _run(["vitalrisk", "promote", "--version", "1", "--reason", "test baseline"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "repro"], repo, env)
    return repo, env


def _client(repo: Path):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(repo: Path) -> dict[str, dict[str, str]]:
    return {
        mv.version: dict(mv.tags) for mv in _client(repo).search_model_versions(f"name='{MODEL}'")
    }


def _champion(repo: Path) -> str:
    return str(_client(repo).get_model_version_by_alias(MODEL, "champion").version)


def _exp_metrics(repo: Path, env: dict[str, str]) -> dict[str, dict[str, object]]:
    """Experiment name -> its metrics as ``dvc exp show`` reads them (errors included)."""
    shown = json.loads(_run(_dvc("exp", "show", "--json"), repo, env).stdout)
    out = {}
    for base in shown:
        for exp in base.get("experiments") or []:
            rev = exp["revs"][0]
            out[rev["name"]] = rev["data"]["metrics"]
    return out


def test_repro_registers_a_model_with_readable_metrics(repo: tuple[Path, dict[str, str]]) -> None:
    path, env = repo
    register = json.loads((path / "reports" / "register.json").read_text())
    assert register["version"] == "1" and register["decision"] in {"promoted", "challenger"}
    assert (path / "mlflow.db").is_file() and not (path / "mlruns").exists()
    with closing(sqlite3.connect(path / "mlflow.db")) as con:
        (location,) = con.execute(
            "SELECT artifact_location FROM experiments WHERE name = 'vitalrisk'"
        ).fetchone()
    assert location == "mlartifacts/1", "artifact location must be relative to the project"
    # the run says where it came from
    run = _client(path).get_run(register["run_id"])
    head = _run(["git", "rev-parse", "HEAD~1"], path, env).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["git_dirty"] == "False", "dvc.lock edits are not a dirty checkout"
    assert run.info.run_name == f"repro@{head[:7]}"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {
        "features-train",
        "features-val",
        "features-test",
    }
    assert any(k.startswith("system/cpu") for k in run.data.metrics), "no system metrics"

    shown = json.loads(_run(_dvc("metrics", "show", "--json"), path, env).stdout)
    files = set(next(iter(shown.values()))["data"])
    assert files == {
        "reports/train_metrics.json",
        "reports/test_metrics.json",
        "reports/gate.json",
    }, files
    table = _run(_dvc("metrics", "show"), path, env).stdout
    assert len(table.splitlines()[0].split()) < 40, "dvc metrics show is not one readable table"
    status = _run(_dvc("status", "--json"), path, env)
    changed = {k for k in json.loads(status.stdout or "{}") if k != "monitor"}
    assert not changed, f"dvc status not clean after repro: {status.stdout}"


def test_experiments_leave_the_champion_alone_and_keep_their_metrics(
    repo: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, env = repo
    before = _champion(path)
    # workspace experiment: only the model stages re-run
    out = _run(_dvc("exp", "run", "-n", "ws-exp", "-S", "train.learning_rate=0.1"), path, env)
    text = out.stdout + out.stderr
    assert "Running stage 'train'" in text
    assert "Running stage 'ingest'" not in text and "Running stage 'features'" not in text
    assert "no alias, champion stays" in text
    # queued: run by a DVC queue worker in a temporary copy; meanwhile --temp: a throw-away
    # copy under .dvc/tmp/exps too (both on the two cores at once), each logging into the
    # project's own store
    _run(_dvc("exp", "run", "--queue", "-n", "queued-exp", "-S", "train.num_leaves=9"), path, env)
    _run(_dvc("queue", "start", "-j", "1"), path, env)
    try:
        _run(_dvc("exp", "run", "--temp", "-n", "temp-exp", "-S", "train.num_leaves=7"), path, env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = _run(_dvc("queue", "status"), path, env).stdout
            if "queued-exp" in status and ("Success" in status or "Failed" in status):
                break
            time.sleep(3)
        assert "Success" in status, (
            status + _run(_dvc("queue", "logs", "queued-exp"), path, env, ok=False).stdout
        )
    finally:
        _run(_dvc("queue", "stop", "--kill"), path, env, ok=False)

    assert _champion(path) == before, "an experiment moved champion"
    by_exp = {t.get("dvc.experiment"): (v, t) for v, t in _versions(path).items()}
    for name in ("ws-exp", "temp-exp", "queued-exp"):
        assert name in by_exp, f"{name}: no registered version in the project's store"
        version, tags = by_exp[name]
        assert not any(k.startswith(("champion.", "challenger.")) for k in tags)
        mv = _client(path).get_model_version(MODEL, version)
        assert not mv.aliases and f"DVC experiment {name}" in mv.description
        run = _client(path).get_run(mv.run_id)
        assert run.info.run_name.startswith(f"{name}@") and run.data.tags["dvc.experiment"] == name
        assert "test.model.auroc" in run.data.metrics  # evaluate logged into the same run
    # the temp copies' artifacts live in the project, loadable after the copies are gone
    # (artifact locations are relative to the project root, where MLflow's readers run)
    assert not list((path / ".dvc" / "tmp" / "exps").glob("**/mlflow.db"))
    monkeypatch.chdir(path)
    temp_run = _client(path).get_model_version(MODEL, by_exp["temp-exp"][0]).run_id
    arts = {a.path for a in _client(path).list_artifacts(temp_run)}
    assert {"lineage.json", "model_card.md", "evaluation"} <= arts

    metrics = _exp_metrics(path, env)
    for name in ("ws-exp", "temp-exp", "queued-exp"):
        shown = metrics[name]
        assert set(shown) >= {"reports/test_metrics.json", "reports/train_metrics.json"}
        for file, value in shown.items():
            assert "error" not in value, f"{name} {file}: {value}"
        assert shown["reports/gate.json"]["data"]["version"] == int(by_exp[name][0])
    diff = _run(_dvc("plots", "diff", "temp-exp", "queued-exp", "--json"), path, env)
    assert "ROC" in diff.stdout and "temp-exp" in diff.stdout and "queued-exp" in diff.stdout
