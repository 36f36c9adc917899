"""Champion/challenger gate, promotion and rollback on a real MLflow registry."""

from __future__ import annotations

import json
import re

import pytest

from models import registry, tracking
from models.config import RegisterConfig, TrainConfig
from models.registry import decide
from models.workflow import register_run, train_and_log

CFG = RegisterConfig(model_name="vr-test", max_calibration_slope_error=1.0)


def test_decide_first_model_is_champion_even_with_warnings():
    d = decide({"auprc": 0.1, "brier": 0.05, "calibration_slope": 3.0}, None, CFG, 0.2)
    assert d.promote and d.reason.startswith("first model")
    assert "warnings" in d.reason and "NEWS2" in d.reason


@pytest.mark.parametrize(
    ("new", "promote", "why"),
    [
        ({"auprc": 0.30, "brier": 0.050, "calibration_slope": 1.0}, True, "beats champion"),
        ({"auprc": 0.203, "brier": 0.050, "calibration_slope": 1.0}, False, "AUPRC gain"),
        ({"auprc": 0.30, "brier": 0.060, "calibration_slope": 1.0}, False, "Brier"),
        ({"auprc": 0.30, "brier": 0.050, "calibration_slope": 0.4}, False, "calibration slope"),
        ({"auprc": 0.15, "brier": 0.050, "calibration_slope": 1.0}, False, "NEWS2"),
    ],
)
def test_decide_margins(new, promote, why):
    champion = {"auprc": 0.20, "brier": 0.055, "calibration_slope": 1.0}
    cfg = RegisterConfig(min_auprc_gain=0.005, max_brier_increase=0.0)
    d = decide(new, champion, cfg, news2_auprc=0.18)
    assert d.promote is promote
    assert why in d.reason


def _train(frame, tmp_path, name, **update):
    cfg = TrainConfig(cv_folds=0, n_estimators=200, **update)
    out = tmp_path / name
    train_and_log(frame, cfg, out, {"label": {"horizon_hours": 24}}, {"git_commit": "abc"})
    return out


def test_gate_trains_twice_then_promote_and_rollback(frame, mlflow_env, tmp_path):
    weak = _train(frame, tmp_path, "weak", features=["age", "sex_f"])
    strong = _train(frame, tmp_path, "strong")

    r1 = register_run(weak, frame, {}, CFG, "alice")
    assert (r1["version"], r1["alias"]) == ("1", "champion")
    assert r1["reason"].startswith("first model")

    r2 = register_run(strong, frame, {}, CFG, "bob")
    assert (r2["version"], r2["alias"], r2["decision"]) == ("2", "champion", "promoted")
    assert r2["reason"].startswith("beats champion")
    assert r2["champion_before"] == "1"
    # champion re-scored on the same test rows
    assert r2["gate"]["champion"]["auprc"] < r2["gate"]["new"]["auprc"]

    r3 = register_run(weak, frame, {}, CFG, "carol")
    assert (r3["version"], r3["alias"], r3["decision"]) == ("3", "challenger", "challenger")
    assert "AUPRC gain" in r3["reason"]
    assert str(tracking.get_alias("vr-test", "champion").version) == "2"
    v3 = tracking.get_version("vr-test", "3")
    assert v3.tags["challenger.actor"] == "carol"
    assert "AUPRC gain" in v3.tags["challenger.reason"]
    assert v3.tags["gate.decision"] == "challenger"
    assert v3.tags["lineage.git_commit"] == "abc"
    assert registry.champion_history("vr-test") == ["1", "2"]

    rb = registry.rollback("vr-test", "dave", "alert storm on ward 7")
    assert (rb["version"], rb["rolled_back_version"]) == ("1", "2")
    assert str(tracking.get_alias("vr-test", "champion").version) == "1"
    v2 = tracking.get_version("vr-test", "2")
    assert v2.tags["rolled_back.reason"] == "alert storm on ward 7"
    with pytest.raises(LookupError, match="no previous champion"):
        registry.rollback("vr-test", "dave", "again")

    pr = registry.promote("vr-test", "3", "erin", "reviewed by the safety board")
    assert pr["previous_version"] == "1"
    assert str(tracking.get_alias("vr-test", "champion").version) == "3"
    assert tracking.get_alias("vr-test", "challenger") is None  # moved up
    assert tracking.get_version("vr-test", "3").tags["champion.reason"] == (
        "reviewed by the safety board"
    )
    rb2 = registry.rollback("vr-test", "erin", "back")
    assert rb2["version"] == "1"

    # every alias change is in the hash-chained audit log with who and why
    from governance.audit import AuditLog

    log = AuditLog(mlflow_env / "audit.jsonl")
    assert log.verify().ok
    entries = [json.loads(line) for line in (mlflow_env / "audit.jsonl").read_text().splitlines()]
    actions = [(e["action"], e["actor"], e["model_version"]) for e in entries]
    assert ("promote", "bob", "2") in actions
    assert ("rollback", "dave", "1") in actions
    assert ("promote", "erin", "3") in actions
    assert any(e["details"].get("reason") == "alert storm on ward 7" for e in entries)
    assert not any(re.search(r"p_[0-9a-f]{20}", json.dumps(e)) for e in entries)  # no patient ids


def test_promote_unknown_version_fails(mlflow_env):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        registry.promote("nothing-here", "4", "x", "y")
