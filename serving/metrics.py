"""Domain metrics on ``/metrics`` (Prometheus), next to BentoML's request metrics.

What a ward or a home-care programme watches, not only what an SRE watches: scores by risk
band and care setting, alerts and escalations (when the answer carries them), rejected
requests and observations by reason, the model version each role serves, and the monitor's
last verdict. Every label has a fixed set of values (bands, known settings, reasons from
the status code, declared routes, observation fields), so no request can create a new series
nor put an identifier into ``/metrics``.

The monitor's verdict is read from its ``summary.json`` (``serve.monitor_summary``,
``VITALRISK_MONITOR_SUMMARY``) when ``/metrics`` is scraped (re-read only when the file
changed): the report, the summary and the dashboard then show the same verdict, and nothing
has to push it. The model gauges and the audit health are set at the same moment.

BentoML serves ``/metrics`` from prometheus_client's multiprocess files, so the metrics are
created lazily in the worker (after BentoML has set ``PROMETHEUS_MULTIPROC_DIR``); gauges use
``livemostrecent`` (the latest value written by a live worker).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

SUMMARY_ENV = "VITALRISK_MONITOR_SUMMARY"
BANDS = ("low", "medium", "high")
#: the band label of an answer without a risk (``status: insufficient_data``: no probability)
NO_RISK = "insufficient_data"
SETTINGS = ("ward", "home")
#: every verdict the monitor writes (monitoring/monitor.py EXIT_CODES) and ``unknown``: no
#: summary readable at the configured path
VERDICTS = ("ok", "warn", "retrain", "insufficient_data", "unknown")
ROLES = ("champion", "shadow")
#: the reason label of a refused request, from its status (the guard's answers)
REASONS = {
    400: "malformed",
    401: "unauthenticated",
    403: "forbidden",
    404: "no_route",
    405: "method",
    408: "timeout",
    413: "too_large",
    422: "invalid",
    429: "rate_limited",
    431: "headers_too_large",
    503: "unavailable",
}
#: observation fields a rejected item is reported for (serving/landing.py); others: "other"
OBSERVATION_FIELDS = frozenset(
    {"item", "record", "patient_id", "time", "code", "value", "unit", "source", "status"}
)
_FIELD = re.compile(r"^[a-z_]+")


def setting_label(value: Any) -> str:
    text = str(value) if value is not None else ""
    return text if text in SETTINGS else ("unknown" if not text else "other")


@dataclass
class _Metrics:
    scores: Any
    risk: Any
    alerts: Any
    escalations: Any
    rejected: Any
    rejected_obs: Any
    model_version: Any
    audit_healthy: Any
    verdict: Any
    exit_code: Any
    last_run: Any
    drifted: Any


_LOCK = threading.Lock()
_METRICS: _Metrics | None = None
_SUMMARY_SEEN: tuple[str, float, int] | None = None


def _build() -> _Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    live: Literal["livemostrecent"] = "livemostrecent"
    return _Metrics(
        scores=Counter(
            "vitalrisk_scores",
            "Patients scored, by risk band and care setting",
            ["band", "setting"],
        ),
        risk=Histogram(
            "vitalrisk_risk_probability",
            "Calibrated risk of each scored patient, by care setting",
            ["setting"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
        ),
        alerts=Counter(
            "vitalrisk_alerts",
            "Answers that raised an alert, by band and setting",
            ["band", "setting"],
        ),
        escalations=Counter(
            "vitalrisk_escalations",
            "Answers that asked for an escalation, by band and setting",
            ["band", "setting"],
        ),
        rejected=Counter(
            "vitalrisk_rejected_requests",
            "Requests refused with a 4xx/503 answer, by route and reason",
            ["route", "reason"],
        ),
        rejected_obs=Counter(
            "vitalrisk_rejected_observations",
            "Observations refused by /v1/observations, by the field at fault",
            ["field"],
        ),
        model_version=Gauge(
            "vitalrisk_model_version",
            "Registry version served per role (0: none)",
            ["role"],
            multiprocess_mode=live,
        ),
        audit_healthy=Gauge(
            "vitalrisk_audit_healthy",
            "1 while audit entries can be made durable (else data routes answer 503)",
            multiprocess_mode=live,
        ),
        verdict=Gauge(
            "vitalrisk_monitor_verdict",
            "The monitor's last verdict (1 for the current one)",
            ["verdict"],
            multiprocess_mode=live,
        ),
        exit_code=Gauge(
            "vitalrisk_monitor_exit_code",
            "Exit code of the last monitor run (0 ok, 10 warn, 20 retrain, 3 too few data)",
            multiprocess_mode=live,
        ),
        last_run=Gauge(
            "vitalrisk_monitor_last_run_timestamp_seconds",
            "When the monitor last wrote its summary (Unix time; 0: never)",
            multiprocess_mode=live,
        ),
        drifted=Gauge(
            "vitalrisk_monitor_drifted_features",
            "Features the last monitor run found drifted",
            multiprocess_mode=live,
        ),
    )


def _zeros(m: _Metrics) -> None:
    """Every band x setting series from the start (at 0): rates and alert rules then see a
    series before the first alert or escalation, not an absent one."""
    for band in (*BANDS, NO_RISK, "other"):
        for setting in (*SETTINGS, "unknown", "other"):
            for counter in (m.scores, m.alerts, m.escalations):
                counter.labels(band, setting)


def metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:
        with _LOCK:
            if _METRICS is None:
                m = _build()
                _zeros(m)
                _METRICS = m
    return _METRICS


def _flag(result: Any, name: str) -> bool:
    """Whether an answer carries ``alert`` / ``escalation`` (issue 17's fields), any shape."""
    value = getattr(result, name, None)
    if value is None or value is False:
        return False
    for attr in ("active", "raised", "required", "needed"):
        inner = getattr(value, attr, None)
        if isinstance(inner, bool):
            return inner
    if isinstance(value, dict):
        for attr in ("active", "raised", "required", "needed"):
            if isinstance(value.get(attr), bool):
                return bool(value[attr])
    return bool(value)


def observe_scores(results: Sequence[Any], settings: Iterable[Any]) -> None:
    """Count scored patients (``PatientScore`` / ``FeatureScore``) with their settings.

    Counters are added up per label set first: one increment per series and batch, not per
    patient (a 1,000-row request would otherwise write the shared metric files 3,000 times).
    """
    try:
        m = metrics()
        scores: Counter[tuple[str, str]] = Counter()
        alerts: Counter[tuple[str, str]] = Counter()
        escalations: Counter[tuple[str, str]] = Counter()
        risks: dict[str, list[float]] = {}
        for result, setting in zip(results, settings, strict=False):
            band = str(getattr(result, "risk_band", ""))
            if getattr(result, "status", None) == NO_RISK:
                band = NO_RISK
            elif band not in BANDS:
                band = "other"
            st = setting_label(setting)
            scores[band, st] += 1
            p = getattr(result, "probability", None)
            if isinstance(p, float):
                risks.setdefault(st, []).append(p)
            if _flag(result, "alert"):
                alerts[band, st] += 1
            if _flag(result, "escalation"):
                escalations[band, st] += 1
        for counter, counts in (
            (m.scores, scores),
            (m.alerts, alerts),
            (m.escalations, escalations),
        ):
            for labels, n in counts.items():
                counter.labels(*labels).inc(n)
        for st, ps in risks.items():
            _observe_all(m.risk.labels(st), ps)
    except Exception:  # metrics never fail an answer
        logger.exception("metrics: scores not counted")


def _observe_all(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe`` of each value, with one write per bucket for the lot (each
    write goes to the shared metric files; prometheus_client has no batch observe). Falls
    back to one observe per value if the library's histogram changes shape."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for v in values:
            histogram.observe(v)
        return
    import numpy as np

    x = np.asarray(values, dtype=float)
    # observe() counts a value in the first bucket whose bound it does not exceed
    first = np.searchsorted(np.asarray(bounds, dtype=float), x, side="left")
    counts = np.bincount(first, minlength=len(bounds) + 1)[: len(bounds)]
    total.inc(float(x.sum()))
    for bucket, n in zip(buckets, counts.tolist(), strict=True):
        if n:
            bucket.inc(n)


def observe_refusal(route: str, status: int) -> None:
    """Count a refused request (4xx or 503) under its bounded route and reason."""
    if status < 400 or status == 500:
        return
    try:
        from serving.guard import metrics_label

        reason = REASONS.get(status, f"status_{status // 100}xx")
        metrics().rejected.labels(metrics_label(route), reason).inc()
    except Exception:
        logger.exception("metrics: refusal not counted")


def observe_rejected_items(rejected: Iterable[Any]) -> None:
    try:
        m = metrics()
        for item in rejected:
            found = _FIELD.match(str(getattr(item, "field", "")).lower())
            field = found.group(0) if found else ""
            m.rejected_obs.labels(field if field in OBSERVATION_FIELDS else "other").inc()
    except Exception:
        logger.exception("metrics: rejected observations not counted")


def _version_number(version: Any) -> float:
    digits = re.sub(r"\D", "", str(version or ""))
    return float(digits) if digits else 0.0


def summary_path(configured: str) -> Path:
    return Path(os.environ.get(SUMMARY_ENV) or configured)


def _read_summary(path: Path) -> dict[str, Any] | None:
    """The summary when it changed since the last look (None: unchanged); {} unreadable."""
    global _SUMMARY_SEEN
    try:
        st = path.stat()
    except OSError:
        seen: tuple[str, float, int] = (str(path), -1.0, -1)
        if seen == _SUMMARY_SEEN:
            return None
        _SUMMARY_SEEN = seen
        return {}
    seen = (str(path), st.st_mtime, st.st_size)
    if seen == _SUMMARY_SEEN:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    _SUMMARY_SEEN = seen
    if isinstance(doc, dict):
        doc.setdefault("_mtime", st.st_mtime)
        return doc
    return {}


def _set_verdict(m: _Metrics, doc: dict[str, Any]) -> None:
    verdict = str(doc.get("verdict", "unknown"))
    verdict = verdict if verdict in VERDICTS else "unknown"
    for v in VERDICTS:
        m.verdict.labels(v).set(1.0 if v == verdict else 0.0)
    code = doc.get("exit_code")
    m.exit_code.set(float(code) if isinstance(code, int | float) else -1.0)
    when = 0.0
    created = doc.get("created_at")
    if isinstance(created, str):
        try:
            when = datetime.fromisoformat(created).timestamp()
        except ValueError:
            when = float(doc.get("_mtime", 0.0))
    elif doc:
        when = float(doc.get("_mtime", 0.0))
    m.last_run.set(when)
    drifted = doc.get("drifted_features")
    m.drifted.set(float(len(drifted)) if isinstance(drifted, list | dict) else 0.0)


def refresh(rt: Any) -> None:
    """Before a scrape: the served versions, the audit health, the monitor's last verdict."""
    try:
        m = metrics()
        models = rt.models
        m.model_version.labels("champion").set(_version_number(models.champion.version))
        shadow = models.shadow
        m.model_version.labels("shadow").set(_version_number(shadow.version) if shadow else 0.0)
        m.audit_healthy.set(1.0 if rt.audit.healthy else 0.0)
        doc = _read_summary(summary_path(rt.config.monitor_summary))
        if doc is not None:
            _set_verdict(m, doc)
    except Exception:
        logger.exception("metrics: refresh before scrape failed")
