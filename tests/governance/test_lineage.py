"""Lineage: a real (tiny) MLflow run and registered version, read back by `vitalrisk lineage`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from governance import lineage as L
from governance.audit import AuditLog
from pipelines.cli import main

FEATURE_DICT = {
    "features": [
        {
            "name": "heart_rate_last",
            "definition": "last HR",
            "unit": "/min",
            "window": "4h",
            "code": "heart_rate",
        },
        {
            "name": "news2_total",
            "definition": "NEWS2",
            "unit": "1",
            "window": "latest",
            "code": None,
        },
    ],
    "label": {"horizon_hours": 24},
    "params": {},
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git checkout with a data.dvc, like the project root."""
    r = tmp_path / "repo"
    r.mkdir()
    (r / "data.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 4242\n  nfiles: 7\n"
        "  hash: md5\n  path: data\n"
    )
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
        "HOME": str(tmp_path),
    }
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "data.dvc"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=r, check=True, env=env)
    return r


def test_collect_lineage_reads_git_and_dvc(repo: Path) -> None:
    rec = L.collect_lineage(
        params={"train": {"seed": 1}},
        feature_dictionary=FEATURE_DICT,
        consent={"purpose": "model_training", "patients_kept": 9, "patients_excluded": 1},
        repo=repo,
        key_fingerprint="k_abc",
    )
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert rec["git_commit"] == head and rec["git_dirty"] is False
    assert rec["data"]["md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert rec["params_hash"] == L.canonical_hash({"train": {"seed": 1}})
    tags = L.lineage_tags(rec)
    assert tags[L.TAG_DATA_DVC_MD5] == rec["data"]["md5"]
    assert tags[L.TAG_CONSENT_PURPOSE] == "model_training" and tags[L.TAG_CONSENT_EXCLUDED] == "1"
    (repo / "data.dvc").write_text("changed\n")
    assert L.collect_lineage(params={}, repo=repo)["git_dirty"] is True


def test_lineage_cli_on_real_mlflow_run(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VITALRISK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("VITALRISK_AUDIT_KEY", raising=False)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment(
        "lineage-test", artifact_location=(tmp_path / "mlartifacts").as_uri()
    )
    params = {"features": {"windows_hours": [1, 4]}, "train": {"seed": 7}}
    rec = L.collect_lineage(
        params=params,
        feature_dictionary=FEATURE_DICT,
        consent={"purpose": "model_training", "patients_kept": 90, "patients_excluded": 10},
        repo=repo,
        key_fingerprint="k_0123456789ab",
        extra={"ingest_consent": {"purpose": "model_training", "patients_excluded": 7}},
    )
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.set_tags(L.lineage_tags(rec))
        mlflow.log_dict(rec, L.LINEAGE_ARTIFACT)
        mlflow.log_dict(FEATURE_DICT, f"features/{L.FEATURE_DICTIONARY_ARTIFACT}")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("vr-test")
    mv = client.create_model_version(
        "vr-test", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias("vr-test", "champion", mv.version)
    AuditLog().append("lead", "promote", "models:/vr-test@champion", model_version=str(mv.version))

    assert main(["lineage", str(mv.version), "--name", "vr-test"]) == 0
    out = capsys.readouterr().out
    assert rec["git_commit"] in out
    assert "0123456789abcdef0123456789abcdef.dir" in out
    assert "purpose" in out and "model_training" in out and "90 / 10" in out
    assert "heart_rate_last (4h, /min)" in out and "seed: 7" in out
    assert "audit seq 1" in out and "promote" in out
    assert "purpose model_training: 7 patients excluded" in out
    assert "missing:" not in out

    assert main(["lineage", "champion", "--name", "vr-test", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == str(mv.version) and info["aliases"] == ["champion"]
    assert info["params_hash"] == L.canonical_hash(params)

    assert main(["lineage", "99", "--name", "vr-test"]) == 2
    assert "has no version '99'" in capsys.readouterr().err
