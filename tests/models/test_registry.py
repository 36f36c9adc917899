"""The promotion gate, promotion, rollback and alias bookkeeping on a real MLflow registry."""

from __future__ import annotations

import json
import re

import pytest
from mlflow import MlflowClient

from models import registry, tracking
from models.config import EvaluateConfig, RegisterConfig, TrainConfig
from models.registry import decide
from models.workflow import evaluate_and_log, register_run, train_and_log
from tests.models.conftest import make_frame

CFG = RegisterConfig(model_name="vr-test", max_calibration_slope_error=0.5)
GOOD = {"auprc": 0.30, "brier": 0.050, "calibration_slope": 1.05}
BASE = {"news2_auprc": 0.18, "auroc_delta": 0.08, "auroc_delta_ci_low": 0.02}


@pytest.mark.parametrize(
    ("new", "baseline", "why"),
    [
        ({**GOOD, "calibration_slope": 3.1}, BASE, "calibration slope 3.100 is outside 0.50-1.50"),
        ({**GOOD, "auprc": 0.0120}, {**BASE, "news2_auprc": 0.0123}, "does not beat NEWS2 0.0123"),
        (GOOD, {**BASE, "auroc_delta_ci_low": -0.108}, "95% interval -0.108"),
        (GOOD, {}, "evaluate metrics missing"),
    ],
)
def test_first_model_that_fails_the_gate_is_not_promoted(new, baseline, why):
    d = decide(new, None, CFG, baseline)
    assert d.promote is False
    assert d.reason.startswith("no champion yet, and it fails the gate") and why in d.reason


def test_first_model_that_passes_becomes_champion():
    d = decide(GOOD, None, CFG, BASE)
    assert d.promote and d.reason.startswith("no champion yet; passes the gate")
    assert d.checks == {"calibration_slope": True, "beats_news2_auprc": True, "auroc_gain_ci": True}


@pytest.mark.parametrize(
    ("new", "promote", "why"),
    [
        ({"auprc": 0.30, "brier": 0.050, "calibration_slope": 1.0}, True, "beats champion"),
        ({"auprc": 0.203, "brier": 0.050, "calibration_slope": 1.0}, False, "AUPRC gain"),
        ({"auprc": 0.30, "brier": 0.060, "calibration_slope": 1.0}, False, "Brier"),
        ({"auprc": 0.30, "brier": 0.050, "calibration_slope": 0.75}, False, "calibration slope"),
        ({"auprc": 0.15, "brier": 0.050, "calibration_slope": 1.0}, False, "NEWS2"),
    ],
)
def test_decide_against_the_champion(new, promote, why):
    champion = {"auprc": 0.20, "brier": 0.055, "calibration_slope": 1.0}
    cfg = RegisterConfig(min_auprc_gain=0.005, max_brier_increase=0.0)  # slope 0.8-1.2
    d = decide(new, champion, cfg, BASE)
    assert d.promote is promote
    assert why in d.reason


@pytest.fixture(scope="module")
def cohort():
    """500 patients where vitals carry more signal than NEWS2's coarse bands capture."""
    return make_frame(n_patients=500, signal=1.5, seed=0)


def _train_and_evaluate(frame, tmp_path, name, **update):
    cfg = TrainConfig(cv_folds=0, n_estimators=200, **update)
    out = tmp_path / name
    train_and_log(frame, cfg, out, {"label": {"horizon_hours": 24}}, {"git_commit": "abc"})
    metrics = evaluate_and_log(
        out,
        frame,
        EvaluateConfig(bootstrap_reps=40, subgroup_bootstrap_reps=0),
        out / "metrics.json",
        out / "plots",
        out / "figures",
        out / "card.md",
    )
    return out, metrics


@pytest.fixture
def no_grace(monkeypatch):
    """Stale tags and deletions are settled at once (another process is not mid-change)."""
    monkeypatch.setattr(registry, "GRACE_SECONDS", 0.0)


def test_gate_promote_rollback_and_external_alias_changes(cohort, mlflow_env, no_grace):
    frame = cohort
    weak, weak_m = _train_and_evaluate(frame, mlflow_env, "weak", features=["age", "sex_f"])
    strong, strong_m = _train_and_evaluate(frame, mlflow_env, "strong")

    # a failing first model is kept as challenger with the reason: never champion
    r1 = register_run(weak, frame, weak_m, CFG, "alice")
    assert (r1["version"], r1["alias"], r1["gate_passed"]) == ("1", "challenger", False)
    assert r1["reason"].startswith("no champion yet, and it fails the gate")
    assert "NEWS2" in r1["reason"] and r1["champion_now"] is None
    assert tracking.get_alias("vr-test", "champion") is None

    r2 = register_run(strong, frame, strong_m, CFG, "bob")
    assert (r2["version"], r2["alias"], r2["decision"]) == ("2", "champion", "promoted")
    assert r2["reason"].startswith("no champion yet; passes the gate")
    # the challenger alias stays on version 1; version 2 holds only champion tags
    assert tracking.aliases("vr-test") == {"champion": "2", "challenger": "1"}

    r3 = register_run(weak, frame, weak_m, CFG, "carol")
    assert (r3["version"], r3["alias"]) == ("3", "challenger")
    assert "AUPRC gain" in r3["reason"] and r3["champion_before"] == "2"
    assert r3["gate"]["champion"]["auprc"] > r3["gate"]["new"]["auprc"]  # same test rows
    v1, v3 = tracking.get_version("vr-test", "1"), tracking.get_version("vr-test", "3")
    assert not any(k.startswith("challenger.") for k in v1.tags), "stale challenger tags"
    assert v3.tags["challenger.actor"] == "carol" and v3.tags["gate.passed"] == "false"
    assert v3.tags["lineage.git_commit"] == "abc"
    assert "Gate: fails" in v3.description
    assert "champion" in MlflowClient().get_registered_model("vr-test").description

    # a person overrides the gate, with a reason (audited as an override)
    pr = registry.promote("vr-test", "3", "erin", "reviewed by the safety board")
    assert pr["override"] is True and pr["previous_version"] == "2"
    v2 = tracking.get_version("vr-test", "2")
    assert not any(k.startswith("champion.") for k in v2.tags), "stale champion tags on v2"
    assert tracking.get_version("vr-test", "3").tags["champion.override"] == "true"
    assert "challenger" not in tracking.aliases("vr-test")  # moved up

    rb = registry.rollback("vr-test", "dave", "alert storm on ward 7")
    assert (rb["version"], rb["rolled_back_version"]) == ("2", "3")
    assert tracking.get_version("vr-test", "3").tags["rolled_back.reason"] == (
        "alert storm on ward 7"
    )
    assert not any(k.startswith("champion.") for k in tracking.get_version("vr-test", "3").tags)
    with pytest.raises(LookupError, match="no previous champion"):
        registry.rollback("vr-test", "dave", "again")

    # someone moves champion in the MLflow UI (the REST API underneath): noticed and audited
    MlflowClient().set_registered_model_alias("vr-test", "champion", "1")
    changes = registry.reconcile("vr-test", noticed_by="test")
    assert changes == [{"alias": "champion", "version": "1", "previous_version": "2"}]
    assert registry.reconcile("vr-test", noticed_by="test") == []  # noticed once
    v1 = tracking.get_version("vr-test", "1")
    assert v1.tags["champion.actor"] == registry.EXTERNAL_ACTOR
    assert not any(k.startswith("champion.") for k in tracking.get_version("vr-test", "2").tags)
    assert registry.champion_history("vr-test")[-1] == "1"
    from pipelines.lineage import model_lineage

    lineage = model_lineage("vr-test", "champion", str(mlflow_env / "audit.jsonl"))
    assert (lineage["version"], lineage["aliases"]) == ("1", ["champion"])
    assert not any("registry tag champion." in p and "dave" in p for p in lineage["promotions"])
    assert model_lineage("vr-test", "2", str(mlflow_env / "audit.jsonl"))["aliases"] == []
    # ... and deletes it: noticed too
    MlflowClient().delete_registered_model_alias("vr-test", "champion")
    gone = registry.reconcile("vr-test", noticed_by="test")
    assert gone == [{"alias": "champion", "version": None, "previous_version": "1"}]
    assert not any(k.startswith("champion.") for k in tracking.get_version("vr-test", "1").tags)

    from governance.audit import AuditLog

    log = AuditLog(mlflow_env / "audit.jsonl")
    assert log.verify().ok
    entries = [json.loads(line) for line in (mlflow_env / "audit.jsonl").read_text().splitlines()]
    actions = [(e["action"], e["actor"], e["model_version"]) for e in entries]
    assert ("register", "alice", "1") in actions and ("promote", "bob", "2") in actions
    assert ("promote", "erin", "3") in actions and ("rollback", "dave", "2") in actions
    override = next(e for e in entries if e["action"] == "promote" and e["actor"] == "erin")
    assert (
        override["details"]["override"] is True
        and "AUPRC gain" in override["details"]["gate_reason"]
    )
    external = [e for e in entries if e["action"] == registry.EXTERNAL_ACTION]
    assert [(e["model_version"], e["details"]["previous_version"]) for e in external] == [
        ("1", "2"),
        (None, "1"),
    ]
    assert not any(re.search(r"p_[0-9a-f]{20}", json.dumps(e)) for e in entries)  # no patient ids


def test_experiment_versions_never_move_an_alias(cohort, mlflow_env):
    frame = cohort
    strong, metrics = _train_and_evaluate(frame, mlflow_env, "strong")
    first = register_run(strong, frame, metrics, CFG, "bob")
    assert first["alias"] == "champion"
    exp = register_run(strong, frame, metrics, CFG, "bob", experiment="nubby-daze")
    assert (exp["alias"], exp["decision"], exp["champion_now"]) == (None, "experiment", "1")
    assert tracking.aliases("vr-test") == {"champion": "1"}
    v2 = tracking.get_version("vr-test", "2")
    assert v2.tags["dvc.experiment"] == "nubby-daze" and "DVC experiment nubby-daze" in (
        v2.description
    )
    assert not any(k.startswith(("champion.", "challenger.")) for k in v2.tags)


def test_promote_unknown_version_fails(mlflow_env):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        registry.promote("nothing-here", "4", "x", "y")
