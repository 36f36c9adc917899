"""DVC remote on the object store: push from one clone, a second clone only pulls and is current."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ops import stack
from ops.services import s3_client
from ops.settings import TeamSettings
from tests.pipeline.test_dvc_repro import COPY  # the project's files a pipeline copy needs

pytestmark = pytest.mark.slow

STEP = """import csv, sys
rows = list(csv.DictReader(open("data/raw.csv")))
with open("out/doubled.csv", "w") as fh:
    fh.write("patient_id,value\\n")
    for r in rows:
        fh.write(f"{r['patient_id']},{2 * float(r['value'])}\\n")
"""


DVC_YAML = """stages:
  double:
    cmd: python step.py
    deps: [data, step.py]
    outs: [out/doubled.csv]
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _dvc(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env)


def _git(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@x", *args], cwd, env)


def test_push_from_one_clone_pull_into_another(team_stack: TeamSettings, team_env, tmp_path):
    env = {**team_env, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    _git(["init", "-q"], first, env)
    _dvc(["init", "-q"], first, env)
    (first / "data").mkdir()
    (first / "data" / "raw.csv").write_text("patient_id,value\np_1,1.5\np_2,4\n")
    (first / "step.py").write_text(STEP)
    (first / "out").mkdir()
    (first / "dvc.yaml").write_text(DVC_YAML)
    # the repository's remote definition, pointed at this session's bucket by the stack code
    prefix = f"s3://{team_stack.s3_bucket}/dvc-test-{uuid.uuid4().hex[:8]}"
    with (first / ".dvc" / "config").open("a") as fh:
        fh.write(f"['remote \"{stack.DVC_REMOTE}\"']\n    url = {prefix}\n")
    assert stack.configure_dvc_remote(first, team_stack) == []
    _dvc(["add", "-q", "data"], first, env)
    _dvc(["repro", "-q"], first, env)
    (first / ".gitignore").write_text("/out\n")
    _git(["add", "-A"], first, env)
    _git(["commit", "-qm", "tiny pipeline"], first, env)
    _dvc(["push", "-r", stack.DVC_REMOTE], first, env)
    cached = {
        p.parent.name + p.name
        for p in (first / ".dvc" / "cache" / "files" / "md5").rglob("*")
        if p.is_file()
    }
    s3 = s3_client(team_stack, env)
    bucket, key_prefix = prefix.removeprefix("s3://").split("/", 1)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=key_prefix + "/").get("Contents", [])
    remote = {"".join(o["Key"].split("/")[-2:]) for o in listed}
    assert remote == cached and len(cached) >= 3  # raw.csv, the data/ manifest, doubled.csv

    _git(["clone", "-q", str(first), str(second)], tmp_path, env)
    assert not (second / ".dvc" / "config.local").exists()  # per clone, never in git
    assert stack.configure_dvc_remote(second, team_stack) == []
    _dvc(["pull", "-r", stack.DVC_REMOTE], second, env)
    assert (second / "out" / "doubled.csv").read_text() == "patient_id,value\np_1,3.0\np_2,8.0\n"
    status = _dvc(["status"], second, env)
    assert "Data and pipelines are up to date" in status
    repro = _dvc(["repro"], second, env)
    assert "didn't change, skipping" in repro and "Running stage" not in repro


# -- the project's own pipeline, on a tiny cohort ----------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
#: the stages `dvc repro register` runs (monitor is always_changed by design: it reads the log)
MODEL_STAGES = ["ingest", "features", "train", "evaluate", "register"]


def _tiny_params(path: Path) -> None:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["simulate"].update(n_patients=60, event_rate=0.3)
    params["train"].update(cv_folds=0, n_estimators=60, compiled_trees="none")
    params["evaluate"].update(bootstrap_reps=20, subgroup_bootstrap_reps=0)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _project_clone(root: Path, env: dict[str, str]) -> None:
    import shutil

    root.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    _tiny_params(root / "params.yaml")
    _git(["init", "-q"], root, env)
    _dvc(["init", "-q"], root, env)


def test_project_pipeline_pushed_then_pulled_into_a_clone_reruns_nothing(
    team_stack: TeamSettings, team_env, tmp_path
):
    """The demo's data and every model-stage output pushed to `team` from one clone; a second
    clone that only pulls is up to date (`dvc status`) and `dvc repro` runs no stage."""
    first, second = tmp_path / "first", tmp_path / "second"
    env = {
        **{k: v for k, v in team_env.items() if not k.startswith("DVC_")},
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
        # the stages run this checkout's code (identical to the copies DVC hashes as deps),
        # so the compiled feature kernels come from its numba cache (a fresh copy: ~14 s JIT)
        "PYTHONPATH": str(ROOT),
        "PATH": str(Path(sys.executable).parent) + ":" + team_env.get("PATH", ""),
        "VITALRISK_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    _project_clone(first, env)
    prefix = f"s3://{team_stack.s3_bucket}/dvc-project-{uuid.uuid4().hex[:8]}"
    with (first / ".dvc" / "config").open("a") as fh:
        fh.write(f"['remote \"{stack.DVC_REMOTE}\"']\n    url = {prefix}\n")
    assert stack.configure_dvc_remote(first, team_stack) == []
    _run(["vitalrisk", "simulate", "--out", "data", "--params", "params.yaml"], first, env)
    _dvc(["add", "-q", "data"], first, env)
    _dvc(["repro", "register"], first, env)
    _git(["add", "-A"], first, env)
    _git(["commit", "-qm", "tiny cohort, reproduced"], first, env)
    pushed = _dvc(["push", "-r", stack.DVC_REMOTE], first, env)
    assert "pushed" in pushed

    _git(["clone", "-q", str(first), str(second)], tmp_path, env)
    assert stack.configure_dvc_remote(second, team_stack) == []
    _dvc(["pull", "-r", stack.DVC_REMOTE], second, env)
    for out in (
        "artifacts/observations/observations.parquet",
        "artifacts/features/features.parquet",
    ):
        assert (second / out).read_bytes() == (first / out).read_bytes(), out
    assert (second / "reports" / "register.json").is_file()
    import json

    status = json.loads(_dvc(["status", "--json"], second, env) or "{}")
    assert set(status) <= {"monitor"}, f"dvc status after pull: {status}"
    repro = _dvc(["repro", "register"], second, env)
    assert "Running stage" not in repro, repro
    for stage in MODEL_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro, repro
