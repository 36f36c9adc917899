"""Bounded resources, against a real server with tight limits (``LIMITED_PARAMS``) on loopback.

Every loop is bounded (a fixed number of connections or requests, a deadline a few seconds
past the configured timeout). Source addresses 127.0.0.2-9 stand in for other clients: Linux
routes all of 127.0.0.0/8 to the loopback interface, so each is its own client address.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections import Counter
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.serving.conftest import KEYS, Server

AUTH = f"Authorization: Bearer {KEYS['admin']}\r\n".encode()
SCORE = json.dumps(
    {
        "patients": [
            {
                "patient_id": "RES-1",
                "observations": [
                    {"time": "2026-01-01T08:00:00Z", "code": "heart_rate", "value": 80}
                ],
            }
        ]
    }
).encode()


def _port(server: Server) -> int:
    return int(urlparse(server.url).port or 0)


def _connect(server: Server, source: str) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", _port(server)))
    return s


def _answers(socks: list[socket.socket], within: float) -> dict[int, bytes]:
    """What the server sent on each socket before closing it, waiting at most ``within`` s:
    index -> first bytes (b"" = closed without an answer); sockets still open are absent."""
    out: dict[int, bytes] = {}
    for s in socks:
        s.setblocking(False)
    deadline = time.monotonic() + within
    while len(out) < len(socks) and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i in out:
                continue
            try:
                out[i] = s.recv(4096)
            except BlockingIOError:
                pass
            except OSError:
                out[i] = b""
        time.sleep(0.05)
    return out


def _status(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3})", raw)
    return int(m.group(1)) if m else 0


def _get(server: Server, path: str, key: str | None = "admin") -> httpx.Response:
    with server.client(key) as c:
        return c.get(path)


def _worker_pid(server: Server) -> int:
    import psutil

    return int(psutil.Process(server.proc.pid).children()[0].pid)


def test_metrics_labels_only_from_declared_routes(limited_server: Server) -> None:
    """300 requests to unknown paths (with identifiers in them) add no label set to /metrics
    (before: one per path, and the identifiers in the unauthenticated page)."""
    srv = limited_server
    for i in range(5):  # every label set that can exist, first
        _get(srv, f"/v1/nothing/{i}")
        _get(srv, f"/nothing/{i}", key=None)
    before = _get(srv, "/metrics", key=None).text.count("\n")
    with httpx.Client(base_url=srv.url, timeout=30.0) as c:
        for i in range(150):
            c.get(f"/v1/patients/MRN-{i:04d}", headers={"Authorization": f"Bearer {KEYS['admin']}"})
            c.get(f"/MRN-{i:04d}/record")
    text = _get(srv, "/metrics", key=None).text
    assert text.count("\n") == before, (before, text.count("\n"))
    assert "MRN-" not in text
    from serving.guard import PUBLIC_PATHS, ROUTE_SCOPES

    labels = set(re.findall(r'endpoint="([^"]*)"', text))
    assert "/(undeclared)" in labels
    assert labels <= {*ROUTE_SCOPES, *PUBLIC_PATHS, "/(undeclared)"}, labels


def _raise_open_files(need: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files, the limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_stalled_headers_are_closed_and_probes_still_answer(limited_server: Server) -> None:
    """1,100 connections from one address that send half a request (the issue's lock-out):
    all but 16 are refused at once, those 16 get 408 after the 2 s header deadline, and
    other clients are served all along."""
    srv = limited_server
    _raise_open_files(1_100 + 256)
    socks: list[socket.socket] = []
    try:
        for _ in range(1_100):
            s = _connect(srv, "127.0.0.2")
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        assert _get(srv, "/healthz", key=None).status_code == 200
        with srv.client() as c:
            assert c.post("/v1/score", content=SCORE).status_code == 200
        t0 = time.monotonic()
        got = _answers(socks, within=6)
        assert len(got) == len(socks), f"{len(socks) - len(got)} stalled connections left open"
        assert Counter(_status(v) for v in got.values()) == {503: 1_100 - 16, 408: 16}
        assert time.monotonic() - t0 < 5
        assert _get(srv, "/healthz", key=None).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_stalled_body_is_answered_408(limited_server: Server) -> None:
    srv = limited_server
    s = _connect(srv, "127.0.0.2")
    try:
        s.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\n"
            + AUTH
            + b'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"patients"'
        )
        got = _answers([s], within=8)
        assert _status(got[0]) == 408 and b"did not arrive within 3 s" in got[0]
    finally:
        s.close()


def test_oversized_headers_are_answered_431(limited_server: Server) -> None:
    srv = limited_server
    s = _connect(srv, "127.0.0.2")
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 8000 + b"\r\n\r\n")
        got = _answers([s], within=5)
        assert _status(got[0]) == 431
    finally:
        s.close()


def test_connection_caps_per_client_and_per_worker(limited_server: Server) -> None:
    """16 connections per address, 64 per worker: the rest are answered 503 and closed at
    once, and the worker's open files stay bounded."""
    srv = limited_server
    pid = _worker_pid(srv)
    socks: list[socket.socket] = []
    try:
        one = [_connect(srv, "127.0.0.3") for _ in range(40)]
        socks += one
        refused = _answers(one, within=1)  # before the 2 s header deadline
        assert len(refused) == 40 - 16 and {_status(v) for v in refused.values()} == {503}
        # other addresses still get in, up to the worker's cap
        more = [_connect(srv, f"127.0.0.{a}") for a in (4, 5, 6, 7) for _ in range(16)]
        socks += more
        answered = _answers(more, within=1)
        assert 0 < len(answered) <= 64 - 16 + 1  # roughly the global cap's overflow
        assert {_status(v) for v in answered.values()} == {503}
        assert len(os.listdir(f"/proc/{pid}/fd")) < 64 + 256
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 5
    while _get(srv, "/healthz", key=None).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _get(srv, "/healthz", key=None).status_code == 200


def _read_response(s: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (head + content-length body) from a blocking socket."""
    s.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: (\d+)", head, re.I)
    while m and len(rest) < int(m.group(1)):
        rest += s.recv(4096)
    return head + b"\r\n\r\n" + rest


def test_requests_per_connection_are_capped(limited_server: Server) -> None:
    srv = limited_server
    s = _connect(srv, "127.0.0.8")
    try:
        answers = []
        for _ in range(5):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(_read_response(s))
        assert all(_status(a) == 200 for a in answers)
        assert all(b"connection: close" not in a.lower() for a in answers[:4])
        assert b"connection: close" in answers[4].lower()
        assert _answers([s], within=3) == {0: b""}  # closed by the server after the 5th
    finally:
        s.close()


def _bad_key(source: str, srv: Server) -> tuple[int, str]:
    s = _connect(srv, source)
    try:
        s.sendall(
            b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer wrong-wrong-wrong-1\r\n\r\n"
        )
        raw = _answers([s], within=5).get(0, b"")
        m = re.search(rb"retry-after: (\d+)", raw, re.I)
        return _status(raw), m.group(1).decode() if m else ""
    finally:
        s.close()


def test_failed_authentication_is_throttled_per_address(limited_server: Server) -> None:
    """Burst 5, then 6 per minute: the 6th wrong key in a row is 429 with Retry-After, and
    while throttled even a valid key from that address is refused; other addresses are not."""
    srv = limited_server
    results = [_bad_key("127.0.0.9", srv) for _ in range(12)]
    codes = [c for c, _ in results]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
    assert all(int(r) >= 1 for c, r in results if c == 429)
    s = _connect(srv, "127.0.0.9")
    try:
        s.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + AUTH + b"\r\n")
        assert _status(_answers([s], within=5)[0]) == 429
    finally:
        s.close()
    assert _get(srv, "/v1/model").status_code == 200  # 127.0.0.1 is not throttled
    # denied requests are audited (without waiting for the disk): by address, not by key
    deadline = time.monotonic() + 5
    seen: Counter[int] = Counter()
    while time.monotonic() < deadline and seen[429] < codes.count(429):
        seen = Counter()
        for line in srv.audit_log.read_text().splitlines():
            e = json.loads(line)
            if e["actor"] == "(anonymous)" and "127.0.0.9" in e["details"].get("clients", []):
                seen[e["details"]["status"]] += e["details"]["requests"]
        time.sleep(0.1)
    assert seen[401] >= 5 and seen[429] >= codes.count(429), seen


def test_unwritable_audit_log_fails_closed_and_recovers(limited_server: Server) -> None:
    """No durable audit entry, no answer: data routes 503 and /readyz not ready while the log
    cannot be written; both recover once it can (the writer probes every second)."""
    srv = limited_server
    log = srv.audit_log
    aside = log.with_name("audit.moved")
    body: dict[str, Any] = json.loads(SCORE)
    with srv.client() as c:
        assert c.post("/v1/score", json=body).status_code == 200
        log.rename(aside)
        log.mkdir()  # appends now fail for every user, root included
        try:
            r = c.post("/v1/score", json=body)
            assert r.status_code == 503 and "audit" in r.json()["error"], r.text
            assert r.headers["retry-after"]
            deadline = time.monotonic() + 5
            while c.get("/readyz").status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.get("/readyz").status_code == 503
            assert c.get("/v1/model").status_code == 503
            assert c.get("/healthz").status_code == 200  # alive, just not ready
        finally:
            shutil.rmtree(log)
            aside.rename(log)
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/score", json=body)
        assert r.status_code == 200
    from governance.audit import AuditLog

    res = AuditLog(log).verify()
    assert res.ok, res.reason
    ids = {rid for e in AuditLog(log).entries() for rid in e["details"].get("request_ids", [])}
    assert r.headers["x-request-id"] in ids
