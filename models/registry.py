"""Champion/challenger promotion on top of MLflow registry aliases.

Rules (``register`` params):
* Every trained model becomes a new registered version, tagged with its run, metrics and the
  fingerprint of the test set it was judged on.
* The first version becomes ``champion``. Later versions are compared with the current
  champion **on the same test rows** (the champion is re-scored on the new test set): the new
  version is promoted only if its AUPRC beats the champion's by ``min_auprc_gain``, its Brier
  score is not worse by more than ``max_brier_increase``, its calibration slope is within
  ``max_calibration_slope_error`` of 1 and (optionally) it beats NEWS2. Otherwise it gets the
  ``challenger`` alias and the reason is recorded.
* Every alias change is recorded with who, when and why: as model-version tags, in the
  registered model's ``champion_history`` tag (for rollback) and in the governance audit log.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from models import tracking
from models.config import RegisterConfig
from models.metrics import auprc, brier, calibration_slope_intercept
from models.pyfunc import RiskModel

log = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"


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
) -> bool:
    """Append to the governance audit log; False (and a warning) if it is unavailable."""
    try:
        from governance.audit import AuditLog
    except ImportError:  # pragma: no cover - governance module not installed
        log.warning("governance.audit not available; %s of %s not audited", action, resource)
        return False
    AuditLog().append(
        actor=actor,
        action=action,
        resource=resource,
        model_version=version,
        details=dict(details),
    )
    return True


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


def decide(
    new: Mapping[str, float | None],
    champion: Mapping[str, float | None] | None,
    config: RegisterConfig,
    news2_auprc: float | None = None,
) -> GateDecision:
    """Pure gate: compare metrics of the new version with the champion's (same test rows)."""
    new_d = dict(new)
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    slope = new_d.get("calibration_slope")
    checks["calibration_slope"] = (
        slope is not None and abs(slope - 1.0) <= config.max_calibration_slope_error
    )
    if not checks["calibration_slope"]:
        reasons.append(
            f"calibration slope {slope if slope is None else round(slope, 3)} is further than "
            f"{config.max_calibration_slope_error} from 1"
        )
    if config.require_beats_news2:
        ok = news2_auprc is None or (new_d.get("auprc") or 0.0) > news2_auprc
        checks["beats_news2"] = ok
        if not ok:
            reasons.append(f"AUPRC {new_d.get('auprc'):.4f} does not beat NEWS2 {news2_auprc:.4f}")
    if champion is None:
        # the first model always becomes champion (something must serve); failed absolute
        # checks are recorded with it so a reviewer sees them
        note = f" (warnings: {'; '.join(reasons)})" if reasons else ""
        return GateDecision(True, f"first model: no champion yet{note}", new_d, None, checks)
    c = dict(champion)
    gain = (new_d.get("auprc") or 0.0) - (c.get("auprc") or 0.0)
    checks["auprc_gain"] = gain >= config.min_auprc_gain
    if not checks["auprc_gain"]:
        reasons.append(
            f"AUPRC gain {gain:+.4f} over champion ({c.get('auprc'):.4f}) is below the required "
            f"{config.min_auprc_gain}"
        )
    d_brier = (new_d.get("brier") or 1.0) - (c.get("brier") or 1.0)
    checks["brier"] = d_brier <= config.max_brier_increase
    if not checks["brier"]:
        reasons.append(
            f"Brier {new_d.get('brier'):.4f} is worse than champion {c.get('brier'):.4f} by more "
            f"than {config.max_brier_increase}"
        )
    if all(checks.values()):
        reason = (
            f"beats champion: AUPRC {new_d.get('auprc'):.4f} vs {c.get('auprc'):.4f} "
            f"(gain {gain:+.4f}), Brier {new_d.get('brier'):.4f} vs {c.get('brier'):.4f}"
        )
        return GateDecision(True, reason, new_d, c, checks)
    return GateDecision(False, "; ".join(reasons), new_d, c, checks)


# -- alias history ---------------------------------------------------------------------------


def champion_history(model_name: str) -> list[str]:
    raw = tracking.get_registered_model_tags(model_name).get(HISTORY_TAG, "[]")
    try:
        return [str(v) for v in json.loads(raw)]
    except json.JSONDecodeError:
        return []


def _save_history(model_name: str, history: list[str]) -> None:
    tracking.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history[-200:]))


def set_champion(
    model_name: str, version: str, actor: str, reason: str, action: str = "promote"
) -> dict[str, Any]:
    """Move ``champion`` to ``version``; record tags, history and an audit entry."""
    previous = tracking.get_alias(model_name, tracking.CHAMPION)
    prev_version = str(previous.version) if previous is not None else None
    record = tracking.set_alias(model_name, tracking.CHAMPION, version, actor, reason)
    challenger = tracking.get_alias(model_name, tracking.CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        tracking.delete_alias(model_name, tracking.CHALLENGER)
    history = champion_history(model_name)
    if action != "rollback":
        history.append(str(version))
        _save_history(model_name, history)
    details = {"alias": tracking.CHAMPION, "previous_version": prev_version, "reason": reason}
    audit(actor, action, f"models:/{model_name}@{tracking.CHAMPION}", str(version), details)
    return {**record, "version": str(version), "previous_version": prev_version}


def set_challenger(model_name: str, version: str, actor: str, reason: str) -> dict[str, Any]:
    record = tracking.set_alias(model_name, tracking.CHALLENGER, version, actor, reason)
    audit(
        actor,
        "register",
        f"models:/{model_name}@{tracking.CHALLENGER}",
        str(version),
        {"alias": tracking.CHALLENGER, "reason": reason},
    )
    return {**record, "version": str(version)}


def promote(model_name: str, version: str, actor: str, reason: str) -> dict[str, Any]:
    """Manual promotion (``vitalrisk promote``): any existing version can become champion."""
    tracking.get_version(model_name, version)  # raises if it does not exist
    return set_champion(model_name, version, actor, reason, action="promote")


def rollback(model_name: str, actor: str, reason: str) -> dict[str, Any]:
    """Champion back to the previous champion in the recorded history."""
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


def register_and_gate(
    model_uri: str,
    test_frame: pd.DataFrame,
    new_model: RiskModel,
    config: RegisterConfig,
    actor: str,
    version_tags: Mapping[str, Any] | None = None,
    news2_auprc: float | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` as a new version and apply the champion/challenger gate."""
    name = config.model_name
    champ_mv = tracking.get_alias(name, tracking.CHAMPION)
    new_m = gate_metrics(new_model, test_frame)
    champ_m: dict[str, float | None] | None = None
    incomparable = None
    if champ_mv is not None:
        try:
            _, champ_model = tracking.load_version(name, str(champ_mv.version))
            missing = [c for c in champ_model.feature_names if c not in test_frame.columns]
            if missing:
                incomparable = f"champion needs features absent from this test set: {missing[:5]}"
            else:
                champ_m = gate_metrics(champ_model, test_frame)
        except Exception as exc:  # a champion that cannot be loaded must not block registration
            incomparable = f"champion v{champ_mv.version} could not be scored: {exc}"
    tags = {
        **(version_tags or {}),
        **{f"test.{k}": ("" if v is None else f"{v:.6f}") for k, v in new_m.items()},
    }
    version = tracking.register_version(model_uri, name, tags)
    audit(actor, "register", f"models:/{name}/{version}", version, {"model_uri": model_uri})
    if incomparable:
        decision = GateDecision(False, incomparable, new_m, None, {"comparable": False})
    else:
        decision = decide(new_m, champ_m, config, news2_auprc)
    if decision.promote:
        alias_record = set_champion(name, version, actor, decision.reason)
        alias = tracking.CHAMPION
    else:
        alias_record = set_challenger(name, version, actor, decision.reason)
        alias = tracking.CHALLENGER
    tracking.set_version_tags(
        name, version, {"gate.decision": alias, "gate.reason": decision.reason}
    )
    result = {
        "model_name": name,
        "version": version,
        "alias": alias,
        "decision": "promoted" if decision.promote else "challenger",
        "reason": decision.reason,
        "champion_before": None if champ_mv is None else str(champ_mv.version),
        "champion_now": str(version)
        if decision.promote
        else (None if champ_mv is None else str(champ_mv.version)),
        "gate": {k: v for k, v in asdict(decision).items() if k != "reason"},
        "alias_change": alias_record,
        "test_rows": len(test_frame),
    }
    log.info("%s v%s -> %s: %s", name, version, alias, decision.reason)
    return json.loads(json.dumps(result, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
