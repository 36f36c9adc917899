"""The worklist end to end in a real headless Chromium (Debian's ``chromium`` and
``chromedriver``, driven by Selenium; ``make test`` installs them when missing).

A small ward is fed through the API as a ward system would (``/v1/observations`` and hourly
``/v1/score``); then a clinician logs in with a key, sees the sickest patient first, opens
it, acknowledges, and the audit log has the entry. Screenshots go to ``test-artifacts/``
(and to ``docs/`` with ``VITALRISK_UPDATE_SCREENSHOTS=1``, for the README).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from serving.scoring import pseudonym_of
from tests.serving.conftest import KEYS, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"

#: (caller id, rr, hr, spo2, sbp, temp at the start, per-hour drift of each)
WARD = [
    ("BED-07 Jones", (16, 84, 96, 124, 37.0), (0.9, 2.6, -0.55, -2.4, 0.12)),
    ("BED-02 Patel", (15, 76, 97, 128, 36.8), (0.0, 0.0, 0.0, 0.0, 0.0)),
    ("BED-11 Smith", (18, 92, 95, 118, 37.4), (0.15, 0.5, -0.05, -0.4, 0.02)),
    ("BED-04 Novak", (14, 70, 98, 132, 36.6), (0.0, 0.1, 0.0, 0.0, 0.0)),
]
HOURS = 12


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _observations(base: tuple[float, ...], drift: tuple[float, ...], end: datetime) -> list[Any]:
    out = []
    for h in range(HOURS):
        t = _iso(end - timedelta(hours=HOURS - 1 - h))
        rr, hr, spo2, sbp, temp = (b + d * h for b, d in zip(base, drift, strict=True))
        out += [
            {"time": t, "code": "resp_rate", "value": round(rr), "unit": "/min"},
            {"time": t, "code": "heart_rate", "value": round(hr), "unit": "/min"},
            {"time": t, "code": "spo2", "value": round(min(spo2, 100)), "unit": "%"},
            {"time": t, "code": "sbp", "value": round(sbp), "unit": "mm[Hg]"},
            {"time": t, "code": "body_temp", "value": round(temp, 1), "unit": "Cel"},
            {"time": t, "code": "consciousness", "value": "A"},
            {"time": t, "code": "o2_support", "value": "yes" if h > 8 and spo2 < 92 else "no"},
        ]
    return out


def feed_ward(server: Server) -> list[str]:
    """Land and score the ward hourly (the last score is now); returns the caller ids."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
    obs = {pid: _observations(b, d, end) for pid, b, d in WARD}
    with server.client() as c:
        items = [{**o, "patient_id": pid} for pid, rows in obs.items() for o in rows]
        assert c.post("/v1/observations", json={"observations": items}).status_code == 200
        for h in range(0, HOURS, 2):
            as_of = end - timedelta(hours=HOURS - 1 - h)
            patients = [
                {
                    "patient_id": pid,
                    "covariates": {"age": 60 + 5 * i, "sex": "F" if i % 2 else "M"},
                    "observations": [o for o in rows if o["time"] <= _iso(as_of)],
                    "as_of": _iso(as_of),
                }
                for i, (pid, rows) in enumerate(obs.items())
            ]
            r = c.post("/v1/score", json={"patients": patients})
            assert r.status_code == 200, r.text
    return [pid for pid, _, _ in WARD]


@pytest.fixture(scope="module")
def browser() -> Any:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver: "
            "`apt-get install -y chromium chromium-driver` (make test does this)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        opts.add_argument(arg)
    opts.add_argument("--disable-dev-shm-usage")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    if os.environ.get("VITALRISK_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(path, ROOT / "docs" / name)
    return path


def test_worklist_in_chromium(server: Server, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(cond: Any) -> Any:  # a click returns before the next page has loaded
        return WebDriverWait(browser, 20).until(cond)

    ids = feed_ward(server)
    sickest = ids[0]
    d = browser
    d.get(f"{server.url}/worklist")
    assert d.current_url.endswith("/worklist/login")  # no session: the login form
    d.find_element(By.ID, "key").send_keys("not-a-key-at-all")
    d.find_element(By.ID, "login").click()
    assert "unknown key" in wait(ec.presence_of_element_located((By.ID, "login-error"))).text
    d.find_element(By.ID, "key").send_keys(KEYS["admin"])
    d.find_element(By.ID, "login").click()
    wait(ec.presence_of_element_located((By.ID, "worklist")))
    assert d.current_url.endswith("/worklist"), d.current_url
    cookie = d.get_cookie("vr_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    rows = d.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    names = [r.get_attribute("data-patient") for r in rows]
    assert names[0] == sickest, names  # the sickest patient first
    assert set(ids) <= set(names)
    first = rows[0]
    assert "alert" in (first.get_attribute("class") or "")
    assert first.find_elements(By.CSS_SELECTOR, "svg.spark polyline")  # the 72 h sparkline
    assert "raised risk" in first.text and "ago" in first.text  # reasons, freshness
    _shot(d, "worklist.png")

    first.find_element(By.CSS_SELECTOR, "a.patient").click()
    assert wait(ec.presence_of_element_located((By.ID, "patient-id"))).text == sickest
    charts = d.find_elements(By.CSS_SELECTOR, ".chart svg")
    assert len(charts) >= 6  # risk + each vital
    assert d.find_elements(By.CSS_SELECTOR, "line.alert-mark")  # where alerts fired
    assert "Not acknowledged" in d.find_element(By.ID, "ack-state").text
    _shot(d, "worklist-patient.png")
    d.find_element(By.ID, "acknowledge").click()
    wait(ec.text_to_be_present_in_element((By.ID, "ack-state"), "Acknowledged at"))

    entries = [json.loads(line) for line in server.audit_log.read_text().splitlines()]
    acks = [e for e in entries if e.get("action") == "acknowledge"]
    assert acks, entries[-3:]
    text = json.dumps(acks[-1])
    assert pseudonym_of(sickest) in text and "admin" in text and sickest not in text

    # a forged acknowledge without the CSRF token is refused, and audited as refused
    d.get(f"{server.url}/cohort")
    wait(ec.presence_of_element_located((By.ID, "cohort")))
    assert "Cohort" in d.title
    with server.client(None) as c:
        r = c.post(
            "/worklist/acknowledge",
            data={"patient": pseudonym_of(sickest)},
            cookies={"vr_session": cookie["value"]},
        )
    assert r.status_code == 403
