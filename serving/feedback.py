"""What the service already stores, read back for people: the worklist's rows, a patient's own
summary (FHIR Bundle, the PHR use) and the cohort view of a programme (k-suppressed counts).

Everything here reads the answer log (table ``answers`` of the prediction log, written by
``Runtime.score_prepared``) and the landing area; nothing recomputes a risk. The log is the
service's own (``serving.predlog``: the SQLite file, or in team mode the PostgreSQL tables
every replica writes), read through its ``read``. Rows of one API key are resolved to that
key's caller ids only (``serving.identities``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import orjson

from core.schema import ANSWER_LOG_COLUMNS
from serving.schemas import Contribution, PatientScore


class LogReader(Protocol):
    """What this module needs of a prediction log (``PredictionLog``, ``PgPredictionLog``)."""

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass
class Answer:
    """One row of table ``answers``, decoded."""

    row: dict[str, Any]

    def __getitem__(self, k: str) -> Any:
        return self.row[k]

    @property
    def reasons(self) -> list[str]:
        return list(orjson.loads(self.row["reasons"] or "[]"))

    @property
    def latest(self) -> dict[str, str]:
        return dict(orjson.loads(self.row["latest"] or "{}"))

    def score(self, caller_id: str) -> PatientScore:
        """The answer as the API gave it (for the RiskAssessment of the summary)."""
        r = self.row
        return PatientScore(
            patient_id=caller_id,
            status=r["status"],
            status_detail="as answered at " + str(r["scored_at"]),
            as_of=r["as_of"],
            setting=r["setting"],
            horizon_hours=r["horizon_hours"],
            probability=r["probability"],
            risk_band=r["risk_band"],
            model_risk_band=r["model_risk_band"],
            alert=bool(r["alert"]),
            escalation=r["escalation"],
            escalation_text=None,
            news2_total=r["news2_total"],
            news2_max_single=r["news2_max_single"],
            latest_observations=self.latest,
            top_features=[
                Contribution(feature="", value=None, contribution=0.0, text=t) for t in self.reasons
            ],
            warnings=[],
        )


def answers_of(
    log: LogReader,
    key_name: str | None,
    since: datetime,
    pseudonyms: Sequence[str] | None = None,
) -> list[Answer]:
    """Answers given to ``key_name`` (all keys when None) with ``as_of`` at or after
    ``since``, oldest first."""
    cols = ", ".join(ANSWER_LOG_COLUMNS)
    sql = f"SELECT {cols} FROM answers WHERE as_of >= ?"
    args: list[Any] = [_iso(since)]
    if key_name is not None:
        sql += " AND key_name = ?"
        args.append(key_name)
    if pseudonyms is not None:
        sql += f" AND patient_id IN ({', '.join('?' * len(pseudonyms))})"
        args.extend(pseudonyms)
    return [Answer(r) for r in log.read(sql + " ORDER BY as_of, rowid", args)]


def acknowledgements(log: LogReader, key_name: str) -> dict[str, str]:
    """pseudonym -> time of the latest acknowledgement by ``key_name``."""
    rows = log.read(
        "SELECT patient_id, MAX(acked_at) AS acked_at FROM acknowledgements WHERE key_name = ? "
        "GROUP BY patient_id",
        (key_name,),
    )
    return {str(r["patient_id"]): str(r["acked_at"]) for r in rows}


# -- worklist rows ----------------------------------------------------------------------------
_BAND_RANK = {"high": 2, "medium": 1, "low": 0}


@dataclass
class WorkItem:
    pseudonym: str
    caller_id: str
    current: Answer
    history: list[Answer]
    acked_at: str | None

    def rank_key(self) -> tuple[float, ...]:
        """Sickest first: alert, band, probability, NEWS2 (insufficient data sorts by NEWS2)."""
        a = self.current
        return (
            -int(bool(a["alert"])),
            -_BAND_RANK.get(a["risk_band"] or "", -1),
            -(a["probability"] if a["probability"] is not None else -1.0),
            -(a["news2_total"] or 0.0),
        )

    @property
    def newest_observation(self) -> str | None:
        times = list(self.current.latest.values())
        return max(times) if times else None

    @property
    def acknowledged(self) -> bool:
        return self.acked_at is not None and self.acked_at >= str(self.current["scored_at"])


def worklist(
    answers: Sequence[Answer],
    callers: Mapping[str, str],
    acks: Mapping[str, str],
    setting: str | None = None,
) -> list[WorkItem]:
    """One item per patient (their newest answer, and the rest as history), sickest first."""
    by: dict[str, list[Answer]] = {}
    for a in answers:
        by.setdefault(str(a["patient_id"]), []).append(a)
    items = []
    for pid, hist in by.items():
        cur = max(hist, key=lambda a: (a["as_of"], a["scored_at"]))
        if setting and cur["setting"] != setting:
            continue
        items.append(WorkItem(pid, callers.get(pid, ""), cur, hist, acks.get(pid)))
    items.sort(key=WorkItem.rank_key)
    return items


def freshness(newest: str | None, now: datetime) -> str:
    """'12 min ago', '5 h ago', '3 d ago' (or 'no data')."""
    if not newest:
        return "no data"
    minutes = max(0.0, (now - parse_time(newest)).total_seconds() / 60.0)
    if minutes < 90:
        return f"{minutes:.0f} min ago"
    if minutes < 48 * 60:
        return f"{minutes / 60:.0f} h ago"
    return f"{minutes / 1440:.0f} d ago"


# -- the person's own summary (PHR) ----------------------------------------------------------
def summary_bundle(
    caller_id: str,
    observations: Sequence[tuple[str, str, str, float]],
    latest: Answer | None,
    vocab: Any,
    model_name: str,
    max_observations: int = 1000,
) -> dict[str, Any]:
    """A FHIR R4 Bundle (collection): the patient's own Observations (newest first, at most
    ``max_observations``) and the latest RiskAssessment; subject = the caller's Patient."""
    from fhir.resources.R4B.bundle import Bundle

    from serving.fhir import risk_assessment

    subject = {"reference": f"Patient/{caller_id}"}
    entries: list[dict[str, Any]] = []
    rows = sorted(observations, key=lambda r: r[1], reverse=True)[:max_observations]
    for i, (_, t, code, value) in enumerate(rows):
        spec = vocab.codes.get(code)
        if spec is None:
            continue
        res = {
            "resourceType": "Observation",
            "id": f"obs-{i}",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "vital-signs",
                        }
                    ]
                }
            ],
            "code": {
                "coding": [{"system": "http://loinc.org", "code": spec.loinc[0]}]
                if spec.loinc
                else [],
                "text": spec.display,
            },
            "subject": subject,
            "effectiveDateTime": t,
            "valueQuantity": {
                "value": value,
                "unit": spec.unit,
                "system": "http://unitsofmeasure.org",
                "code": spec.unit,
            },
        }
        entries.append({"fullUrl": f"urn:vitalrisk:obs-{i}", "resource": res})
    if latest is not None:
        ra = risk_assessment(
            latest.score(caller_id),
            model_name,
            str(latest["model_version"]),
            str(latest["request_id"]),
        )
        entries.append({"fullUrl": "urn:vitalrisk:risk", "resource": ra})
    doc = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    if entries:
        Bundle.model_validate(doc)
    return doc


# -- cohort view ------------------------------------------------------------------------------
def iso_week(t: str) -> str:
    y, w, _ = parse_time(t).isocalendar()
    return f"{y}-W{w:02d}"


def cohort_counts(
    log: LogReader, since: datetime
) -> dict[tuple[str, str, str], dict[str, set[str] | int]]:
    """(ISO week, setting, age band) -> patients (set), alerted patients (set), events."""
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    answers = answers_of(log, None, since)
    where: dict[str, tuple[str, str]] = {}
    for a in answers:
        setting, band = a["setting"] or "unknown", a["age_band"] or "unknown"
        where[str(a["patient_id"])] = (setting, band)
        c = cells.setdefault(
            (iso_week(a["as_of"]), setting, band), {"patients": set(), "alerts": set(), "events": 0}
        )
        c["patients"].add(a["patient_id"])
        if a["alert"]:
            c["alerts"].add(a["patient_id"])
    events = [
        (str(r["patient_id"]), str(r["event_time"]))
        for r in log.read(
            "SELECT patient_id, event_time FROM outcomes WHERE event_time >= ? AND "
            "(label = 1 OR (event IS NOT NULL AND event != ''))",
            (_iso(since),),
        )
        if r["event_time"]
    ]
    for pid, t in events:
        setting, band = where.get(pid, ("unknown", "unknown"))
        try:
            week = iso_week(t)
        except ValueError:
            continue
        c = cells.setdefault(
            (week, setting, band), {"patients": set(), "alerts": set(), "events": 0}
        )
        c["events"] += 1
    return cells


def suppress(values: Mapping[str, int], k: int) -> dict[str, int | str]:
    """Cells of one row (age bands) and their total, with counts 1..k-1 shown as "<k".

    Complementary suppression: a row with exactly one hidden cell hides the next smallest
    non-zero cell too (else the total minus the others would give it away); if there is no
    such cell, the total is hidden. Zero is shown (no person to protect).
    """
    out: dict[str, int | str] = dict(values)
    hidden = [c for c, v in values.items() if 0 < v < k]
    for c in hidden:
        out[c] = f"<{k}"
    total: int | str = sum(values.values())
    if len(hidden) == 1:
        rest = sorted((v, c) for c, v in values.items() if c not in hidden and v > 0)
        if rest:
            out[rest[0][1]] = "suppressed"
        else:
            total = "suppressed"
    if 0 < sum(values.values()) < k:
        total = f"<{k}"
    out["total"] = total
    return out


def cohort(
    log: LogReader, k: int, age_bands: Sequence[float], weeks: int = 12, now: date | None = None
) -> dict[str, Any]:
    """The cohort JSON: per ISO week and setting, per age band, patients / alerts / events."""
    today = now or datetime.now(UTC).date()
    since = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(weeks=weeks)
    cells = cohort_counts(log, since)
    bands = [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(age_bands)]
    seen_bands = sorted({b for _, _, b in cells} - set(bands))
    bands += seen_bands
    rows = []
    for week, setting in sorted({(w, s) for w, s, _ in cells}):
        row: dict[str, Any] = {"week": week, "setting": setting}
        for measure in ("patients", "alerts", "events"):
            vals = {}
            for b in bands:
                c = cells.get((week, setting, b))
                v = c[measure] if c else 0
                vals[b] = len(v) if isinstance(v, set) else int(v)
            row[measure] = suppress(vals, k)
        rows.append(row)
    return {"k": k, "age_bands": bands, "weeks": weeks, "rows": rows}
