"""The safety rules every answer passes through, in one place (README, "Clinician view and
safe answers"). Each rule is one small pure function; :func:`decide` applies them in order:

1. **enough recent data** (:func:`data_status`): at least ``serve.data_sufficiency.
   min_recent_vitals`` vitals observed within their recency window for the patient's
   setting; otherwise ``status: insufficient_data`` and no probability, no band;
2. **the model's own thresholds** (``models.thresholds.band_of``): bands and the alert come
   from thresholds fitted and logged with the served model; ``high`` is the alert;
3. **the NEWS2 escalation floor** (:func:`news2_escalation`, RCP 2017 chart): an aggregate of
   7 or more is an emergency response, 5-6 an urgent response, a single parameter scoring 3
   an urgent ward-based response. Applied after the model: the answer is never quieter than
   NEWS2 (emergency -> band ``high``; urgent or a single 3 -> at least ``medium``; all three
   raise the alert), and it says so (``escalation``). It applies with insufficient data too:
   what NEWS2 shows is never hidden.

``/v1/score``, ``/v1/fhir/score``, CDS Hooks, the worklist and the summary all take their
answers from :func:`decide` (through ``Runtime.score_prepared`` and the answer log).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from models.thresholds import Thresholds, band_of
from serving.config import DataSufficiency

OK = "ok"
INSUFFICIENT = "insufficient_data"
_HOUR_NS = 3_600 * 10**9
_RANK = {"low": 0, "medium": 1, "high": 2}

#: NEWS2 sub-score columns of the feature code (``features.news2.news2_scores``)
NEWS2_PARTS = (
    "news2_rr",
    "news2_spo2",
    "news2_o2",
    "news2_sbp",
    "news2_hr",
    "news2_temp",
    "news2_consciousness",
)


@dataclass(frozen=True)
class Escalation:
    """A NEWS2 trigger (RCP 2017): ``code`` goes into the answer, ``text`` to clinicians."""

    code: str
    response: str
    floor: str  # the lowest band the answer may show
    text: str


def news2_escalation(total: float | None, max_single: float | None) -> Escalation | None:
    """The RCP clinical-response trigger of a NEWS2 total and its highest single parameter."""
    if total is not None and total >= 7:
        return Escalation(
            "news2_emergency",
            "emergency",
            "high",
            f"NEWS2 {total:g} (7 or more): emergency response (RCP)",
        )
    if total is not None and total >= 5:
        return Escalation(
            "news2_urgent",
            "urgent",
            "medium",
            f"NEWS2 {total:g} (5-6): urgent response (RCP)",
        )
    if max_single is not None and max_single >= 3:
        return Escalation(
            "news2_single_parameter",
            "urgent ward-based",
            "medium",
            "a single NEWS2 parameter scores 3: urgent ward-based response (RCP)",
        )
    return None


def data_status(
    latest_ns: Mapping[str, int], as_of_ns: int, setting: str | None, rule: DataSufficiency
) -> tuple[str, str]:
    """``(status, why)``: ``ok`` or ``insufficient_data``, with the vitals that counted."""
    windows = rule.windows(setting)
    recent = [
        v
        for v, hours in windows.items()
        if v in latest_ns and 0 <= as_of_ns - latest_ns[v] <= hours * _HOUR_NS
    ]
    if len(recent) >= rule.min_recent_vitals:
        return OK, f"{len(recent)} of {len(windows)} vitals recent"
    stale = [v for v in windows if v not in recent]
    return INSUFFICIENT, (
        f"only {len(recent)} of the {len(windows)} vitals measured recently enough "
        f"(need {rule.min_recent_vitals}; missing or stale: {', '.join(stale)})"
    )


def latest_times(codes: np.ndarray, time_ns: np.ndarray, as_of_ns: int) -> dict[str, int]:
    """Newest observation time per code at or before ``as_of_ns`` (UTC nanoseconds)."""
    out: dict[str, int] = {}
    keep = time_ns <= as_of_ns
    for c, t in zip(codes[keep].tolist(), time_ns[keep].tolist(), strict=True):
        if t > out.get(c, -(2**63)):
            out[c] = int(t)
    return out


def iso_ns(t_ns: int) -> str:
    """UTC nanoseconds -> ISO-8601 text with ``Z`` (seconds precision)."""
    dt = datetime.fromtimestamp(t_ns / 1e9, tz=UTC)
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


def max_single(parts: Sequence[float | None]) -> float | None:
    """The highest NEWS2 sub-score (None when none was scored)."""
    vals = [float(v) for v in parts if v is not None and not np.isnan(v)]
    return max(vals) if vals else None


@dataclass(frozen=True)
class Verdict:
    """What one answer says, after every rule."""

    status: str
    probability: float | None
    risk_band: str | None
    model_band: str | None
    alert: bool
    escalation: str | None
    escalation_text: str | None


def decide(
    p: float,
    thresholds: Thresholds,
    status: str,
    news2_total: float | None,
    news2_max_single: float | None,
) -> Verdict:
    """Rules 1-3 of the module docstring for one patient."""
    esc = news2_escalation(news2_total, news2_max_single)
    if status != OK:
        return Verdict(
            status,
            None,
            None,
            None,
            esc is not None,
            esc.code if esc else None,
            esc.text if esc else None,
        )
    model_band = band_of(p, thresholds)
    band = model_band
    text = esc.text if esc else None
    if esc is not None and _RANK[esc.floor] > _RANK[model_band]:
        band = esc.floor
        text = f"{esc.text}; risk band raised from the model's {model_band} to {band}"
    return Verdict(
        status,
        p,
        band,
        model_band,
        p >= thresholds.high or esc is not None,
        esc.code if esc else None,
        text,
    )
