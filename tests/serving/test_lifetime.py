"""Process lifetime of a real ``vitalrisk serve``: crashes, restarts, SIGTERM, refusing to start.

One server is started on fresh logs and taken through: a worker killed (restarted, ready
again), a burst of requests during which the whole process group is killed with SIGKILL
(every 200 has its audit entry), a restart on the same logs (a torn audit tail is recovered,
the chain verifies), then SIGTERM with requests in flight and a stalled upload (the answers
complete, ``vitalrisk serve`` exits 0 within the shutdown bound, the port is free, no worker
is left).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from tests.serving.conftest import KEYS, PARAMS, Server, server_env, server_on, start_server

LIFETIME_PARAMS = PARAMS + "  shutdown_timeout_seconds: 5\n  max_worker_restarts_per_minute: 3\n"


def _body(i: int) -> bytes:
    return json.dumps(
        {
            "patients": [
                {
                    "patient_id": f"CRASH-{i % 50}",
                    "as_of": "2026-01-01T08:00:00Z",
                    # three recent vitals: enough data for a risk (serve.data_sufficiency)
                    "observations": [
                        {
                            "time": "2026-01-01T08:00:00Z",
                            "code": "heart_rate",
                            "value": 70 + i % 40,
                        },
                        {"time": "2026-01-01T08:00:00Z", "code": "resp_rate", "value": 16},
                        {"time": "2026-01-01T08:00:00Z", "code": "spo2", "value": 97},
                    ],
                }
            ]
        }
    ).encode()


#: what the last burst got besides 200s (status, body start), for failure messages
OTHER: list[tuple[int, bytes]] = []


async def _burst(url: str, clients: int, seconds: float, kill: Any = None) -> list[str]:
    """Request ids of every 200 received from ``clients`` closed-loop clients (bounded)."""
    import aiohttp

    ok: list[str] = []
    end = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {KEYS['admin']}", "content-type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as s:

        async def client(n: int) -> None:
            i = n
            while time.monotonic() < end:
                try:
                    async with s.post(
                        f"{url}/v1/score", data=_body(i), timeout=aiohttp.ClientTimeout(total=10)
                    ) as r:
                        body = await r.read()
                        if r.status == 200:
                            ok.append(r.headers["x-request-id"])
                        else:
                            OTHER.append((r.status, body[:200]))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    OTHER.append((0, repr(exc)[:200].encode()))
                    return  # the server is gone
                i += clients

        async def killer() -> None:
            if kill is not None:
                await asyncio.sleep(seconds / 2)
                kill()

        await asyncio.gather(killer(), *(client(n) for n in range(clients)))
    return ok


def _audited(log: Path) -> dict[int, set[str]]:
    """status -> request ids in the audit log (complete lines only)."""
    out: dict[int, set[str]] = {}
    for raw in log.read_bytes().splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            continue
        e = json.loads(raw)
        status = e["details"].get("status")
        if isinstance(status, int):
            out.setdefault(status, set()).update(e["details"].get("request_ids", []))
    return out


def _wait_ready(url: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


def test_crash_restart_and_clean_stop(
    registry: tuple[Path, dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    from governance.audit import AuditLog

    srv = server_on(registry, tmp_path / "crash", LIFETIME_PARAMS)
    port = int(urlparse(srv.url).port or 0)
    try:
        # 1. a worker dies: the supervisor restarts it and the service is ready again
        worker = psutil.Process(srv.proc.pid).children()[0]
        worker.kill()
        assert _wait_ready(srv.url, 90), (srv.root / "server.log").read_text()[-2000:]
        new = psutil.Process(srv.proc.pid).children()
        assert [w.pid for w in new] != [worker.pid] and srv.proc.poll() is None
        assert (
            "worker 1 exited (signal SIGKILL); restarting it"
            in (srv.root / "server.log").read_text()
        )

        # 2. SIGKILL of the whole group in the middle of a burst: every 200 is audited
        ok = asyncio.run(_burst(srv.url, 16, 4.0, lambda: os.killpg(srv.proc.pid, signal.SIGKILL)))
        srv.proc.wait(timeout=10)
        assert len(ok) > 20, (len(ok), OTHER[:5])
        audited = _audited(srv.audit_log)
        missing = set(ok) - audited.get(200, set())
        assert not missing, f"{len(missing)} of {len(ok)} answered requests have no audit entry"
        assert not psutil.pid_exists(new[0].pid) or psutil.Process(new[0].pid).status() == "zombie"
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=10)

    # 3. restart on the same logs: a torn tail (if the kill tore one) is recovered
    with srv.audit_log.open("ab") as fh:  # make sure there is one to recover
        fh.write(b'{"action":"predict","actor":"adm')
    proc = start_server(srv.root, srv.env, port)
    srv = Server(srv.url, srv.root, srv.env, srv.models, proc)
    try:
        with srv.client() as c:
            assert c.post("/v1/score", content=_body(1)).status_code == 200
        res = AuditLog(srv.audit_log).verify()
        assert res.ok, res.reason
        actions = [e["action"] for e in AuditLog(srv.audit_log).entries()]
        assert "audit_recovered" in actions

        # 4. SIGTERM with requests in flight (all but their last byte sent) and an upload
        #    that never finishes: the in-flight ones are answered, then it exits 0
        def request(body: bytes) -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEYS['admin']}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:-1]
            )
            return s

        in_flight = [request(_body(i)) for i in range(4)]
        stalled = request(b'{"patients": []}' + b" " * 100)
        workers = [p.pid for p in psutil.Process(proc.pid).children()]
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        for i, s in enumerate(in_flight):
            s.sendall(_body(i)[-1:])
        answers = []
        for s in in_flight:
            s.settimeout(30)
            answers.append(s.recv(200))
            s.close()
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
        stalled.close()
        assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 4, answers
        assert rc == 0 and took < 5 + 10, (rc, took)
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in workers
        )
        with socket.socket() as s:  # the port is free: a supervisor's restart can bind it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        assert "is free" in (srv.root / "server.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("vitalrisk"))
    full = {**server_env(tmp_path), **env}
    return subprocess.run(
        [exe, "serve", "--no-check", "--port", "1", "--params", str(tmp_path / "none.yaml")],
        env=full,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"VITALRISK_MODE": "production"}, "VITALRISK_PSEUDONYM_KEY is not set"),
        (
            {"VITALRISK_API_KEYS": "a:*:k7Qp-2mZx-9LwR-4tVb,b:read:k7Qp-2mZx-9LwR-4tVb"},
            "key 'b' has the same secret as key 'a'",
        ),
    ],
    ids=["production-without-pseudonym-key", "one-secret-two-keys"],
)
def test_strict_configuration_refuses_to_start(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    """One line naming the entry, exit 2 (the other refusals: tests/serving/test_units.py)."""
    r = _serve(tmp_path, **env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "k7Qp" not in r.stderr
