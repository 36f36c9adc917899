"""Each safety rule pinned with hand-built patients: the rules as functions, then over HTTP
against the real server (model thresholds, NEWS2 floor, insufficient data, echoed ids)."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from typing import Any

import pytest

from models.thresholds import Thresholds, band_of, model_thresholds
from serving.config import DataSufficiency
from serving.safety import INSUFFICIENT, OK, data_status, decide, news2_escalation
from serving.scoring import pseudonym_of
from tests.serving.conftest import Server
from tests.serving.test_api import T0, _iso, patient, vitals

T = Thresholds(low=0.1, high=0.4, alert_budget_per_100=10, watch_budget_per_100=30, unit="x")
H = 3_600 * 10**9


# -- the rules as functions ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("total", "single", "code"),
    [
        (11, 3, "news2_emergency"),
        (7, 2, "news2_emergency"),
        (6, 2, "news2_urgent"),
        (5, 1, "news2_urgent"),
        (3, 3, "news2_single_parameter"),
        (4, 2, None),
        (0, 0, None),
        (None, None, None),
    ],
)
def test_news2_escalation_follows_the_rcp_chart(total, single, code) -> None:
    esc = news2_escalation(total, single)
    assert (esc.code if esc else None) == code


def test_the_model_never_reads_quieter_than_news2() -> None:
    # the case: the model says medium next to NEWS2 11
    v = decide(0.2, T, OK, 11, 3)
    assert (v.model_band, v.risk_band, v.alert, v.escalation) == (
        "medium",
        "high",
        True,
        "news2_emergency",
    )
    assert "raised from the model's medium to high" in str(v.escalation_text)
    v = decide(0.01, T, OK, 3, 3)  # one parameter scoring 3: at least medium, alert
    assert (v.model_band, v.risk_band, v.alert) == ("low", "medium", True)
    v = decide(0.5, T, OK, 5, 2)  # the model is louder than NEWS2: it stays high
    assert (v.risk_band, v.escalation) == ("high", "news2_urgent")
    v = decide(0.05, T, OK, 2, 1)
    assert (v.risk_band, v.alert, v.escalation) == ("low", False, None)
    v = decide(T.high, T, OK, 0, 0)  # the alert threshold is "high"
    assert (v.risk_band, v.alert) == ("high", True)


def test_insufficient_data_has_no_probability_but_keeps_news2_triggers() -> None:
    v = decide(0.0002, T, INSUFFICIENT, 0, None)
    assert (v.probability, v.risk_band, v.model_band, v.alert) == (None, None, None, False)
    v = decide(0.0002, T, INSUFFICIENT, 7, 3)
    assert v.probability is None and v.alert and v.escalation == "news2_emergency"


def test_data_status_counts_recent_vitals_per_setting_window() -> None:
    rule = DataSufficiency()
    now = 1_000 * H
    fresh = {"resp_rate": now - H, "spo2": now - 2 * H, "heart_rate": now - 11 * H}
    assert data_status(fresh, now, "ward", rule)[0] == OK
    stale = {**fresh, "heart_rate": now - 13 * H}  # ward window 12 h
    status, why = data_status(stale, now, "ward", rule)
    assert status == INSUFFICIENT and "heart_rate" in why
    assert data_status(stale, now, "home", rule)[0] == OK  # home window 48 h
    assert data_status({}, now, None, rule)[0] == INSUFFICIENT


# -- over HTTP -------------------------------------------------------------------------------
def _score(server: Server, *patients: dict[str, Any]) -> dict[str, Any]:
    with server.client() as c:
        r = c.post("/v1/score", json={"patients": list(patients)})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _answers(server: Server, request_id: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(server.prediction_log)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM answers WHERE request_id=?", (request_id,))]
    con.close()
    return rows


def test_bands_and_alert_come_from_the_served_model(server: Server) -> None:
    model = server.models["champion"][1]
    t = model_thresholds(model.metadata)
    assert t is not None
    levels = [(14 + 2 * i, 70 + 6 * i, 98 - i, 130 - 5 * i, 36.8 + i / 5) for i in range(6)]
    data = _score(server, *[patient(f"TH-{i}", vitals(*lv)) for i, lv in enumerate(levels[:5])])
    assert data["thresholds"]["low"] == t.low and data["thresholds"]["high"] == t.high
    with server.client("reader") as c:  # /v1/model shows the same thresholds
        assert c.get("/v1/model").json()["thresholds"] == data["thresholds"]
    for res in data["results"]:
        assert res["model_risk_band"] == band_of(res["probability"], t)
        assert res["alert"] == (res["probability"] >= t.high or res["escalation"] is not None)


def test_news2_floor_over_http(server: Server) -> None:
    sick = vitals(28, 118, 89, 95, 38.6, o2="yes")  # NEWS2 >= 7
    one3 = vitals(7, 72, 98, 128, 36.8)  # respiration 7/min scores 3, everything else 0
    data = _score(server, patient("FL-1", sick), patient("FL-2", one3))
    a, b = data["results"]
    assert a["news2_total"] >= 7 and a["escalation"] == "news2_emergency"
    assert a["risk_band"] == "high" and a["alert"] is True
    assert b["news2_max_single"] == 3 and b["escalation"] in {
        "news2_single_parameter",
        "news2_urgent",
    }
    assert b["risk_band"] in {"medium", "high"} and b["alert"] is True


def test_no_usable_observations_is_insufficient_not_low(server: Server) -> None:
    """The issue's patient: nothing usable -> no probability, no band, no 'age lowered risk'."""
    junk = [
        {"time": _iso(T0), "code": "heart_rate", "value": 900, "unit": "/min"},
        {"time": _iso(T0), "code": "spo2", "value": 300, "unit": "%"},
    ]
    stale = vitals(14, 72, 98, 128, 36.8, hours=2)
    for o in stale:  # two days old at as_of
        o["time"] = _iso(T0 - timedelta(days=2))
    data = _score(
        server,
        patient("IN-1", junk),
        {**patient("IN-2", stale), "as_of": _iso(T0)},
        patient("IN-3", vitals(14, 72, 98, 128, 36.8)),
    )
    junk_r, stale_r, ok_r = data["results"]
    for res in (junk_r, stale_r):
        assert res["status"] == "insufficient_data", res
        assert res["probability"] is None and res["risk_band"] is None
        assert res["top_features"] == [] and res["alert"] is False
    assert "stale" in stale_r["status_detail"]
    assert stale_r["latest_observations"]["heart_rate"] == _iso(T0 - timedelta(days=2))
    assert ok_r["status"] == "ok" and ok_r["probability"] is not None
    # stored: an answer row for each, a prediction row only for the scored one
    rows = _answers(server, data["request_id"])
    assert sorted(r["status"] for r in rows) == ["insufficient_data", "insufficient_data", "ok"]
    assert {r["patient_id"] for r in rows} == {pseudonym_of(f"IN-{i}") for i in (1, 2, 3)}
    assert all(r["key_name"] == "admin" for r in rows)
    con = sqlite3.connect(server.prediction_log)
    logged = {
        p
        for (p,) in con.execute(
            "SELECT patient_id FROM predictions WHERE request_id=? AND role='champion'",
            (data["request_id"],),
        )
    }
    con.close()
    assert logged == {pseudonym_of("IN-3")}


def test_caller_id_is_echoed_and_only_pseudonyms_are_stored(server: Server) -> None:
    data = _score(server, patient("MRN-ECHO-77", vitals(22, 100, 94, 110, 37.9)))
    res = data["results"][0]
    assert res["patient_id"] == "MRN-ECHO-77"
    assert res["setting"] == "ward" and "horizon_hours" in res
    # the prediction log, the answers, the audit log: pseudonyms only
    raw = server.prediction_log.read_bytes()
    wal = server.prediction_log.with_name(server.prediction_log.name + "-wal")
    raw += wal.read_bytes() if wal.exists() else b""
    assert b"MRN-ECHO-77" not in raw
    assert "MRN-ECHO-77" not in server.audit_log.read_text()
    row = _answers(server, data["request_id"])[0]
    assert json.loads(row["latest"]) == res["latest_observations"]
    ids = server.root / "logs" / "identities.sqlite"
    assert b"MRN-ECHO-77" not in ids.read_bytes()  # sealed, not in clear
