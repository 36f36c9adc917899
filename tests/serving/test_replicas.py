"""Serving replicas in team mode: two real ``vitalrisk serve`` processes on one PostgreSQL
prediction log and audit chain and one Redis rate limit (README, "Team mode").

Each test module run gets its own PostgreSQL schema (in database ``test`` of the machine's
server, or ``VITALRISK_TEST_PG_URL``) and its own Redis key prefix, both removed afterwards.
A burst goes to both replicas; one is killed with SIGKILL in the middle of it. Every request
answered 200 by either replica must have its prediction-log rows and its audit entry in the
database, and ``vitalrisk audit verify`` must pass on the database chain.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops import procs
from ops.settings import host_port
from tests.serving.conftest import (
    KEYS,
    PARAMS,
    Server,
    free_port,
    server_env,
    start_server,
    stop_server,
)
from tests.serving.test_lifetime import _body, _burst

PG_BASE = os.environ.get("VITALRISK_TEST_PG_URL") or "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = os.environ.get("VITALRISK_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"


def _available() -> str | None:
    for url, port in ((PG_BASE, 5432), (REDIS_URL, 6379)):
        host, p = host_port(url, port)
        if not procs.port_open(host, p):
            return f"{url} does not answer"
    return None


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[str, str]]:
    """``(database location with a fresh schema, fresh Redis key prefix)``, removed after."""
    why = _available()
    if why:
        pytest.skip(f"team services needed: {why}")
    import psycopg
    import redis

    schema = f"replicas_{uuid.uuid4().hex[:10]}"
    prefix = f"vitalrisk-test-{uuid.uuid4().hex[:10]}:"
    try:
        yield f"{PG_BASE}?schema={schema}", prefix
    finally:
        with psycopg.connect(PG_BASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=prefix + "*"))
        if keys:
            r.delete(*keys)
        r.close()


@pytest.fixture(scope="module")
def replicas(
    registry: tuple[Path, dict[str, str], dict[str, Any]],
    shared: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[Server]]:
    """Two replicas on the session's registry, started together, on the shared stores."""
    _, reg_env, models = registry
    location, prefix = shared
    servers: list[Server | None] = [None, None]
    errors: list[BaseException] = []

    def start(i: int) -> None:
        root = tmp_path_factory.mktemp(f"replica{i}")
        env = server_env(root)
        env.update(
            MLFLOW_TRACKING_URI=reg_env["MLFLOW_TRACKING_URI"],
            VITALRISK_SERVE_DB_URL=location,
            VITALRISK_REDIS_URL=REDIS_URL,
            VITALRISK_REDIS_PREFIX=prefix,
        )
        (root / "params.yaml").write_text(PARAMS)
        port = free_port()
        try:
            proc = start_server(root, env, port)
        except BaseException as exc:
            errors.append(exc)
            return
        servers[i] = Server(f"http://127.0.0.1:{port}", root, env, models, proc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield [s for s in servers if s is not None]
    finally:
        for s in servers:
            if s is not None:
                stop_server(s.proc)


def _db(location: str) -> Any:
    from core.pg import connect

    return connect(location, autocommit=True)


def test_rate_limit_is_one_budget_across_replicas(replicas: list[Server]) -> None:
    """Key ``slow`` may make 1 request/s (burst 2): alternating between the replicas, the
    third and fourth requests are refused although each replica has answered only one."""
    for srv in replicas:  # warm: the first answer of a worker is slower
        with srv.client() as c:
            assert c.post("/v1/score", content=_body(0)).status_code == 200
    headers = {"Authorization": f"Bearer {KEYS['slow']}", "content-type": "application/json"}
    statuses: list[tuple[int, int]] = []
    t0 = time.monotonic()
    for i in range(6):
        srv = replicas[i % 2]
        r = httpx.post(f"{srv.url}/v1/score", content=_body(i), headers=headers, timeout=30)
        statuses.append((i % 2, r.status_code))
    elapsed = time.monotonic() - t0
    ok = [s for s in statuses if s[1] == 200]
    assert {code for _, code in statuses} <= {200, 429}, statuses
    # one shared bucket: 2 saved up + 1 per second since; one bucket per replica: >= 4
    assert 2 <= len(ok) <= 2 + int(elapsed), (statuses, elapsed)
    if elapsed < 1.0:  # replica 1 refused its second request: replica 0 used the budget
        assert statuses[3] == (1, 429), statuses


def test_failed_authentications_are_throttled_across_replicas(replicas: list[Server]) -> None:
    """The per-address bucket of failed authentications (burst 20) is shared: 12 bad keys to
    each replica, and the last ones are refused before any key is compared. From 127.0.0.7
    (another client address on loopback), so the other tests' address is not throttled."""
    statuses = []
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.7")) as c:
        for i in range(24):
            r = c.get(
                f"{replicas[i % 2].url}/v1/model",
                headers={"Authorization": "Bearer wrong-key-000000000"},
                timeout=30,
            )
            statuses.append(r.status_code)
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= 21 and statuses[-2:] == [429, 429], statuses


def test_feedback_on_one_replica_reads_what_the_other_answered(replicas: list[Server]) -> None:
    """The summary, the cohort and the worklist's sources (answers, acknowledgements, caller
    ids) are in the shared database: a patient scored on replica 0 is found on replica 1."""
    a, b = replicas
    body = json.loads(_body(3))
    body["patients"][0]["patient_id"] = pid = f"SHARED-{uuid.uuid4().hex[:8]}"
    with a.client() as c:
        r = c.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    with b.client() as c:
        summary = c.get(f"/v1/patients/{pid}/summary")
        cohort = c.get("/v1/cohort", params={"weeks": 520})
    with b.client("reader") as c:  # another key: the caller id is sealed to the sender's key
        other = c.get(f"/v1/patients/{pid}/summary")
    assert summary.status_code == 200, summary.text
    entries = summary.json()["entry"]
    risk = [e["resource"] for e in entries if e["resource"]["resourceType"] == "RiskAssessment"]
    assert len(risk) == 1 and risk[0]["subject"]["reference"] == f"Patient/{pid}", risk
    assert other.status_code == 404, other.text
    assert cohort.status_code == 200, cohort.text
    week = cohort.json()["rows"]
    assert any(row["week"] == "2026-W01" for row in week), week


def test_replicas_share_the_log_and_the_chain_and_lose_nothing_when_killed(
    replicas: list[Server], shared: tuple[str, str]
) -> None:
    location, _ = shared
    a, b = replicas

    async def both() -> list[list[str]]:
        def kill_a() -> None:
            os.killpg(a.proc.pid, signal.SIGKILL)

        return list(await asyncio.gather(_burst(a.url, 8, 4.0, kill_a), _burst(b.url, 8, 4.0)))

    ok_a, ok_b = asyncio.run(both())
    a.proc.wait(timeout=10)
    assert len(ok_a) > 5 and len(ok_b) > 5, (len(ok_a), len(ok_b))
    # replica b went on serving after a died
    with b.client() as c:
        after = c.post("/v1/score", content=_body(7))
    assert after.status_code == 200, after.text
    answered = set(ok_a) | set(ok_b) | {after.headers["x-request-id"]}

    with _db(location) as conn:
        logged = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT request_id FROM predictions WHERE role = 'champion'"
            )
        }
        # every answer (the worklist's source) in the same database, committed with its rows
        answers = {r[0] for r in conn.execute("SELECT DISTINCT request_id FROM answers")}
        audited: set[str] = set()
        for (line,) in conn.execute("SELECT line FROM audit_entries ORDER BY seq"):
            e = json.loads(line)
            if e["details"].get("status") == 200:
                audited.update(e["details"].get("request_ids", []))
    missing_log = answered - logged
    missing_audit = answered - audited
    assert not missing_log, f"{len(missing_log)} of {len(answered)} answers have no log row"
    assert not missing_audit, f"{len(missing_audit)} of {len(answered)} answers not audited"
    assert not answered - answers, f"{len(answered - answers)} answers not in table answers"

    exe = str(Path(sys.executable).with_name("vitalrisk"))
    env = {k: v for k, v in b.env.items() if k != "VITALRISK_SERVE_DB_URL"}
    res = subprocess.run(
        [exe, "audit", "verify", "--log", location],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert ": OK, " in res.stdout and "schema=" in res.stdout, res.stdout
    # the same command finds the database chain from the serving setting alone
    res = subprocess.run(
        [exe, "audit", "verify"], env=b.env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and ": OK, " in res.stdout, res.stdout + res.stderr


def test_a_prediction_log_that_refuses_the_write_is_a_503_not_a_500(
    replicas: list[Server], shared: tuple[str, str]
) -> None:
    """The log's table is gone for a moment (a migration, a revoked grant): the score is not
    answered, the client gets 503 with a retry hint and our error shape, and once the table
    is back the same request is answered."""
    location, _ = shared
    b = replicas[1]
    schema = location.rsplit("=", 1)[1]
    with _db(location) as conn:
        conn.execute(f"ALTER TABLE {schema}.answers RENAME TO answers_away")
    try:
        with b.client() as c:
            r = c.post("/v1/score", content=_body(11))
            page = c.get("/v1/cohort", params={"weeks": 520})
    finally:
        with _db(location) as conn:
            conn.execute(f"ALTER TABLE {schema}.answers_away RENAME TO answers")
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") and "prediction log unavailable" in r.json()["error"]
    assert page.status_code == 503 and "request_id" in page.json(), page.text
    with b.client() as c:
        assert c.post("/v1/score", content=_body(11)).status_code == 200
    assert "Traceback" not in (b.root / "server.log").read_text()


def test_audit_verify_names_an_edited_database_entry(shared: tuple[str, str]) -> None:
    """The database chain is checked like the file: an edited line is named by its seq."""
    from governance.audit import AuditRecord, PgAuditStore

    location = shared[0].replace("?schema=", "?schema=edit_")
    store = PgAuditStore(location)
    try:
        store.append_many([AuditRecord("t", "predict", f"r{i}") for i in range(3)])
        assert store.verify().ok
        with _db(location) as conn:
            conn.execute(
                "UPDATE audit_entries SET line = replace(line, '\"r1\"', '\"rX\"') WHERE seq = 2"
            )
        res = store.verify()
        assert not res.ok and res.first_bad_seq == 2 and "hash mismatch" in res.reason
        with _db(location) as conn:
            conn.execute("DELETE FROM audit_entries WHERE seq >= 2")
        res = store.verify()
        assert not res.ok and "tail truncated" in res.reason, res.reason
    finally:
        store.close()
        with _db(location) as conn:
            conn.execute(f"DROP SCHEMA {location.rsplit('=', 1)[1]} CASCADE")


def test_promotions_and_exports_go_to_the_database_chain(
    shared: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With ``VITALRISK_SERVE_DB_URL`` set, the registry's audit (gate, promote, rollback)
    appends to the replicas' chain, not to a local file."""
    from governance.audit import PgAuditStore
    from models.registry import audit

    location = shared[0].replace("?schema=", "?schema=promote_")
    monkeypatch.setenv("VITALRISK_SERVE_DB_URL", location)
    monkeypatch.setenv("VITALRISK_AUDIT_LOG", str(tmp_path / "file.jsonl"))
    try:
        audit("tester", "promote", "models:/m/3", "3", {"reason": "test"})
        store = PgAuditStore(location)
        entries = list(store.entries())
        assert [e["action"] for e in entries] == ["promote"] and store.verify().ok
        store.close()
        assert not (tmp_path / "file.jsonl").exists()
    finally:
        with _db(location) as conn:
            conn.execute(f"DROP SCHEMA {location.rsplit('=', 1)[1]} CASCADE")


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        (
            "database_url: postgresql://u:hunter2@db/x",
            "serve.database_url: Value error, database_url contains a password",
        ),
        ("database_url: mysql://db/x", "must be a postgresql:// URL"),
        ("redis_url: http://cache:6379", "must be a redis:// or rediss:// URL"),
        ("redis_url: redis://:hunter2@cache:6379", "redis_url contains a password"),
    ],
)
def test_team_store_settings_are_checked(tmp_path: Path, section: str, needle: str) -> None:
    from serving.config import load_serve_config

    params = tmp_path / "params.yaml"
    params.write_text(f"serve:\n  {section}\n")
    with pytest.raises(ValueError) as err:
        load_serve_config(params)
    assert needle.split(": Value error, ")[-1] in str(err.value)
    assert "hunter2" not in str(err.value)


def test_unreachable_database_refuses_to_start_with_one_line(
    registry: tuple[Path, dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    _, reg_env, _ = registry
    env = server_env(tmp_path)
    env["MLFLOW_TRACKING_URI"] = reg_env["MLFLOW_TRACKING_URI"]
    env["VITALRISK_SERVE_DB_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    (tmp_path / "params.yaml").write_text(PARAMS)
    exe = str(Path(sys.executable).with_name("vitalrisk"))
    r = subprocess.run(
        [exe, "serve", "--port", str(free_port()), "--params", str(tmp_path / "params.yaml")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode != 0
    assert "cannot connect" in r.stderr and "nowhere" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_a_dropped_database_connection_fails_one_call_and_is_replaced(
    shared: tuple[str, str],
) -> None:
    """A server restart or a killed backend: that append fails (the service answers 503
    and its audit writer probes), the next one reconnects; nothing is written twice."""
    from governance.audit import AuditLogError, AuditRecord, PgAuditStore
    from serving.predlog import LogUnavailable, PgPredictionLog, PredictionRecord

    location = shared[0].replace("?schema=", "?schema=drop_")
    store, log = PgAuditStore(location), PgPredictionLog(location)
    row = PredictionRecord("r1", "2026-12-01T00:00:00Z", "", "m", "1", "champion", 0.5, None, {})
    try:
        store.append_many([AuditRecord("t", "predict", "a")])
        log.append([row])
        with _db(location) as conn:  # kill both backends
            pids = [store._conn.info.backend_pid, log._conn.info.backend_pid]
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(AuditLogError):
            store.append_many([AuditRecord("t", "predict", "lost")])
        with pytest.raises(LogUnavailable):  # that request fails (503), nothing committed
            log.append([row])
        store.check_writable()  # the probe reconnects
        store.append_many([AuditRecord("t", "predict", "b")])
        assert log.append([row]) == 1
        assert [e["resource"] for e in store.entries()] == ["a", "b"] and store.verify().ok
        assert log.count() == 2
    finally:
        store.close()
        log.close()
        with _db(location) as conn:
            conn.execute(f"DROP SCHEMA {location.rsplit('=', 1)[1]} CASCADE")
