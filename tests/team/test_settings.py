"""team.env: one settings file, every key known, no secrets, usable by systemd and DVC alike."""

from __future__ import annotations

import configparser
import re

import pytest

from core.errors import UserError
from ops.settings import DEFAULT_ENV_FILE, REPO_ROOT, TeamSettings, client_env, load_settings


def test_team_env_loads_and_every_key_is_a_setting():
    settings = load_settings(DEFAULT_ENV_FILE)
    keys = [
        line.split("=", 1)[0]
        for line in DEFAULT_ENV_FILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert keys, "team.env holds no settings"
    fields = {f"VITALRISK_{name.upper()}" for name in TeamSettings.model_fields}
    assert set(keys) <= fields
    assert settings.mlflow_artifacts == f"s3://{settings.s3_bucket}/mlflow"


def test_team_env_has_no_inline_comments_or_secrets():
    """systemd's EnvironmentFile= keeps a trailing '# ...' in the value; no password anywhere."""
    for n, line in enumerate(DEFAULT_ENV_FILE.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, value = line.split("=", 1)
        assert "#" not in value, f"team.env:{n}: inline comment"
        assert not re.search(r"PASSWORD|SECRET|TOKEN|KEY$", key), f"team.env:{n}: {key}"
        assert not re.search(r"://[^/@]*:[^/@]*@", value), f"team.env:{n}: credentials in URL"


def test_dvc_remote_matches_the_settings():
    """The committed `team` remote is the bucket of team.env (they cannot drift apart)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / ".dvc" / "config")
    (section,) = [s for s in cfg.sections() if s.strip("'") == 'remote "team"']
    remote = cfg[section]
    assert remote["url"] == load_settings(DEFAULT_ENV_FILE).dvc_remote_url
    assert "default" not in cfg["core"], "team must not be the default remote (make demo)"


def test_password_in_a_url_is_refused(tmp_path):
    env = tmp_path / "team.env"
    env.write_text("VITALRISK_PG_URL=postgresql://mlflow:hunter2@db:5432/mlflow\n")
    with pytest.raises(UserError, match=r"VITALRISK_PG_URL|PG_URL.*environment"):
        load_settings(env)


def test_misspelt_key_is_named(tmp_path):
    env = tmp_path / "team.env"
    env.write_text("VITALRISK_MLFLOW_ULR=http://x:5000\n")
    with pytest.raises(UserError, match="VITALRISK_MLFLOW_ULR"):
        load_settings(env)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_settings(tmp_path / "nope.env")


def test_environment_wins_over_the_file(tmp_path, monkeypatch):
    env = tmp_path / "team.env"
    env.write_text("VITALRISK_MLFLOW_URL=http://file:5000\n")
    monkeypatch.setenv("VITALRISK_MLFLOW_URL", "http://env:5000")
    assert load_settings(env).mlflow_url == "http://env:5000"


def test_client_env_credentials():
    local = TeamSettings(s3_endpoint_url="http://127.0.0.1:9000")
    remote = TeamSettings(s3_endpoint_url="https://s3.eu-west-2.amazonaws.com")
    # the stand-in's dummy credentials only for a local endpoint and only when none are set
    assert client_env(local, {})["AWS_ACCESS_KEY_ID"] == "vitalrisk-standin"
    assert "AWS_ACCESS_KEY_ID" not in client_env(local, {"AWS_ACCESS_KEY_ID": "real"})
    assert "AWS_ACCESS_KEY_ID" not in client_env(remote, {})
    env = client_env(remote, {})
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == remote.s3_endpoint_url
    assert env["MLFLOW_TRACKING_URI"] == remote.mlflow_url


def test_team_tests_run_in_their_xdist_group(request: pytest.FixtureRequest) -> None:
    """Under ``make test`` (``-n 2 --dist loadgroup``) this module's tests carry the group
    suffix: they share the team stack and run on one worker (tests/conftest.py). A pytest or
    xdist upgrade that drops the grouping fails here instead of deadlocking CI."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not under --dist loadgroup")
    assert request.node.nodeid.endswith("@team"), request.node.nodeid
