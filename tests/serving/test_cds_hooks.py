"""CDS Hooks 2.0 against the real server, with a hook request in the spec's format
(tests/serving/fixtures/cds_patient_view.json: hookInstance, fhirServer, fhirAuthorization,
context.patientId, prefetch.patient and a searchset Bundle of vital-sign Observations)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from serving.cds import percent
from tests.serving.conftest import Server

FIXTURE = Path(__file__).with_name("fixtures") / "cds_patient_view.json"
SERVICE = "/cds-services/vitalrisk-patient-view"


def hook() -> dict[str, Any]:
    return dict(json.loads(FIXTURE.read_text()))


def test_discovery_lists_patient_view_with_prefetch(server: Server) -> None:
    with server.client(None) as c:  # discovery holds no patient data: public
        r = c.get("/cds-services")
    assert r.status_code == 200
    (svc,) = r.json()["services"]
    assert svc["hook"] == "patient-view" and svc["id"] == "vitalrisk-patient-view"
    assert svc["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert "category=vital-signs" in svc["prefetch"]["vitals"]
    assert svc["title"] and svc["description"]


def test_recorded_patient_view_request_gets_a_card(server: Server) -> None:
    with server.client() as c:
        r = c.post(SERVICE, json=hook())
        direct = c.post(
            "/v1/fhir/score",
            json={
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": hook()["prefetch"]["patient"]}]
                + hook()["prefetch"]["vitals"]["entry"],
            },
        )
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    assert card["indicator"] in {"info", "warning", "critical"}
    assert len(card["summary"]) < 140
    assert card["source"]["label"].startswith("vitalrisk")
    assert "NEWS2" in card["summary"] and "NEWS2 total" in card["detail"]
    assert "Reasons:" in card["detail"] and "raised risk" in card["detail"]
    # this patient breathes at 28/min, SpO2 90 %, BP 94: NEWS2 >= 7 -> emergency, critical
    assert card["indicator"] == "critical" and "emergency" in card["summary"]
    # the card says what the FHIR route says
    ra = direct.json()
    p = ra["prediction"][0]["probabilityDecimal"]
    assert percent(p) in card["summary"]
    assert "ehr-4711" not in server.audit_log.read_text()


def test_cds_auth_is_the_api_key_as_bearer(server: Server) -> None:
    with server.client(None) as c:
        assert c.post(SERVICE, json=hook()).status_code == 401
    with server.client("reader") as c:  # read only: scoring needs the score scope
        assert c.post(SERVICE, json=hook()).status_code == 403


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda h: h.update(hook="order-select"), "patient-view"),
        (lambda h: h["context"].pop("patientId"), "context.patientId"),
        (lambda h: h.pop("prefetch"), "prefetch.vitals"),
        (lambda h: h["context"].update(patientId="someone-else"), "another patient"),
    ],
)
def test_bad_hook_requests_are_4xx_naming_the_field(server: Server, change, needle) -> None:
    h = copy.deepcopy(hook())
    change(h)
    with server.client() as c:
        r = c.post(SERVICE, json=h)
    assert r.status_code == 422, r.text
    assert needle in r.text
