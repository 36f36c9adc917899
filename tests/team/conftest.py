"""Team-mode fixtures: one real stack per test session, on free ports, in a temp state folder.

The stack is the one ``make team-up`` starts (ops.stack), pointed at:
- the machine's PostgreSQL on 127.0.0.1:5432 when it answers (else one started from the
  server binaries), with a database of its own for this session, dropped at the end;
- a moto S3 stand-in, an MLflow server, a Dask scheduler with two workers: started here;
- a private Mosquitto with the team configuration (the machine's broker keeps only 1,000
  messages per offline session), or the configured broker when no ``mosquitto`` is installed;
- the machine's Redis when it answers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops import procs, stack
from ops.services import Postgres, mosquitto_binary, pg_maintenance_url
from ops.settings import TeamSettings, host_port, load_settings

PG_ENV = "VITALRISK_TEST_PG_URL"  # server + user for test databases (default: team.env's)


def _pg_base() -> str:
    return os.environ.get(PG_ENV) or load_settings().pg_url


def pg_available(url: str) -> bool:
    host, port = host_port(url, 5432)
    return procs.port_open(host, port)


def drop_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    from ops.services import pg_database

    with psycopg.connect(pg_maintenance_url(url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(pg_database(url))
            )
        )


def session_settings(root: Path, **overrides: object) -> TeamSettings:
    """Settings of a private stack: every port free, state under ``root``."""
    base = _pg_base().rsplit("/", 1)[0]
    pg_url = f"{base}/vitalrisk_test_{uuid.uuid4().hex[:10]}"
    fields: dict[str, object] = {
        "team_dir": root,
        "pg_url": pg_url,
        # the replicas' stores in the session's database (dropped with it)
        "serve_db_url": f"{pg_url}?schema=serve",
        "s3_endpoint_url": f"http://127.0.0.1:{procs.free_port()}",
        "s3_bucket": "vitalrisk-test",
        "mlflow_url": f"http://127.0.0.1:{procs.free_port()}",
        "dask_scheduler": f"tcp://127.0.0.1:{procs.free_port()}",
        "dask_workers": 2,
        "dask_worker_memory": "1GiB",
        "redis_url": load_settings().redis_url,
        "mqtt_url": (
            f"mqtt://127.0.0.1:{procs.free_port()}"
            if mosquitto_binary()
            else load_settings().mqtt_url
        ),
    }
    fields.update(overrides)
    return TeamSettings(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamSettings]:
    """The whole stack, up for the session; ``team down`` and the database dropped after."""
    root = tmp_path_factory.mktemp("team")
    settings = session_settings(root)
    if not pg_available(settings.pg_url) and Postgres().missing(stack.context(settings)):
        pytest.skip("no PostgreSQL answers and no server binaries to start one")
    result = stack.up(settings)
    try:
        assert result.ok, "team stack did not come up:\n" + "\n".join(result.problems)
        yield settings
    finally:
        stack.down(settings)
        if pg_available(settings.pg_url):
            drop_database(settings.pg_url)


@pytest.fixture(scope="session")
def team_env(team_stack: TeamSettings) -> dict[str, str]:
    """Environment a team-mode client runs with (URLs, stand-in credentials)."""
    return stack.child_env(team_stack)


@pytest.fixture
def team_client_env(team_stack: TeamSettings, monkeypatch: pytest.MonkeyPatch) -> TeamSettings:
    """This process pointed at the stack (MLflow, boto3, DVC) for one test."""
    from ops.settings import client_env

    for key, value in client_env(team_stack).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("VITALRISK_MLFLOW_ARTIFACTS", raising=False)
    return team_stack
