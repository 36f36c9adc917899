"""Champion/challenger promotion on top of MLflow registry aliases.

Rules (``register`` params):
* Every trained model becomes a new registered version, tagged with its run, metrics, the
  fingerprint of the test set it was judged on and, inside a DVC experiment, the experiment.
* The gate holds for every model, the first included. Absolute checks: calibration slope
  within ``max_calibration_slope_error`` of 1, AUPRC above NEWS2's and the lower end of the
  95% interval of AUROC(model) - AUROC(NEWS2) above ``min_auroc_gain_ci_low`` (the same test
  rows). Against a champion, also on the same test rows (the champion is re-scored): AUPRC
  gain of at least ``min_auprc_gain`` and Brier not worse by more than ``max_brier_increase``.
  A model that passes becomes ``champion``; one that fails becomes ``challenger`` with the
  reason. A DVC experiment's model is registered and judged, but gets no alias: experiments
  never change what runs on patients. ``vitalrisk promote`` overrides, with a reason.
* Every alias change is recorded with who, when and why: as model-version tags (only on the
  version that holds the alias: the previous holder's are cleared), in the registered model's
  ``champion_history`` tag (for rollback) and in the governance audit log.
* Alias changes made outside vitalrisk (the MLflow UI's pencil, the REST API) are noticed by
  :func:`reconcile`: the version holding an alias has no ``<alias>.actor`` tag (vitalrisk
  writes the tags before it moves an alias). They are audited as such and tagged.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from models import tracking
from models.config import RegisterConfig
from models.metrics import auprc, brier, calibration_slope_intercept
from models.pyfunc import RiskModel

log = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"
#: registered-model tag: the aliases as vitalrisk last saw them (to notice external deletions)
ALIAS_STATE_TAG = "vitalrisk.aliases"
#: version tags ``<alias>.<key>`` that describe who put the alias there
ALIAS_TAG_KEYS = ("alias", "actor", "at", "reason", "override")
ALIASES = (tracking.CHAMPION, tracking.CHALLENGER)
EXTERNAL_ACTOR = "external (MLflow UI or REST API)"
EXTERNAL_ACTION = "alias_changed_outside"
#: an operation of another vitalrisk process may be between its steps for this long
GRACE_SECONDS = 30.0


def default_actor(actor: str | None = None) -> str:
    if actor:
        return actor
    for var in ("VITALRISK_ACTOR", "USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # pragma: no cover - no passwd entry in some containers
        return "unknown"


def audit(
    actor: str, action: str, resource: str, version: str | None, details: Mapping[str, Any]
) -> None:
    """Append to the governance audit log (raises if it cannot be written: fail closed)."""
    from governance.audit import default_audit_store

    store = default_audit_store()  # the database chain in team mode, else the file
    try:
        store.append(
            actor=actor,
            action=action,
            resource=resource,
            model_version=version,
            details=dict(details),
        )
    finally:
        store.close()


def gate_metrics(model: RiskModel, frame: pd.DataFrame) -> dict[str, float | None]:
    """Gate metrics of ``model`` on ``frame`` (rows with ``label`` and the feature columns)."""
    y = frame["label"].to_numpy(int)
    p = model.predict_proba(frame)
    cal = calibration_slope_intercept(y, p)
    return {
        "auprc": auprc(y, p),
        "brier": brier(y, p),
        "calibration_slope": cal["calibration_slope"],
    }


@dataclass
class GateDecision:
    promote: bool
    reason: str
    new: dict[str, float | None]
    champion: dict[str, float | None] | None = None
    checks: dict[str, bool] = field(default_factory=dict)


def baseline_from_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | None]:
    """NEWS2 figures the gate needs from the evaluate stage's metrics (same test rows)."""
    metrics = metrics or {}
    news2, delta = metrics.get("news2") or {}, metrics.get("delta") or {}
    return {
        "news2_auprc": news2.get("auprc"),
        "auroc_delta": delta.get("auroc"),
        "auroc_delta_ci_low": delta.get("auroc_ci_low"),
        "auroc_delta_ci_high": delta.get("auroc_ci_high"),
    }


def _f(v: float | None, nd: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def absolute_checks(
    new: Mapping[str, float | None],
    config: RegisterConfig,
    baseline: Mapping[str, float | None] | None,
) -> tuple[dict[str, bool], list[str]]:
    """Checks every model must pass, champion or not: calibration, and better than NEWS2."""
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    b = dict(baseline or {})
    slope = new.get("calibration_slope")
    checks["calibration_slope"] = (
        slope is not None and abs(slope - 1.0) <= config.max_calibration_slope_error
    )
    if not checks["calibration_slope"]:
        lo, hi = 1 - config.max_calibration_slope_error, 1 + config.max_calibration_slope_error
        reasons.append(f"calibration slope {_f(slope, 3)} is outside {lo:.2f}-{hi:.2f}")
    if config.require_beats_news2:
        n2 = b.get("news2_auprc")
        ok = n2 is not None and (new.get("auprc") or 0.0) > n2
        checks["beats_news2_auprc"] = ok
        if not ok:
            reasons.append(
                f"AUPRC {_f(new.get('auprc'))} does not beat NEWS2 {_f(n2)}"
                if n2 is not None
                else "NEWS2 AUPRC on the test rows is unknown (evaluate metrics missing)"
            )
    if config.min_auroc_gain_ci_low is not None:
        low = b.get("auroc_delta_ci_low")
        ok = low is not None and low > config.min_auroc_gain_ci_low
        checks["auroc_gain_ci"] = ok
        if not ok:
            reasons.append(
                f"AUROC difference to NEWS2 {_f(b.get('auroc_delta'), 3)} has a 95% interval "
                f"{_f(low, 3)} to {_f(b.get('auroc_delta_ci_high'), 3)}, not above "
                f"{config.min_auroc_gain_ci_low:g}"
                if low is not None
                else "no 95% interval of the AUROC difference to NEWS2 (evaluate metrics missing)"
            )
    return checks, reasons


def decide(
    new: Mapping[str, float | None],
    champion: Mapping[str, float | None] | None,
    config: RegisterConfig,
    baseline: Mapping[str, float | None] | None = None,
) -> GateDecision:
    """Pure gate: absolute checks for every model, then the comparison with the champion."""
    new_d = dict(new)
    checks, reasons = absolute_checks(new_d, config, baseline)
    if champion is None:
        if reasons:
            reason = f"no champion yet, and it fails the gate: {'; '.join(reasons)}"
            return GateDecision(False, reason, new_d, None, checks)
        reason = f"no champion yet; passes the gate ({', '.join(checks)})"
        return GateDecision(True, reason, new_d, None, checks)
    c = dict(champion)
    gain = (new_d.get("auprc") or 0.0) - (c.get("auprc") or 0.0)
    checks["auprc_gain"] = gain >= config.min_auprc_gain
    if not checks["auprc_gain"]:
        reasons.append(
            f"AUPRC gain {gain:+.4f} over champion ({_f(c.get('auprc'))}) is below the required "
            f"{config.min_auprc_gain}"
        )
    d_brier = (new_d.get("brier") or 1.0) - (c.get("brier") or 1.0)
    checks["brier"] = d_brier <= config.max_brier_increase
    if not checks["brier"]:
        reasons.append(
            f"Brier {_f(new_d.get('brier'))} is worse than champion {_f(c.get('brier'))} by "
            f"more than {config.max_brier_increase}"
        )
    if all(checks.values()):
        reason = (
            f"beats champion: AUPRC {_f(new_d.get('auprc'))} vs {_f(c.get('auprc'))} "
            f"(gain {gain:+.4f}), Brier {_f(new_d.get('brier'))} vs {_f(c.get('brier'))}"
        )
        return GateDecision(True, reason, new_d, c, checks)
    return GateDecision(False, "; ".join(reasons), new_d, c, checks)


# -- alias bookkeeping ---------------------------------------------------------------------------


def champion_history(model_name: str) -> list[str]:
    raw = tracking.get_registered_model_tags(model_name).get(HISTORY_TAG, "[]")
    try:
        return [str(v) for v in json.loads(raw)]
    except json.JSONDecodeError:
        return []


def _save_history(model_name: str, history: list[str]) -> None:
    tracking.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history[-200:]))


def _alias_state(model_name: str) -> dict[str, Any] | None:
    raw = tracking.get_registered_model_tags(model_name).get(ALIAS_STATE_TAG)
    try:
        state = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return state if isinstance(state, dict) else None


def _record_aliases(model_name: str) -> None:
    """Remember the registry's aliases as they are now (after our own change)."""
    state = {"aliases": tracking.aliases(model_name), "at": tracking.now_iso()}
    tracking.set_registered_model_tag(model_name, ALIAS_STATE_TAG, json.dumps(state))


def _age_seconds(at: str | None) -> float:
    if not at:
        return float("inf")
    try:
        then = datetime.fromisoformat(at)
    except ValueError:
        return float("inf")
    return (datetime.fromisoformat(tracking.now_iso()) - then).total_seconds()


def _clear_alias_tags(model_name: str, version: str, alias: str) -> None:
    tracking.delete_version_tags(model_name, version, [f"{alias}.{k}" for k in ALIAS_TAG_KEYS])


def _move_alias(
    model_name: str, alias: str, version: str, actor: str, reason: str
) -> tuple[dict[str, str], str | None]:
    """Point ``alias`` at ``version`` (tags first), clear the previous holder's tags."""
    previous = tracking.get_alias(model_name, alias)
    prev = None if previous is None else str(previous.version)
    record = tracking.set_alias(model_name, alias, version, actor, reason)
    if prev is not None and prev != str(version):
        _clear_alias_tags(model_name, prev, alias)
    return record, prev


def set_champion(
    model_name: str,
    version: str,
    actor: str,
    reason: str,
    action: str = "promote",
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Move ``champion`` to ``version``; record tags, history and an audit entry."""
    record, prev = _move_alias(model_name, tracking.CHAMPION, version, actor, reason)
    challenger = tracking.get_alias(model_name, tracking.CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        tracking.delete_alias(model_name, tracking.CHALLENGER)
        _clear_alias_tags(model_name, str(version), tracking.CHALLENGER)
    if action != "rollback":
        _save_history(model_name, [*champion_history(model_name), str(version)])
    _record_aliases(model_name)
    info = {"alias": tracking.CHAMPION, "previous_version": prev, "reason": reason}
    audit(
        actor,
        action,
        f"models:/{model_name}@{tracking.CHAMPION}",
        str(version),
        {**info, **dict(details or {})},
    )
    return {**record, "version": str(version), "previous_version": prev}


def set_challenger(model_name: str, version: str, actor: str, reason: str) -> dict[str, Any]:
    record, prev = _move_alias(model_name, tracking.CHALLENGER, version, actor, reason)
    _record_aliases(model_name)
    audit(
        actor,
        "register",
        f"models:/{model_name}@{tracking.CHALLENGER}",
        str(version),
        {"alias": tracking.CHALLENGER, "previous_version": prev, "reason": reason},
    )
    return {**record, "version": str(version), "previous_version": prev}


def _clear_stale_tags(
    model_name: str, versions: Mapping[str, Mapping[str, str]], actual: Mapping[str, str]
) -> None:
    """Remove ``<alias>.*`` tags from versions that no longer hold the alias (settled ones:
    a version tagged moments ago may be about to receive it from another process)."""
    for version, tags in versions.items():
        for alias in ALIASES:
            stale = f"{alias}.actor" in tags and actual.get(alias) != version
            if stale and _age_seconds(tags.get(f"{alias}.at")) >= GRACE_SECONDS:
                _clear_alias_tags(model_name, version, alias)


def reconcile(model_name: str, noticed_by: str) -> list[dict[str, Any]]:
    """Notice alias changes made outside vitalrisk; audit them, tag them, clear stale tags.

    * an alias held by a version without ``<alias>.actor`` was set outside vitalrisk;
    * an alias vitalrisk last saw that is gone was deleted outside vitalrisk;
    * ``<alias>.*`` tags on a version that does not hold the alias are stale: removed.

    Changes younger than ``GRACE_SECONDS`` may belong to another vitalrisk process that is
    between its steps, so deletions and stale tags wait for a later call. Returns the changes.
    """
    if not tracking.store_exists():
        return []
    actual = tracking.aliases(model_name)
    versions = {str(mv.version): dict(mv.tags or {}) for mv in tracking.list_versions(model_name)}
    state = _alias_state(model_name)
    settled = state is None or _age_seconds(state.get("at")) >= GRACE_SECONDS
    changes: list[dict[str, Any]] = []
    seen = dict((state or {}).get("aliases") or {})
    for alias, version in sorted(actual.items()):
        if f"{alias}.actor" in versions.get(version, {}):
            continue
        changes.append({"alias": alias, "version": version, "previous_version": seen.get(alias)})
        tracking.set_alias(
            model_name,
            alias,
            version,
            EXTERNAL_ACTOR,
            f"set outside vitalrisk; noticed by {noticed_by}",
        )
    if settled:
        for alias, version in sorted(seen.items()):
            if alias not in actual:
                changes.append({"alias": alias, "version": None, "previous_version": version})
        _clear_stale_tags(model_name, versions, actual)
    for ch in changes:
        audit(
            EXTERNAL_ACTOR,
            EXTERNAL_ACTION,
            f"models:/{model_name}@{ch['alias']}",
            ch["version"],
            {**ch, "noticed_by": noticed_by},
        )
        log.warning(
            "%s@%s changed outside vitalrisk: %s -> %s (noticed by %s)",
            model_name,
            ch["alias"],
            ch["previous_version"],
            ch["version"],
            noticed_by,
        )
    champion = actual.get(tracking.CHAMPION)
    history = champion_history(model_name)
    if champion is not None and (not history or history[-1] != champion):
        _save_history(model_name, [*history, champion])  # e.g. set by an older vitalrisk
    if changes or (settled and seen != actual):
        _record_aliases(model_name)
    return changes


def promote(model_name: str, version: str, actor: str, reason: str) -> dict[str, Any]:
    """Manual promotion (``vitalrisk promote``): any existing version can become champion.

    A version that failed the gate (or came from an experiment) can be promoted too: the
    override is recorded in its tags and the audit entry, with the gate's reason.
    """
    mv = tracking.get_version(model_name, version)  # raises if it does not exist
    reconcile(model_name, noticed_by=f"vitalrisk promote ({actor})")
    tags = dict(mv.tags or {})
    passed = tags.get("gate.passed")
    override = passed is not None and passed != "true"
    details = {"override": override, "gate_reason": tags.get("gate.reason")} if override else {}
    record = set_champion(model_name, version, actor, reason, action="promote", details=details)
    if override:
        tracking.set_version_tags(model_name, version, {"champion.override": "true"})
    return {**record, "override": override, "gate_reason": tags.get("gate.reason")}


def rollback(model_name: str, actor: str, reason: str) -> dict[str, Any]:
    """Champion back to the previous champion in the recorded history."""
    reconcile(model_name, noticed_by=f"vitalrisk rollback ({actor})")
    history = champion_history(model_name)
    current = tracking.get_alias(model_name, tracking.CHAMPION)
    if current is None:
        raise LookupError(f"{model_name} has no champion to roll back")
    cur = str(current.version)
    while history and history[-1] == cur:
        history.pop()
    if not history:
        raise LookupError(f"{model_name}: no previous champion recorded before version {cur}")
    target = history[-1]
    record = set_champion(model_name, target, actor, reason, action="rollback")
    _save_history(model_name, history)
    tracking.set_version_tags(
        model_name,
        cur,
        {"rolled_back.actor": actor, "rolled_back.at": record["at"], "rolled_back.reason": reason},
    )
    return {**record, "rolled_back_version": cur}


# -- registration ---------------------------------------------------------------------------------


def _champion_metrics(
    name: str, champ_mv: Any | None, test_frame: pd.DataFrame
) -> tuple[dict[str, float | None] | None, str | None]:
    """The champion's gate metrics on the new test rows, or why they cannot be had."""
    if champ_mv is None:
        return None, None
    try:
        _, champ_model = tracking.load_version(name, str(champ_mv.version))
    except Exception as exc:  # a champion that cannot be loaded must not block registration
        return None, f"champion v{champ_mv.version} could not be scored: {exc}"
    missing = [c for c in champ_model.feature_names if c not in test_frame.columns]
    if missing:
        return None, f"champion needs features absent from this test set: {missing[:5]}"
    return gate_metrics(champ_model, test_frame), None


def version_description(
    decision: GateDecision, experiment: str | None, version_tags: Mapping[str, Any]
) -> str:
    """What a reviewer reads on the version's page in the MLflow UI."""
    commit = str(version_tags.get("lineage.git_commit") or "unknown commit")[:12]
    where = f"DVC experiment {experiment}" if experiment else "the DVC pipeline (dvc repro)"
    new = decision.new
    verdict = "passes" if decision.promote else "fails"
    return (
        f"Trained by {where} at commit {commit}. Test set: AUPRC {_f(new.get('auprc'))}, "
        f"Brier {_f(new.get('brier'))}, calibration slope {_f(new.get('calibration_slope'), 3)}. "
        f"Gate: {verdict} - {decision.reason}"
    )


MODEL_DESCRIPTION = (
    "Calibrated LightGBM risk of clinical deterioration (ICU transfer, rapid response, "
    "emergency admission, death) within the label horizon of each care setting, from vital "
    "signs, wearables and labs. Aliases: champion = what the service scores patients with, "
    "moved only by the promotion gate or `vitalrisk promote`; challenger = the last model "
    "that failed the gate (scored in shadow). Tags on each version say who moved an alias, "
    "when and why; the audit log has the full history."
)


def register_and_gate(
    model_uri: str,
    test_frame: pd.DataFrame,
    new_model: RiskModel,
    config: RegisterConfig,
    actor: str,
    version_tags: Mapping[str, Any] | None = None,
    baseline: Mapping[str, float | None] | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` as a new version and apply the gate (no alias in experiments)."""
    name = config.model_name
    reconcile(name, noticed_by=f"vitalrisk register ({actor})")
    champ_mv = tracking.get_alias(name, tracking.CHAMPION)
    new_m = gate_metrics(new_model, test_frame)
    champ_m, incomparable = _champion_metrics(name, champ_mv, test_frame)
    if incomparable:
        decision = GateDecision(False, incomparable, new_m, None, {"comparable": False})
    else:
        decision = decide(new_m, champ_m, config, baseline)
    tags = {
        **(version_tags or {}),
        **{f"test.{k}": ("" if v is None else f"{v:.6f}") for k, v in new_m.items()},
        "gate.passed": str(decision.promote).lower(),
        "gate.reason": decision.reason,
        **({"dvc.experiment": experiment} if experiment else {}),
    }
    description = version_description(decision, experiment, tags)
    version = tracking.register_version(model_uri, name, tags, description)
    if not tracking.get_registered_model_tags(name).get("vitalrisk.described"):
        tracking.describe_model(name, MODEL_DESCRIPTION)
        tracking.set_registered_model_tag(name, "vitalrisk.described", "true")
    details = {"model_uri": model_uri, "gate_passed": decision.promote, "experiment": experiment}
    audit(actor, "register", f"models:/{name}/{version}", version, details)
    alias_record: dict[str, Any] | None
    if experiment:
        alias, outcome, alias_record = None, "experiment", None
    elif decision.promote:
        alias, outcome = tracking.CHAMPION, "promoted"
        alias_record = set_champion(name, version, actor, decision.reason)
    else:
        alias, outcome = tracking.CHALLENGER, "challenger"
        alias_record = set_challenger(name, version, actor, decision.reason)
    tracking.set_version_tags(name, version, {"gate.decision": outcome})
    now = tracking.get_alias(name, tracking.CHAMPION)
    result = {
        "model_name": name,
        "version": version,
        "alias": alias,
        "decision": outcome,
        "gate_passed": decision.promote,
        "reason": decision.reason,
        "experiment": experiment,
        "champion_before": None if champ_mv is None else str(champ_mv.version),
        "champion_now": None if now is None else str(now.version),
        "gate": {k: v for k, v in asdict(decision).items() if k != "reason"},
        "baseline": dict(baseline or {}),
        "alias_change": alias_record,
        "test_rows": len(test_frame),
    }
    log.info("%s v%s -> %s: %s", name, version, alias or "no alias (experiment)", decision.reason)
    return json.loads(json.dumps(result, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
