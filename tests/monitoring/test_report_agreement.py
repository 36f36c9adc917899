"""The monitor agrees with itself: report.html and summary.json come from the same frames and
tests; too little data is ``insufficient_data``; performance is judged at the alert threshold."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from monitoring import prediction_log as plog
from pipelines.cli import main
from tests.monitoring.conftest import frame

WIDGET = re.compile(
    r"\"value\": \"Drift in column '(?P<col>[^']+)'\", \"label\": \"Data drift (?P<flag>detected|not detected)"
)


@pytest.fixture
def setup(tmp_path, reference):
    feats = tmp_path / "features.parquet"
    ids = [f"p_{i % 1500 + 5000:020x}" for i in range(len(reference))]  # ~7 rows per patient
    reference.drop(columns=["probability"]).assign(patient_id=ids).to_parquet(feats)
    params = tmp_path / "params.yaml"
    params.write_text(
        "monitor:\n  reference_size: 10000\n  current_size: 5000\n  project: test-monitoring\n"
        "  segment_by: [setting]\n  report_columns: 12\n"
        "  drift: {unit: patient, numerical: {method: ks, threshold: 0.0001}}\n"
        "  performance: {min_labelled: 100, alert_threshold: 0.1}\n"
    )
    return tmp_path, feats, params


def _monitor(tmp: Path, feats: Path, params: Path, log: Path, *extra: str) -> int:
    argv = ["monitor", "--features", str(feats), "--log", str(log), "--params", str(params)]
    argv += ["--out", str(tmp / "reports"), "--reference-model", "none", "--no-workspace"]
    return main([*argv, *extra])


def test_html_widgets_and_summary_name_the_same_drifted_features(setup, make_log):
    tmp, feats, params = setup
    code = _monitor(tmp, feats, params, make_log("hr_offset", seed=31))
    summary = json.loads((tmp / "reports" / "summary.json").read_text())
    assert code == summary["exit_code"] in {10, 20}
    page = (tmp / "reports" / "report.html").read_text()
    widgets = {m["col"]: m["flag"] == "detected" for m in WIDGET.finditer(page)}
    assert widgets, "no drift widgets in the report"
    # every widget is one of the verdict's tests, with the verdict's decision
    assert widgets == {k: v["drifted"] for k, v in summary["report_widgets"].items()}
    shown_drifted = {name.split(" | ")[0] for name, d in widgets.items() if d}
    assert shown_drifted and shown_drifted <= set(summary["drifted_features"])
    # a home-only wearable offset shows as a drifted segment widget, per patient
    assert any(" | setting=home" in n and d for n, d in widgets.items()), widgets
    assert summary["drift_unit"] == "patient"
    # the verdict and its reasons come first, naming every drifted feature
    header = page.index('id="vitalrisk-verdict"')
    assert header < page.index("drawDashboard")
    top = page[header : page.index("</section>", header)]
    assert f"Verdict: {summary['verdict']}" in top
    for name in summary["drifted_features"]:
        assert name in top
    for reason in summary["reasons"]:
        assert html.escape(reason) in top


def test_widget_scores_are_evidentlys_own(setup, make_log):
    """The HTML widgets' scores, read back from the snapshot, equal the summary's scores."""
    tmp, feats, params = setup
    log = make_log("older", seed=32)
    _monitor(tmp, feats, params, log, "--exit-zero")
    summary = json.loads((tmp / "reports" / "summary.json").read_text())
    page = (tmp / "reports" / "report.html").read_text()
    shown = {m["col"] for m in WIDGET.finditer(page)}
    overall = [c for c in shown if " | " not in c and c in summary["features"]]
    assert "age" in overall
    for c in overall:
        score = summary["features"][c]["score"]
        text = re.search(
            rf"Drift in column '{re.escape(c)}'\", \"label\": \"[^\"]*Drift score: ([0-9.e-]+)",
            page,
        )
        assert text, c
        assert float(text.group(1)) == pytest.approx(score, rel=1e-3, abs=1e-3)


def test_a_handful_of_predictions_is_insufficient_data(setup, make_log):
    tmp, feats, params = setup
    code = _monitor(tmp, feats, params, make_log(data=frame(7, seed=33)))
    summary = json.loads((tmp / "reports" / "summary.json").read_text())
    assert (code, summary["verdict"], summary["status"]) == (
        3,
        "insufficient_data",
        "insufficient_data",
    )
    assert summary["drifted_features"] == [] and "retrain" not in json.dumps(summary["reasons"])
    assert "monitor.min_units" in summary["reasons"][0]
    page = (tmp / "reports" / "report.html").read_text()
    assert "Verdict: insufficient_data" in page and "drawDashboard" not in page
    assert _monitor(tmp, feats, params, make_log(data=frame(7, seed=33)), "--exit-zero") == 0


def test_performance_is_judged_at_the_alert_threshold_with_calibration(setup, make_log):
    tmp, feats, params = setup
    cur = frame(2000, seed=34)
    log = make_log(data=cur)
    w = plog.find_window(log, 3650, "champion")
    ids = pd.concat(plog.iter_window(log, w, "champion", {}, 10_000))
    outcomes = tmp / "outcomes.csv"
    pd.DataFrame({"request_id": ids["request_id"], "label": cur["label"]}).to_csv(
        outcomes, index=False
    )
    _monitor(tmp, feats, params, log, "--outcomes", str(outcomes), "--exit-zero")
    perf = json.loads((tmp / "reports" / "summary.json").read_text())["performance"]
    t = perf["at_alert_threshold"]
    p, y = cur["probability"].to_numpy(), cur["label"].to_numpy()
    assert t["threshold"] == 0.1 and t["alerts"] == int((p >= 0.1).sum())
    assert t["sensitivity"] == pytest.approx(((p >= 0.1) & (y == 1)).sum() / y.sum())
    assert sum(b["n"] for b in perf["calibration"]) == len(cur)
    page = (tmp / "reports" / "performance.html").read_text()
    top = page[: page.index("drawDashboard")]
    assert "alert threshold" in top and "0.100" in top
    assert '<img alt="calibration plot" src="data:image/png;base64,' in top


def test_summary_snapshot_counters_carry_the_verdict(setup, make_log):
    tmp, feats, params = setup
    ws = tmp / "ws"
    argv = ["monitor", "--features", str(feats), "--log", str(make_log("older", seed=35))]
    argv += ["--params", str(params), "--out", str(tmp / "r"), "--workspace", str(ws)]
    assert main([*argv, "--reference-model", "none", "--exit-zero"]) == 0
    summary = json.loads((tmp / "r" / "summary.json").read_text())
    from evidently.ui.workspace import Workspace

    w = Workspace.create(str(ws))
    (project,) = w.search_project("test-monitoring")
    snap = w.get_run(project.id, summary["workspace"]["snapshot_ids"][-1])
    values = {
        r["metric_value_location"]["metric"]["params"]["column"]: r["value"]
        for r in snap.dict()["metric_results"].values()
    }
    assert values["drifted_features"] == len(summary["drifted_features"]) >= 1
    assert values["verdict_level"] == {"warn": 1, "retrain": 2}[summary["verdict"]]
