"""CDS Hooks 2.0: the deterioration risk as a card where clinicians already work (the EHR).

* ``GET /cds-services`` (discovery, public: no patient data) lists one ``patient-view``
  service with its prefetch templates: the Patient and the recent vital-sign Observations.
* ``POST /cds-services/vitalrisk-patient-view`` takes a hook request
  (``hook``, ``hookInstance``, ``context.patientId``, ``prefetch``) and answers
  ``{"cards": [...]}``: one card with ``indicator`` info / warning / critical, a
  ``summary`` under 140 characters, a markdown ``detail`` (reasons in words, NEWS2 and its
  escalation, thresholds, data freshness, model version) and ``source``.

Authentication: CDS clients send ``Authorization: Bearer <JWT>``; this service accepts its
own API key as that bearer token (a ``score``-scoped key: the call is scored and logged like
``/v1/fhir/score``). JWT verification against an EHR's JWKS is not implemented; put the
service behind a gateway that checks the EHR's JWT if the key cannot be configured in the EHR.

The prefetch goes through the one FHIR parser (``serving.fhir.parse_bundle``) and the one
scoring path (``Runtime.score``), so the card says exactly what ``/v1/score`` would.
"""

from __future__ import annotations

from typing import Any

from serving.schemas import PatientScore, RiskThresholds
from serving.scoring import InputError

SERVICE_ID = "vitalrisk-patient-view"
HOOK = "patient-view"
#: prefetch templates (CDS Hooks 2.0 "Prefetch Template"): the EHR fills them in
PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "vitals": "Observation?patient={{context.patientId}}&category=vital-signs&_sort=-date&_count=200",
}
MAX_SUMMARY = 139


def discovery() -> dict[str, Any]:
    return {
        "services": [
            {
                "hook": HOOK,
                "id": SERVICE_ID,
                "title": "vitalrisk deterioration risk",
                "description": (
                    "Calibrated risk of clinical deterioration from recent vital signs, with "
                    "the NEWS2 escalation (RCP) and the reasons in words."
                ),
                "prefetch": PREFETCH,
                "usageRequirements": (
                    "Send Authorization: Bearer <vitalrisk API key with the score scope>."
                ),
            }
        ]
    }


def _resource_entries(doc: Any, where: str) -> list[dict[str, Any]]:
    """Entries of a prefetched search Bundle (or one resource) as Bundle entries."""
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise InputError([(where, "expected a FHIR resource or a search Bundle")])
    if doc.get("resourceType") == "Bundle":
        entries = doc.get("entry") or []
        if not isinstance(entries, list):
            raise InputError([(f"{where}.entry", "expected a list")])
        return [e for e in entries if isinstance(e, dict) and e.get("resource")]
    return [{"resource": doc}]


def prefetch_bundle(hook: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``(collection Bundle of the prefetched Patient + Observations, context.patientId)``."""
    if hook.get("hook") != HOOK:
        raise InputError([("hook", f"this service answers {HOOK!r} only")])
    context = hook.get("context")
    pid = context.get("patientId") if isinstance(context, dict) else None
    if not isinstance(pid, str) or not pid.strip():
        raise InputError([("context.patientId", "required (the patient in view)")])
    prefetch = hook.get("prefetch")
    if not isinstance(prefetch, dict) or not prefetch.get("vitals"):
        raise InputError(
            [
                (
                    "prefetch.vitals",
                    "required: this service does not call back to the EHR's FHIR server; "
                    f"send the prefetch {PREFETCH['vitals']!r}",
                )
            ]
        )
    entries = _resource_entries(prefetch.get("patient"), "prefetch.patient")
    entries += _resource_entries(prefetch.get("vitals"), "prefetch.vitals")
    if not entries:
        raise InputError([("prefetch.vitals", "no Observation to score")])
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}, pid.strip()


def percent(p: float) -> str:
    """A probability for people: "<1%" below one percent, else whole percent."""
    return "<1%" if p < 0.01 else f"{100 * p:.0f}%"


def _indicator(s: PatientScore) -> str:
    if s.escalation == "news2_emergency" or (s.risk_band == "high" and s.alert):
        return "critical"
    if s.alert or s.risk_band == "medium":
        return "warning"
    return "info"


def summary_line(s: PatientScore) -> str:
    """One line under 140 characters: band, probability, horizon, NEWS2 and its response."""
    horizon = f" within {s.horizon_hours:g} h" if s.horizon_hours else ""
    if s.status != "ok" or s.probability is None:
        text = "Deterioration risk: insufficient recent vitals to score"
    else:
        text = (
            f"{str(s.risk_band).capitalize()} deterioration risk {percent(s.probability)}{horizon}"
        )
    if s.news2_total is not None:
        text += f"; NEWS2 {s.news2_total:g}"
    if s.escalation:
        text += {
            "news2_emergency": " - emergency response",
            "news2_urgent": " - urgent response",
            "news2_single_parameter": " - urgent ward review",
        }[s.escalation]
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 1] + "…"


def detail_markdown(s: PatientScore, thresholds: RiskThresholds, model: str) -> str:
    lines = []
    if s.status != "ok":
        lines.append(f"**No risk estimate**: {s.status_detail}.")
    else:
        lines.append(
            f"**Risk band {s.risk_band}** (probability {s.probability:.3g}; the model's own "
            f"thresholds: medium from {thresholds.low:.3g}, high = alert from "
            f"{thresholds.high:.3g})."
        )
    if s.escalation_text:
        lines.append(f"**Escalation**: {s.escalation_text}.")
    if s.news2_total is not None:
        lines.append(
            f"NEWS2 total {s.news2_total:g} (highest single parameter {s.news2_max_single:g})."
            if s.news2_max_single is not None
            else f"NEWS2 total {s.news2_total:g}."
        )
    if s.top_features:
        lines.append("")
        lines.append("Reasons:")
        lines.extend(f"- {c.text}" for c in s.top_features)
    if s.latest_observations:
        lines.append("")
        lines.append(
            "Newest values: "
            + ", ".join(f"{k} {v}" for k, v in sorted(s.latest_observations.items()))
        )
    for w in s.warnings[:5]:
        lines.append(f"- note: {w}")
    lines.append("")
    lines.append(f"As of {s.as_of}; {model}.")
    return "\n".join(lines)


def cards(
    s: PatientScore, thresholds: RiskThresholds, model_name: str, version: str
) -> dict[str, Any]:
    model = f"{model_name} version {version}"
    return {
        "cards": [
            {
                "summary": summary_line(s),
                "indicator": _indicator(s),
                "detail": detail_markdown(s, thresholds, model),
                "source": {"label": f"vitalrisk ({model})"},
            }
        ]
    }
