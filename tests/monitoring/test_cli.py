"""``vitalrisk monitor`` end to end on tmp files: outputs, exit codes, outcomes, workspace."""

import json
from pathlib import Path

import pandas as pd
import pytest

from monitoring import evidently_reports as er
from monitoring import prediction_log as plog
from pipelines.cli import main
from tests.monitoring.conftest import frame

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(tmp_path, reference):
    feats = tmp_path / "features.parquet"
    reference.drop(columns=["probability"]).to_parquet(feats)
    params = tmp_path / "params.yaml"
    params.write_text(
        "monitor:\n  reference_size: 10000\n  current_size: 5000\n  project: test-monitoring\n"
        "  performance: {min_labelled: 100}\n"
    )
    return tmp_path, feats, params


def _argv(tmp, feats, params, log, *extra):
    return [
        "monitor",
        "--features",
        str(feats),
        "--log",
        str(log),
        "--params",
        str(params),
        "--out",
        str(tmp / "reports"),
        "--workspace",
        str(tmp / "ws"),
        "--reference-model",
        "none",
        *extra,
    ]


def test_drifted_log_exits_nonzero_and_writes_report_json_and_workspace(setup, make_log, capsys):
    tmp, feats, params = setup
    log = make_log("hr_offset", seed=21)
    code = main(_argv(tmp, feats, params, log))
    out = capsys.readouterr().out
    assert code in {10, 20}
    assert "verdict:" in out and "heart_rate" in out
    summary = json.loads((tmp / "reports" / "summary.json").read_text())
    assert summary["verdict"] in {"warn", "retrain"}
    assert summary["exit_code"] == code
    assert any(f.startswith("heart_rate") for f in summary["drifted_features"])
    html = (tmp / "reports" / "report.html").read_text()
    assert "heart_rate_mean_4h" in html
    assert summary["workspace"]["project"] == "test-monitoring"
    runs = er.list_workspace_runs(tmp / "ws", "test-monitoring")
    assert set(summary["workspace"]["snapshot_ids"]) <= set(runs)
    # a second run is added to the same project: the history the UI shows
    assert main(_argv(tmp, feats, params, log, "--exit-zero")) == 0
    assert len(er.list_workspace_runs(tmp / "ws", "test-monitoring")) == 2 * len(runs)


def test_outcome_file_is_joined_and_performance_reported(setup, make_log, capsys):
    tmp, feats, params = setup
    cur = frame(1000, seed=22)
    log = make_log(data=cur)
    w = plog.find_window(log, 3650, "champion")
    ids = pd.concat(plog.iter_window(log, w, "champion", {}, 10_000))
    outcomes = pd.DataFrame(
        {
            "request_id": ids["request_id"],
            "event": ["icu_transfer" if y else "" for y in cur["label"]],
        }
    )
    path = tmp / "outcomes.csv"
    outcomes.to_csv(path, index=False)
    code = main(_argv(tmp, feats, params, log, "--outcomes", str(path), "--no-workspace"))
    assert code in {0, 10, 20}
    summary = json.loads((tmp / "reports" / "summary.json").read_text())
    perf = summary["performance"]
    assert perf["evaluated"] and perf["overall"]["n"] == 1000
    assert perf["overall"]["positives"] == int(cur["label"].sum())
    assert (tmp / "reports" / "performance.html").is_file()


def test_user_errors_are_one_line_exit_2(setup, tmp_path, make_log, capsys):
    tmp, feats, params = setup
    missing = tmp / "nope.sqlite"
    assert main(_argv(tmp, feats, params, missing)) == 2
    assert "prediction log not found" in capsys.readouterr().err
    bad = tmp / "bad.yaml"
    bad.write_text("monitor:\n  windw_days: 3\n")
    assert main(_argv(tmp, feats, bad, make_log())) == 2
    assert "monitor.windw_days: unknown key" in capsys.readouterr().err
    outcomes = tmp / "o.csv"
    outcomes.write_text("x,y\n1,2\n")
    assert main(_argv(tmp, feats, params, make_log(), "--outcomes", str(outcomes))) == 2
    assert "o.csv" in capsys.readouterr().err


def test_no_log_yet_writes_a_no_data_summary_when_asked(setup):
    tmp, feats, params = setup
    argv = _argv(tmp, feats, params, tmp / "none.sqlite", "--if-no-log", "skip", "--exit-zero")
    assert main(argv) == 0
    summary = json.loads((tmp / "reports" / "summary.json").read_text())
    assert summary["status"] == "no_data" and summary["verdict"] == "ok"


def test_dvc_stage_declares_paths_and_params():
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["monitor"]
    assert "--exit-zero" in stage["cmd"] and "--if-no-log skip" in stage["cmd"]
    assert "monitor" in stage["params"]
    assert any("reports/monitoring" in str(o) for o in stage["outs"])
