"""`team up/down/status` on real processes: idempotent, stops only its own, clear problems."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ops import procs, stack
from ops.services import Postgres, mosquitto_binary
from ops.settings import TeamSettings
from tests.team.conftest import drop_database, pg_available, session_settings

pytestmark = pytest.mark.slow


def _states(result: stack.StackResult) -> dict[str, str]:
    return {s.name: s.state for s in result.services}


def _pids(result: stack.StackResult) -> dict[str, int | None]:
    return {s.name: s.pid for s in result.services}


def test_up_twice_then_down_stops_only_what_it_started(tmp_path):
    settings = session_settings(tmp_path / "team")
    only = ["postgres", "s3", "redis"] + (["mqtt"] if mosquitto_binary() else [])
    first = stack.up(settings, only)
    assert first.ok, first.problems
    states = _states(first)
    assert states["s3"] == "managed"
    if pg_available(settings.pg_url):
        assert states["postgres"] == "external"  # the machine's server: used, never stopped

    second = stack.up(settings, only)  # idempotent: nothing restarted
    assert second.ok, second.problems
    assert _pids(second) == _pids(first)

    # a pid file naming a live process that is not the one recorded (pid reuse) is not ours
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (settings.state_dir / "run" / "stray.pid.json").write_text(
            json.dumps({"pid": stray.pid, "create_time": 1.0, "cmd": ["x"], "log": "x"})
        )
        stopped = stack.down(settings)
        assert stray.poll() is None, "team down signalled a process it did not start"
    finally:
        stray.kill()
        stray.wait()
    managed = {n for n, s in states.items() if s == "managed"}
    assert set(stopped) == managed
    after = stack.status(settings, only)
    assert {s.name for s in after.services if s.state == "stopped"} == managed
    for s in after.services:
        if s.name not in managed:
            assert s.healthy, f"{s.name} was not ours and must still answer"
    assert list((settings.state_dir / "run").glob("*.pid.json")) == []
    if pg_available(settings.pg_url):
        drop_database(settings.pg_url)


def test_a_port_held_by_another_program_is_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        settings = session_settings(tmp_path, s3_endpoint_url=f"http://127.0.0.1:{port}")
        result = stack.up(settings, ["s3"])
    assert not result.ok
    assert "in use by a program that is not s3" in result.problems[0]
    assert not (settings.state_dir / "run" / "s3.pid.json").exists()


def test_a_remote_service_is_checked_never_started(tmp_path):
    settings = session_settings(tmp_path, mlflow_url="http://mlflow.vitalrisk.invalid:5000")
    result = stack.up(settings, ["mlflow"])
    assert not result.ok
    assert "it is not local, so not started" in result.problems[0]
    assert _states(result)["mlflow"] == "stopped"


def test_unknown_service_name(tmp_path):
    with pytest.raises(ValueError, match="unknown service"):
        stack.up(session_settings(tmp_path), ["postgress"])


@pytest.fixture
def reachable_dir(tmp_path):
    """As root the server runs as 'postgres', which cannot enter pytest's 0700 temp folders."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="vitalrisk-test-pg-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_own_postgresql_from_the_server_binaries(reachable_dir):
    """Nothing answers on the configured port: initdb + postgres in the state folder."""
    port = procs.free_port()
    settings = session_settings(
        reachable_dir / "team", pg_url=f"postgresql://postgres@127.0.0.1:{port}/vitalrisk_mlflow"
    )
    if Postgres().missing(stack.context(settings)):
        pytest.skip("PostgreSQL server binaries not installed")
    try:
        result = stack.up(settings, ["postgres"])
        assert result.ok, result.problems
        (pg,) = result.services
        assert pg.state == "managed" and "database vitalrisk_mlflow created" in pg.detail
        assert (settings.state_dir / "postgres" / "data" / "PG_VERSION").is_file()
        again = stack.up(settings, ["postgres"])
        assert again.services[0].pid == pg.pid and "created" not in again.services[0].detail
    finally:
        assert stack.down(settings) == ["postgres"]
    assert not procs.port_open("127.0.0.1", port)
    assert stack.status(settings, ["postgres"]).services[0].state == "stopped"


def test_whole_stack_answers_and_the_cluster_computes(team_stack: TeamSettings):
    from distributed import Client

    result = stack.status(team_stack)
    assert result.ok, [(s.name, s.detail) for s in result.services if not s.healthy]
    states = _states(result)
    for name in ("s3", "mlflow", "dask-scheduler", "dask-worker-1", "dask-worker-2"):
        assert states[name] == "managed"
    with Client(team_stack.dask_scheduler, timeout="10s") as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6


def test_cli_status_json(team_stack: TeamSettings, tmp_path):
    env_file = tmp_path / "team.env"
    env_file.write_text(
        "".join(
            f"VITALRISK_{k.upper()}={v}\n" for k, v in team_stack.model_dump(mode="json").items()
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "team",
            "--env-file",
            str(env_file),
            "status",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["mlflow"]["healthy"] and rows["mlflow"]["url"] == team_stack.mlflow_url
