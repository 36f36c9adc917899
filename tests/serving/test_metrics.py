"""Domain metrics on the real server's ``/metrics``, and the ops files that read them.

Scores by band and setting, refused requests and observations by reason, the served model
versions and the monitor's verdict (read from its summary.json on scrape). The Grafana
dashboard and the Prometheus rules may only name metrics the service exports, and the rules
pass ``promtool check rules`` and their unit tests (``promtool test rules``) when promtool is
installed (``make promtool``: Debian's ``prometheus`` package).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.conftest import Server
from tests.serving.test_api import SICK, WELL, _rows, patient

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "vitalrisk.json"
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
#: PromQL functions and keywords that look like metric names in an expression
PROMQL_WORDS = {
    "sum", "by", "rate", "max", "min", "count", "time", "histogram_quantile", "without",
    "avg", "increase", "irate", "le", "on", "ignoring", "and", "or", "unless", "offset",
}  # fmt: skip


def _scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with server.client(None) as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def _names(samples: dict[Any, float]) -> set[str]:
    return {n for n, _ in samples}


def test_domain_metrics_count_what_was_answered(server: Server) -> None:
    before = _scrape(server)
    frame = server.models["frame"]
    names = server.models["champion"][1].feature_names
    with server.client() as c:
        r = c.post(
            "/v1/score",
            json={"patients": [patient("M-1", SICK, setting="ward"), patient("M-2", WELL)]},
        )
        assert r.status_code == 200, r.text
        bands = [x["risk_band"] for x in r.json()["results"]]
        rows = _rows(frame, names, 3)
        assert c.post("/v1/score/features", json={"rows": rows}).status_code == 200
        assert c.post("/v1/score", json={"patients": "nope"}).status_code == 422
        assert c.post("/v1/score", content=b"{bad json").status_code == 400
        items = [
            {"patient_id": "M-3", "time": "2026-01-01T08:00:00Z", "code": "mood", "value": 3},
            {
                "patient_id": "M-3",
                "time": "2026-01-01T08:00:00Z",
                "code": "heart_rate",
                "value": 80,
            },
        ]
        assert c.post("/v1/observations", json={"observations": items}).status_code == 200
    with server.client(None) as anon:
        assert anon.get("/v1/model").status_code == 401
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("vitalrisk_scores_total", band=bands[0], setting="ward") >= 1
    assert delta("vitalrisk_scores_total", band=bands[1], setting="unknown") >= 1
    assert delta("vitalrisk_scores_total") == 2 + 3
    assert delta("vitalrisk_risk_probability_count") == 5
    assert delta("vitalrisk_rejected_requests_total", route="/v1/score", reason="invalid") == 1
    assert delta("vitalrisk_rejected_requests_total", route="/v1/score", reason="malformed") == 1
    assert delta("vitalrisk_rejected_requests_total", reason="unauthenticated") == 1
    assert delta("vitalrisk_rejected_observations_total", field="code") == 1
    champion = float(server.models["champion"][0])
    assert _value(after, "vitalrisk_model_version", role="champion") == champion
    assert _value(after, "vitalrisk_audit_healthy") == 1.0
    # bounded: no patient id, request id or raw path in any label
    values = {v for _, labels in after for _, v in labels}
    assert not [v for v in values if "M-" in v or re.search(r"p_[0-9a-f]{20}", v)], values


def test_monitor_verdict_is_read_from_the_summary_on_scrape(server: Server) -> None:
    summary = server.root / "reports" / "monitoring" / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary.write_text(
            json.dumps(
                {
                    "verdict": "warn",
                    "exit_code": 10,
                    "created_at": "2026-11-30T06:00:00+00:00",
                    "drifted_features": ["heart_rate_mean_4h", "spo2_last"],
                }
            )
        )
        s = _scrape(server)
        assert _value(s, "vitalrisk_monitor_verdict", verdict="warn") == 1.0
        assert _value(s, "vitalrisk_monitor_verdict", verdict="ok") == 0.0
        assert _value(s, "vitalrisk_monitor_exit_code") == 10.0
        assert _value(s, "vitalrisk_monitor_drifted_features") == 2.0
        assert _value(s, "vitalrisk_monitor_last_run_timestamp_seconds") == 1796018400.0
        summary.write_text(json.dumps({"verdict": "retrain", "exit_code": 20, "x": 1}))
        s = _scrape(server)
        assert _value(s, "vitalrisk_monitor_verdict", verdict="retrain") == 1.0
        assert _value(s, "vitalrisk_monitor_verdict", verdict="warn") == 0.0
    finally:
        summary.unlink(missing_ok=True)
    s = _scrape(server)
    assert _value(s, "vitalrisk_monitor_verdict", verdict="unknown") == 1.0


def _expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load(RULES.read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return exprs


def test_dashboard_and_rules_name_only_exported_metrics(server: Server) -> None:
    with server.client() as c:  # every series exists once something was scored
        c.post("/v1/score", json={"patients": [patient("M-9", WELL, setting="home")]})
    exported = _names(_scrape(server))
    named: set[str] = set()
    for expr in _expressions():
        without_strings = re.sub(r'"[^"]*"', '""', expr)
        without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", without_strings)
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels):
            if word not in PROMQL_WORDS and "_" in word:
                named.add(word)
    assert any(n.startswith("vitalrisk_") for n in named) and any(
        n.startswith("bentoml_") for n in named
    )
    missing = sorted(n for n in named if n not in exported)
    assert not missing, f"named by the dashboard or rules but not on /metrics: {missing}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_alerts_and_escalations_are_counted_when_answers_carry_them() -> None:
    """Issue 17 adds ``alert`` / ``escalation`` to answers: any truthy value (or an object
    whose ``active``/``raised``/``required`` says so) is counted under bounded labels."""
    from types import SimpleNamespace as NS

    from prometheus_client import REGISTRY

    from serving import metrics

    def get(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        n: get(n, band="high", setting="home")
        for n in ("vitalrisk_alerts_total", "vitalrisk_escalations_total")
    }
    results = [
        NS(risk_band="high", probability=0.9, alert=True, escalation=NS(required=True)),
        NS(risk_band="high", probability=0.8, alert={"raised": False}, escalation="rapid-review"),
        NS(risk_band="high", probability=0.7),  # an answer without the fields: not counted
    ]
    metrics.observe_scores(results, ["home", "home", "home"])
    metrics.observe_scores([NS(risk_band="high", probability=0.5, alert=True)], ["PATIENT-X"])
    assert (
        get("vitalrisk_alerts_total", band="high", setting="home")
        - before["vitalrisk_alerts_total"]
        == 1
    )
    assert (
        get("vitalrisk_escalations_total", band="high", setting="home")
        - before["vitalrisk_escalations_total"]
        == 2
    )
    assert get("vitalrisk_alerts_total", band="high", setting="other") >= 1  # not the raw value
