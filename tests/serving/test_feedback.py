"""Feedback beyond the ward: the person's own summary (FHIR Bundle), ids resolved only for the
key that sent them, and the cohort view with k suppression (complementary cells too)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from serving.feedback import suppress
from serving.identities import IdentityMap
from serving.scoring import pseudonym_of
from tests.serving.conftest import KEYS, Server
from tests.serving.test_api import T0, _iso, patient, vitals


# -- suppression ------------------------------------------------------------------------------
def test_cells_under_k_are_hidden_and_cannot_be_recovered_from_the_total() -> None:
    out = suppress({"0-50": 12, "50-65": 3, "65-80": 7, "80-130": 0}, k=5)
    assert out["50-65"] == "<5"
    assert out["65-80"] == "suppressed"  # complementary: 3 would be total - 12 - 7 - 0
    assert out["0-50"] == 12 and out["80-130"] == 0 and out["total"] == 22
    # two hidden cells already protect each other
    out = suppress({"a": 2, "b": 3, "c": 9}, k=5)
    assert (out["a"], out["b"], out["c"], out["total"]) == ("<5", "<5", 9, 14)
    # one hidden cell and nothing else to hide: the total goes
    out = suppress({"a": 2, "b": 0}, k=5)
    assert out["a"] == "<5" and out["total"] == "<5"
    out = suppress({"a": 8, "b": 0}, k=5)
    assert out == {"a": 8, "b": 0, "total": 8}


# -- the caller-id map ------------------------------------------------------------------------
def test_ids_resolve_only_for_the_key_that_sent_them(tmp_path: Path) -> None:
    m = IdentityMap(tmp_path / "ids.sqlite")
    m.remember("ward-a", [("p_1", "MRN-1")])
    m.remember("ward-b", [("p_2", "MRN-2")])
    assert m.resolve("ward-a") == {"p_1": "MRN-1"}
    assert m.resolve("ward-b", ["p_1", "p_2"]) == {"p_2": "MRN-2"}
    # a sealed row copied to another key does not open there
    con = sqlite3.connect(tmp_path / "ids.sqlite")
    con.execute(
        "INSERT INTO identities SELECT 'ward-b', pseudonym, sealed FROM identities "
        "WHERE key_name='ward-a'"
    )
    con.commit()
    con.close()
    assert "p_1" not in m.resolve("ward-b")
    assert b"MRN-1" not in (tmp_path / "ids.sqlite").read_bytes()
    m.close()


# -- over HTTP --------------------------------------------------------------------------------
def _send(server: Server, pid: str) -> None:
    obs = vitals(22, 104, 94, 108, 38.2, hours=4)
    items = [{**o, "patient_id": pid} for o in obs]
    with server.client() as c:
        assert c.post("/v1/observations", json={"observations": items}).status_code == 200
        r = c.post("/v1/score", json={"patients": [patient(pid, obs)]})
        assert r.status_code == 200, r.text


def test_summary_is_the_patients_own_bundle(server: Server) -> None:
    from fhir.resources.R4B.bundle import Bundle

    _send(server, "PHR-1")
    with server.client() as c:
        r = c.get("/v1/patients/PHR-1/summary")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    doc = r.json()
    Bundle.model_validate(doc)
    kinds = [e["resource"]["resourceType"] for e in doc["entry"]]
    assert kinds.count("Observation") == 4 * 7 and kinds[-1] == "RiskAssessment"
    assert {e["resource"]["subject"]["reference"] for e in doc["entry"]} == {"Patient/PHR-1"}
    ra = doc["entry"][-1]["resource"]
    assert ra["occurrenceDateTime"] == _iso(T0)
    assert pseudonym_of("PHR-1") not in r.text  # the pseudonym stays inside


def test_summary_only_for_the_key_that_sent_the_data(server: Server) -> None:
    _send(server, "PHR-2")
    with server.client("reader") as c:  # another key, read scope: not its patient
        r = c.get("/v1/patients/PHR-2/summary")
    assert r.status_code == 404 and "sent no data" in r.json()["error"]
    with server.client() as c:
        assert c.get("/v1/patients/NEVER-SEEN/summary").status_code == 404
    # the audit entry names the route's template and the pseudonym, not the id
    text = server.audit_log.read_text()
    assert "PHR-2" not in text and "/v1/patients/{patient_id}/summary" in text


def test_cohort_json_counts_and_suppresses(server: Server) -> None:
    for i in range(3):
        _send(server, f"COH-{i}")
    with server.client("reader") as c:
        weeks = (datetime.now(UTC) - T0).days // 7 + 2
        r = c.get("/v1/cohort", params={"weeks": weeks})
        assert c.get("/v1/cohort", params={"weeks": 0}).status_code == 422
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["k"] == 5 and "65-80" in doc["age_bands"]
    assert doc["rows"], doc
    for row in doc["rows"]:
        for measure in ("patients", "alerts", "events"):
            cells = row[measure]
            for band in doc["age_bands"]:
                v = cells[band]
                assert v in ("<5", "suppressed") or v == 0 or v >= 5, (row, measure)


@pytest.mark.parametrize("path", ["/v1/cohort", "/v1/patients/X/summary"])
def test_feedback_routes_need_a_key(server: Server, path: str) -> None:
    with server.client(None) as c:
        assert c.get(path).status_code == 401
    with server.client("device") as c:  # ingest only
        assert c.get(path).status_code == 403


def test_feed_plays_demo_patients_into_the_worklist(server: Server) -> None:
    """``vitalrisk feed`` (the demo's simulator, times moved to now) fills the answer log of
    its key: what a fresh ``make serve`` needs before the worklist shows anyone."""
    import subprocess

    from tests.serving.conftest import vitalrisk_exe

    env = {**server.env, "VITALRISK_FEED_KEY": KEYS["admin"]}
    started = datetime.now(UTC).isoformat()[:19]
    res = subprocess.run(
        [vitalrisk_exe(), "feed", "--url", server.url, "--patients", "3", "--every", "8"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=server.root,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fed 3 patients" in res.stdout
    con = sqlite3.connect(server.prediction_log)
    rows = con.execute(
        "SELECT COUNT(DISTINCT patient_id), COUNT(*) FROM answers WHERE key_name='admin' "
        "AND scored_at >= ?",
        (started,),
    ).fetchone()
    con.close()
    assert rows[0] >= 3 and rows[1] >= 9, rows
    missing = subprocess.run(
        [vitalrisk_exe(), "feed", "--url", server.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "VITALRISK_FEED_KEY"},
    )
    assert missing.returncode == 2 and "VITALRISK_FEED_KEY" in missing.stderr


def test_worklist_session_rules_over_http(server: Server) -> None:
    """No cookie or a forged one: the login form; a key without ``read``: refused; another
    key's worklist does not show this key's patients; logout needs the CSRF token."""
    from datetime import timedelta

    from serving import sessions

    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    obs = [
        {**o, "time": _iso(now - (T0 - datetime.fromisoformat(o["time"].replace("Z", "+00:00"))))}
        for o in vitals(22, 104, 94, 108, 38.2, hours=4)
    ]
    with server.client() as c:
        assert c.post("/v1/score", json={"patients": [patient("SESS-1", obs)]}).status_code == 200
    with server.client(None) as c:
        r = c.get("/worklist")
        assert r.status_code == 303 and r.headers["location"] == "/worklist/login"
        forged = "eyJrIjoiYWRtaW4ifQ.c2lnbmF0dXJl"
        assert c.get("/worklist", cookies={"vr_session": forged}).status_code == 303
        r = c.post("/worklist/login", data={"key": KEYS["device"]})
        assert r.status_code == 401 and "lacks the read scope" in r.text
        r = c.post("/worklist/login", data={"key": KEYS["reader"]})
        assert r.status_code == 303 and r.headers["location"] == "/worklist"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=1800" in cookie
        value = sessions.cookie_of(cookie.split(";")[0])
        page = c.get("/worklist", cookies={"vr_session": value})
        assert page.status_code == 200 and "SESS-1" not in page.text  # sent by admin
        bad = c.post("/worklist/logout", data={"csrf": "guess"}, cookies={"vr_session": value})
        assert bad.status_code == 403 and "CSRF" in bad.text
        assert c.get("/worklist/nope").status_code == 404
        assert c.delete("/worklist").status_code == 405
    with server.client(None) as c:
        r = c.post("/worklist/login", data={"key": KEYS["admin"]})
        value = sessions.cookie_of(r.headers["set-cookie"].split(";")[0])
        page = c.get("/worklist", cookies={"vr_session": value})
        assert "SESS-1" in page.text
    audit = server.audit_log.read_text()
    assert "GET /worklist" in audit and "SESS-1" not in audit


def test_worklist_escapes_what_it_shows() -> None:
    """Every stored text is escaped on the page (a reason or an id cannot inject markup)."""
    from serving.feedback import Answer, WorkItem
    from serving.worklist import patient_page, worklist_page

    row = {
        "request_id": "r1",
        "scored_at": "2026-01-10T12:00:00Z",
        "as_of": "2026-01-10T12:00:00Z",
        "patient_id": "p_0123456789abcdef0123",
        "model_version": "1",
        "status": "ok",
        "probability": 0.5,
        "risk_band": "high",
        "alert": 1,
        "escalation": None,
        "news2_total": 3.0,
        "setting": "ward",
        "horizon_hours": 24.0,
        "reasons": '["<script>alert(1)</script> raised risk"]',
        "latest": '{"heart_rate": "2026-01-10T12:00:00Z"}',
    }
    item = WorkItem(row["patient_id"], "<b>MRN</b>", Answer(row), [Answer(row)], None)
    now = datetime(2026, 1, 10, 13, tzinfo=UTC)
    for html in (
        worklist_page([item], "admin", "tok", now, now, None, 72),
        patient_page(item, {}, {}, "admin", "tok", now, now, None),
    ):
        assert "<script>" not in html and "&lt;script&gt;" in html
        assert "<b>MRN</b>" not in html and "&lt;b&gt;MRN&lt;/b&gt;" in html
