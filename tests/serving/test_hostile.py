"""Hostile and faulty requests against the real server: each gets a 4xx with a reason, and
nothing of it (no traceback, no identifier, no forged line) reaches the server log.

The last test reads the session server's log after everything here and in test_api.py ran.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.serving.conftest import KEYS, Server

T = "2026-01-01T08:00:00Z"
HR = {"time": T, "code": "heart_rate", "value": 80}


def _post(server: Server, path: str, body: bytes | dict[str, Any]) -> Any:
    with server.client() as c:
        if isinstance(body, bytes):
            return c.post(path, content=body, headers={"content-type": "application/json"})
        return c.post(path, json=body)


def _score(pid: Any, **extra: Any) -> dict[str, Any]:
    return {"patients": [{"patient_id": pid, "observations": [HR], **extra}]}


DUPLICATES = [
    (
        "/v1/score",
        b'{"patients": [{"patient_id": "DUP-1", "patient_id": "DUP-2", "observations": []}]}',
        "patient_id",
    ),
    (
        "/v1/score",
        b'{"patients": [], "patients": [{"patient_id": "DUP-3", "observations": []}]}',
        "patients",
    ),
    (
        "/v1/observations",
        b'{"observations": [{"patient_id": "DUP-4", "time": "2026-01-01T08:00:00Z", "code": "heart_rate", "value": 80, "value": 300}]}',
        "value",
    ),
    ("/v1/score/features", b'{"rows": [{"features": {"age": 30, "age": 90}}]}', "age"),
    # a colon spelt \u003a inside a string: the exact check decides
    (
        "/v1/score",
        b'{"patients": [{"patient_id": "DUP\\u003a5", "patient_id": "x", "observations": []}]}',
        "patient_id",
    ),
]


@pytest.mark.parametrize(("path", "body", "key"), DUPLICATES)
def test_duplicate_keys_are_refused(server: Server, path: str, body: bytes, key: str) -> None:
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    assert f"duplicate key '{key}'" in r.json()["error"]


def test_colons_in_strings_are_not_duplicates(server: Server) -> None:
    body = json.dumps(_score("COLON:a:b")).encode().replace(b"a:b", b"a\\u003ab")
    assert b"\\u003a" in body
    assert _post(server, "/v1/score", body).status_code == 200


@pytest.mark.parametrize(
    ("pid", "needle"),
    [
        ("", "at least 1 character"),
        ("   ", "at least 1 character"),
        ("\u00a0\u2003", "at least 1 character"),  # Unicode spaces are blank too
        ("x" * 129, "at most 128 characters"),
        ("MRN-1\nforged", "control characters"),
        (17, "valid string"),
    ],
    ids=["empty", "spaces", "unicode-spaces", "too-long", "newline", "number"],
)
def test_patient_ids_are_validated(server: Server, pid: Any, needle: str) -> None:
    r = _post(server, "/v1/score", _score(pid))
    assert r.status_code == 422 and needle in r.text, r.text
    r = _post(server, "/v1/observations", {"observations": [{**HR, "patient_id": pid}]})
    assert r.status_code == 200 and r.json()["accepted"] == 0, r.text
    assert r.json()["rejected"][0]["field"] == "patient_id"
    r = _post(server, "/v1/score/features", {"rows": [{"patient_id": pid, "features": {}}]})
    assert r.status_code == 422 and "patient_id" in r.text, r.text


def test_surrounding_whitespace_does_not_make_another_patient(server: Server) -> None:
    a = _post(server, "/v1/score", _score("MRN-WS-1")).json()["results"][0]["patient_id"]
    b = _post(server, "/v1/score", _score("  MRN-WS-1\t")).json()["results"][0]["patient_id"]
    c = _post(server, "/v1/score", _score("MRN-WS-2")).json()["results"][0]["patient_id"]
    assert a == b != c


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        (
            {"covariates": {"cm_copdd": 1}},
            "unknown covariate flag(s) ['patients[0].covariates.cm_copdd']",
        ),
        ({"covariates": {"age": "70"}}, "covariates.age: Input should be a valid number"),
        ({"covariates": {"age": True}}, "covariates.age: Input should be a valid number"),
        ({"as_of": 0}, "as_of: Value error, expected an ISO-8601 date-time string"),
        ({"observations": [{**HR, "value": True}]}, "observations[0].value"),
        ({"observations": [{**HR, "time": 1767254400}]}, "observations[0].time"),
    ],
    ids=["misspelt-flag", "age-text", "age-bool", "as_of-number", "value-bool", "time-number"],
)
def test_ambiguous_values_are_refused(server: Server, patch: dict[str, Any], needle: str) -> None:
    body = _score("AMB-1")
    body["patients"][0].update(patch)
    r = _post(server, "/v1/score", body)
    assert r.status_code == 422 and needle in r.text, r.text


def _obs_entry(subject: str) -> dict[str, Any]:
    return {
        "resource": {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": subject},
            "effectiveDateTime": T,
            "valueQuantity": {"value": 80, "code": "/min"},
        }
    }


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([{"resource": {"resourceType": "Banana", "id": "b"}}], "unknown resourceType"),
        ([_obs_entry("Patient/")], "expected a reference 'Patient/<id>'"),
        ([_obs_entry("Patient/   ")], "expected a reference 'Patient/<id>'"),
        ([_obs_entry("Patient/" + "x" * 300)], "id of 1-128 characters"),
        ([_obs_entry("Group/7")], "expected a reference 'Patient/<id>'"),
        ([{"resource": "not an object"}], "entry"),
    ],
    ids=[
        "unknown-type",
        "empty-subject",
        "blank-subject",
        "long-subject",
        "not-a-patient",
        "not-a-resource",
    ],
)
def test_malformed_fhir_bundles_are_422(server: Server, entries: list[Any], needle: str) -> None:
    r = _post(
        server, "/v1/fhir/score", {"resourceType": "Bundle", "type": "collection", "entry": entries}
    )
    assert r.status_code == 422 and needle in r.text, r.text


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/score", "POST"),
        ("PUT", "/v1/model", "GET"),
        ("DELETE", "/v1/observations", "POST"),
        ("PATCH", "/v1/score/features", "POST"),
        ("OPTIONS", "/v1/fhir/score", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
    ],
)
def test_undeclared_methods_are_405(server: Server, method: str, path: str, allow: str) -> None:
    with server.client() as c:
        r = c.request(method, path, content=b"{}")
    assert r.status_code == 405 and r.headers["allow"] == allow, (r.status_code, r.text)
    assert r.json()["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    "path", ["/v1/patients/MRN-404", "/v1", "/admin", "/openapi.json", "/docs"]
)
def test_undeclared_paths_are_404(server: Server, path: str) -> None:
    with server.client() as c:
        r = c.get(path)
    assert r.status_code == 404 and "no such route" in r.json()["error"]


def test_openapi_declares_every_status(server: Server) -> None:
    from serving.schemas import AUTHENTICATED_PREFIXES, ERROR_STATUSES, ROUTE_STATUSES

    with server.client(None) as c:
        doc = c.get("/docs.json").json()
    assert "/cds-services/vitalrisk-patient-view" in doc["paths"]
    for path, item in doc["paths"].items():
        if not path.startswith(AUTHENTICATED_PREFIXES):
            continue
        extra = {str(s) for s in ROUTE_STATUSES.get(path, {})}
        for op in item.values():
            codes = set(op["responses"])
            assert {str(s) for s in ERROR_STATUSES} | {"200"} | extra == codes, (path, codes)
            if "requestBody" in op:
                assert op["requestBody"]["required"] is True
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]


def _port(server: Server) -> int:
    return int(urlparse(server.url).port or 0)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_413_reaches_a_client_that_reads_after_sending(server: Server, chunked: bool) -> None:
    """A 1 MB body over the 300 kB limit, sent in full before reading (no Expect): the
    client reads the 413, not a reset connection."""
    body = b'{"patients": [' + b" " * 1_000_000 + b"]}"
    head = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Authorization: Bearer {KEYS['admin']}\r\n".encode()
    if chunked:
        parts = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        data = head + b"Transfer-Encoding: chunked\r\n\r\n"
        data += b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
    else:
        data = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as s:
        s.sendall(data)
        answer = b""
        while b"request_id" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"exceeds the limit of 300000" in answer


def test_client_text_cannot_forge_a_log_line(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as s:
        s.sendall(
            b"GET /v1/x%0d%0a2026-01-01T00:00:00+0000%20[CRITICAL]%20FORGED-LINE%20MRN-LOG-9 HTTP/1.1\r\n"
            b"Host: x\r\nAuthorization: Bearer " + KEYS["admin"].encode() + b"\r\n\r\n"
        )
        assert s.recv(200).startswith(b"HTTP/1.1 404")


def test_server_log_has_no_traceback_identifier_or_forged_line(server: Server) -> None:
    """After every bad request of test_api.py and of this module (this test runs last)."""
    text = (server.root / "server.log").read_text(errors="replace")
    assert "Traceback" not in text
    assert "input_value" not in text
    for raw in ("MRN-", "DUP-", "AMB-", "BAT-", "PAR-", "DEV-9", "FORGED-LINE", *KEYS.values()):
        assert raw not in text, raw
    assert not any(re.match(r"\S+ \[CRITICAL\] FORGED", line) for line in text.splitlines())
