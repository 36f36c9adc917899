"""Devices over MQTT: validated observations land durably before the broker hears an ack.

Delivery contract (QoS 1, persistent session, manual acknowledgement):

1. Messages arrive on the network thread and wait, unacknowledged, in memory (at most
   ``receive_maximum`` of them: the broker sends no more until some are acked).
2. A batch (``batch_max`` messages or ``batch_wait_ms``) is checked against the durable
   seen-ids store, validated, and committed in ONE SQLite transaction: the message ids, the
   accepted rows (landing CSV text), the rejected rows with their reasons (quarantine CSV text)
   and the counters. WAL + ``synchronous=FULL``: committed means on disk.
3. Only then are the batch's messages acknowledged. A crash before the ack makes the broker
   redeliver them; the redelivered ids are already in the store, so they are acknowledged and
   counted as duplicates, never landed twice.
4. Every ``roll_seconds`` the committed batches are rolled into one landing file (and one
   quarantine file), each written atomically (temp, fsync, rename, directory fsync) under a
   name recorded in the journal *before* writing, so a crash mid-roll rewrites the same file
   with the same content on restart. ``vitalrisk ingest`` reads the landing files like the
   service's (docs/contracts.md, "Landing area").

Message format (UTF-8 JSON; docs/contracts.md "MQTT messages"): one observation
``{"message_id"?, "patient_id", "time", "code", "value", "unit"?, "source"?}``, an envelope
``{"message_id"?, "patient_id"?, "source"?, "observations": [...]}`` whose items inherit its
``patient_id``/``source``, or a bare JSON array of observations. ``message_id`` is unique per
topic (each device publishes on its own); without it the id is a hash of topic and payload (a
redelivery is byte-identical).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.vocabulary import Vocabulary
from ingest.canonical import Reason, canonicalise, from_text
from ingest.config import IngestConfig
from ingest.ingestion import scrubber

logger = logging.getLogger(__name__)

#: the landing-area contract (docs/contracts.md "Landing area"), as the service writes it
LANDING_COLUMNS = ["patient_id", "time", "code", "value", "unit", "source"]
QUARANTINE_COLUMNS = ["message_id", "topic", "received_at", "item", "field", "reason", "record"]
ITEM_FIELDS = ("patient_id", "time", "code", "value", "unit", "source")
ITEM_SET = frozenset(ITEM_FIELDS)
_SCALARS = (str, int, float, bool)
ENVELOPE_FIELDS = ("message_id", "patient_id", "source", "observations")
COUNTERS = (
    "messages",  # distinct messages committed
    "duplicates",  # deliveries of an id already committed (redeliveries, device retries)
    "read",  # observations read = accepted + quarantined
    "accepted",
    "quarantined",
)


class CollectorConfig(BaseModel):
    """How the collector connects, batches and lands (CLI flags of ``vitalrisk collect mqtt``)."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = 1883
    topics: list[str] = Field(default_factory=lambda: ["vitalrisk/devices/+/observations"])
    client_id: str = Field(default="vitalrisk-collector", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    username: str | None = None
    #: from the environment (``VITALRISK_MQTT_PASSWORD``), never from a file
    password: str | None = Field(default=None, repr=False)
    tls: bool = False
    landing_dir: Path = Path("landing")
    quarantine_dir: Path = Path("logs/mqtt/quarantine")
    state_path: Path = Path("logs/mqtt/collector.sqlite")
    batch_max: int = Field(default=2000, ge=1)
    #: how long a batch may fill before it is committed and acknowledged: the fixed cost per
    #: transaction is shared by more messages (measured ~135 µs of CPU per message in batches
    #: of 100, ~35 in batches of 1,000); device PUBACKs wait at most this long
    batch_wait_ms: float = Field(default=200.0, ge=0)
    #: unacknowledged messages the broker may have in flight to us (MQTT 5 Receive Maximum)
    receive_maximum: int = Field(default=10_000, ge=1, le=65_535)
    #: how long the broker keeps our session (and queues messages) while we are down
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=1)
    roll_seconds: float = Field(default=5.0, ge=0)
    #: seen message ids are kept this long (redeliveries and device retries come within it)
    seen_retention_hours: float = Field(default=48.0, gt=0)
    max_items_per_message: int = Field(default=1000, ge=1)
    default_source: str = "wearable"
    keepalive: int = Field(default=30, ge=5)
    stats_seconds: float = Field(default=10.0, gt=0)

    @field_validator("topics")
    @classmethod
    def _topic_filters(cls, topics: list[str]) -> list[str]:
        if not topics:
            raise ValueError("expected at least one topic filter")
        for t in topics:
            levels = t.split("/")
            bad = [lv for lv in levels if lv not in ("+", "#") and ("+" in lv or "#" in lv)]
            if not t or bad or "#" in levels[:-1]:
                raise ValueError(
                    f"topic filter {t!r}: '+' and '#' must fill a whole level, '#' only the last"
                )
        return topics


# -- messages -----------------------------------------------------------------------------------


@dataclass
class Message:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: str
    generation: int = 0


@dataclass
class Parsed:
    message_id: str  # as given by the device, else the content hash
    items: list[dict[str, Any]]
    problem: tuple[str, str] | None = None  # (field, reason) when the message as a whole is bad
    #: idempotency key: a device's own ids are unique per topic (= per device), not globally
    key: str = ""


def content_id(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()[:32]


def dedup_key(topic: str, message_id: str, payload: bytes) -> str:
    """Two devices may both count from 1: a given id only identifies a message on its topic."""
    if message_id == content_id(topic, payload):
        return message_id
    return "id:" + content_id(topic, message_id.encode())


def parse_message(topic: str, payload: bytes, max_items: int) -> Parsed:
    """Message id, its idempotency key and the observation items."""
    p = _parse(topic, payload, max_items)
    p.key = dedup_key(topic, p.message_id, payload)
    return p


def _parse(topic: str, payload: bytes, max_items: int) -> Parsed:
    """Message id and observation items; a structural problem rejects the whole message."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return Parsed(content_id(topic, payload), [], ("message", f"invalid JSON: {exc}"))
    given = doc.get("message_id") if isinstance(doc, dict) else None
    mid = given if isinstance(given, str) and 0 < len(given) <= 128 else content_id(topic, payload)
    if isinstance(doc, dict) and "observations" in doc:
        unknown = sorted(set(doc) - set(ENVELOPE_FIELDS))
        if unknown:
            return Parsed(
                mid,
                [],
                ("message", f"unknown field(s) {unknown}: expected {list(ENVELOPE_FIELDS)}"),
            )
        items = doc["observations"]
        inherit = {k: doc[k] for k in ("patient_id", "source") if doc.get(k) is not None}
    elif isinstance(doc, dict):
        items, inherit = [{k: v for k, v in doc.items() if k != "message_id"}], {}
    elif isinstance(doc, list):
        items, inherit = doc, {}
    else:
        return Parsed(mid, [], ("message", "expected a JSON object or array of observations"))
    if given is not None and mid != given:
        return Parsed(mid, [], ("message_id", "expected a string of 1 to 128 characters"))
    if not isinstance(items, list) or not items:
        return Parsed(mid, [], ("observations", "expected a non-empty array of observations"))
    if len(items) > max_items:
        return Parsed(
            mid, [], ("observations", f"{len(items)} observations: at most {max_items} per message")
        )
    return Parsed(mid, [{**inherit, **it} if isinstance(it, dict) else it for it in items])


def _item_problem(item: Any) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return "item", "expected a JSON object"
    unknown = item.keys() - ITEM_SET
    if unknown:
        key = sorted(unknown)[0]
        return key, f"unknown field {key!r}: expected {list(ITEM_FIELDS)}"
    for key, v in item.items():
        if v is not None and not isinstance(v, _SCALARS):
            return key, f"expected a string or number, got {type(v).__name__}"
    return None


# -- validation: the one call into the canonical observation path --------------------------------


def _validate(
    candidates: pd.DataFrame, vocab: Vocabulary, cfg: IngestConfig, default_source: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Canonical rows and rejects for raw candidates (``source_id, time, code, value, unit,
    source, line`` as found).

    The one place the collector judges an observation: the canonical observation path
    (``ingest.canonical``) that ``vitalrisk ingest`` applies to every file format and the
    service to every request, with ingest's time window (params ``ingest.time_window``).
    Returns ``accepted`` (source_id, time, code, value, source, line) and ``rejected``
    (line, field, reason).
    """
    sid = candidates["source_id"].map(_text).to_numpy(dtype=object)
    pre = np.where(sid == "", np.uint8(Reason.MISSING_PATIENT), np.uint8(0)).astype(np.uint8)
    cand = from_text(
        candidates["code"].map(_text).to_numpy(dtype=object),
        candidates["value"].map(_text).to_numpy(dtype=object),
        candidates["unit"].map(_text).to_numpy(dtype=object),
        candidates["time"].map(_text).to_numpy(dtype=object),
        naive=cfg.naive_time,
        pre=pre,
    )
    res = canonicalise(cand, vocab, cfg.time_window.window(), cfg.time_window.reference_ns())
    ok = res.accepted
    src = candidates["source"].map(_text).to_numpy(dtype=object)
    src = np.where(src == "", default_source, src)
    line = candidates["line"].to_numpy(dtype=np.int64)
    keys = np.asarray(res.keys, dtype=object)
    accepted = pd.DataFrame(
        {
            "source_id": sid[ok],
            "time": pd.to_datetime(cand.time_ns[ok], utc=True),
            "code": keys[res.key[ok]] if ok.any() else np.array([], dtype=object),
            "value": res.value[ok],
            "source": src[ok],
            "line": line[ok],
        }
    )
    bad = np.flatnonzero(~ok)
    rejected = pd.DataFrame(
        {
            "line": line[bad],
            "field": [res.field_of(int(i)) for i in bad],
            "reason": [res.message(int(i)) for i in bad],
        }
    )
    return accepted, rejected


def _text(v: Any) -> str:
    """A raw JSON scalar as the text a CSV cell would hold (booleans as true/false)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v).strip()


@dataclass
class Batch:
    """One batch's outcome, ready to commit: new messages, CSV text, counts."""

    new: list[tuple[str, str, int, int, int]] = field(default_factory=list)  # key, at, n, acc, rej
    duplicates: int = 0
    landing: str = ""
    quarantine: str = ""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


class Validator:
    """Turns a list of MQTT messages into a :class:`Batch` (pseudonymised, canonical)."""

    def __init__(
        self,
        vocab: Vocabulary,
        ingest_cfg: IngestConfig,
        pseudo: Callable[[str], str],
        default_source: str,
        max_items: int,
    ) -> None:
        self.vocab, self.cfg, self.pseudo = vocab, ingest_cfg, pseudo
        self.default_source, self.max_items = default_source, max_items
        self.scrub = scrubber(ingest_cfg.identifier_pattern, pseudo)

    def parse(self, messages: Sequence[Message]) -> list[Parsed]:
        return [parse_message(m.topic, m.payload, self.max_items) for m in messages]

    def batch(self, messages: Sequence[Message], parsed: Sequence[Parsed], seen: set[str]) -> Batch:
        """Judge the messages whose ids are not in ``seen`` (nor earlier in this batch)."""
        out = Batch()
        fresh: list[tuple[Message, Parsed]] = []
        taken = set(seen)
        for m, p in zip(messages, parsed, strict=True):
            if p.key in taken:
                out.duplicates += 1
                continue
            taken.add(p.key)
            fresh.append((m, p))
        out.counts["duplicates"] = out.duplicates
        self._judge(fresh, out)
        return out

    def _judge(self, fresh: list[tuple[Message, Parsed]], out: Batch) -> None:
        rows: list[dict[str, Any]] = []
        owner: list[int] = []  # candidate -> index into fresh
        item_no: list[int] = []
        rejects: list[list[str]] = []
        per_msg = [[0, 0, 0] for _ in fresh]  # read, accepted, quarantined
        for k, (m, p) in enumerate(fresh):
            if p.problem:
                per_msg[k] = [1, 0, 1]
                rejects.append(self._reject(m, p, -1, *p.problem, self._payload_record(m.payload)))
                continue
            for j, it in enumerate(p.items):
                per_msg[k][0] += 1
                bad = _item_problem(it)
                if bad:
                    per_msg[k][2] += 1
                    rejects.append(self._reject(m, p, j, *bad, _record(self._safe(it))))
                    continue
                rows.append(it)
                owner.append(k)
                item_no.append(j)
        accepted = self._canonical(rows, owner, item_no, fresh, per_msg, rejects)
        out.landing = _csv_text(accepted)
        out.quarantine = _csv_text(rejects)
        for k, (m, p) in enumerate(fresh):
            n, acc, rej = per_msg[k]
            out.new.append((p.key, m.received_at, n, acc, rej))
        out.counts["messages"] = len(fresh)
        out.counts["read"] = sum(r[0] for r in per_msg)
        out.counts["accepted"] = sum(r[1] for r in per_msg)
        out.counts["quarantined"] = sum(r[2] for r in per_msg)

    def _canonical(
        self,
        rows: list[dict[str, Any]],
        owner: list[int],
        item_no: list[int],
        fresh: list[tuple[Message, Parsed]],
        per_msg: list[list[int]],
        rejects: list[list[str]],
    ) -> list[list[str]]:
        if not rows:
            return []
        # raw JSON scalars as they came: the cleaning step reads them as text, like a CSV cell
        frame = pd.DataFrame.from_records(rows, columns=list(ITEM_FIELDS))
        frame = frame.rename(columns={"patient_id": "source_id"})
        frame["line"] = range(len(frame))
        acc, rej = _validate(frame, self.vocab, self.cfg, self.default_source)
        for line, fld, reason in zip(rej["line"], rej["field"], rej["reason"], strict=True):
            k = owner[int(line)]
            m, p = fresh[k]
            per_msg[k][2] += 1
            sid = str(rows[int(line)].get("patient_id") or "")
            rec = _record(self._safe(rows[int(line)]))
            rejects.append(
                self._reject(m, p, item_no[int(line)], fld, self.scrub(reason, sid), rec)
            )
        for line in acc["line"]:
            per_msg[owner[int(line)]][1] += 1
        pids = acc["source_id"].map({s: self.pseudo(s) for s in acc["source_id"].unique()})
        times = np.char.add(
            np.datetime_as_string(acc["time"].to_numpy("datetime64[us]"), unit="us"), "Z"
        )
        units = acc["code"].map({c: self.vocab.codes[c].unit for c in acc["code"].unique()})
        values = [repr(float(v)) for v in acc["value"]]
        return [
            list(r)
            for r in zip(pids, times, acc["code"], values, units, acc["source"], strict=True)
        ]

    def _safe(self, item: Any) -> Any:
        """The item with its patient ids pseudonymised (quarantine never holds a raw id)."""
        if isinstance(item, list):
            return [self._safe(v) for v in item]
        if not isinstance(item, dict):
            return item
        out = dict(item)
        pid = out.get("patient_id")
        if isinstance(pid, str | int | float) and not isinstance(pid, bool) and str(pid).strip():
            out["patient_id"] = self.pseudo(str(pid))
        if "observations" in out:
            out["observations"] = self._safe(out["observations"])
        return out

    def _payload_record(self, payload: bytes) -> str:
        try:
            return _record(self._safe(orjson.loads(payload)))
        except orjson.JSONDecodeError:
            return self.scrub(payload[:500].decode("utf-8", "replace"), "")

    def _reject(
        self, m: Message, p: Parsed, item: int, fld: str, reason: str, record: str
    ) -> list[str]:
        return [
            p.message_id,
            m.topic,
            m.received_at,
            str(item),
            fld,
            reason,
            self.scrub(record, "")[:2000],
        ]


def _record(item: Any) -> str:
    return json.dumps(item, default=str, ensure_ascii=False)


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# -- the durable journal ------------------------------------------------------------------------

JOURNAL_DDL = """
CREATE TABLE IF NOT EXISTS messages (
    message_key TEXT PRIMARY KEY, batch_id INTEGER NOT NULL, received_at TEXT NOT NULL,
    observations INTEGER NOT NULL, accepted INTEGER NOT NULL, quarantined INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_batch ON messages(batch_id);
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY, committed_at TEXT NOT NULL, messages INTEGER NOT NULL,
    landing TEXT, quarantine TEXT, file_id INTEGER
);
CREATE INDEX IF NOT EXISTS batches_unrolled ON batches(file_id) WHERE file_id IS NULL;
CREATE TABLE IF NOT EXISTS files (
    file_id INTEGER PRIMARY KEY, first_batch INTEGER NOT NULL, last_batch INTEGER NOT NULL,
    landing_name TEXT, quarantine_name TEXT, rows INTEGER NOT NULL, rejects INTEGER NOT NULL,
    written INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class JournalLocked(RuntimeError):
    """Another collector process holds this journal."""


class Journal:
    """SQLite journal: seen ids, committed batches, rolled files, counters. One writer only."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = (path.parent / f"{path.name}.lock").open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise JournalLocked(f"{path}: another collector is using this journal") from None
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we ack
        self.db.executescript(JOURNAL_DDL)
        self.db.executemany(
            "INSERT OR IGNORE INTO counters VALUES (?, 0)", [(c,) for c in COUNTERS]
        )

    def close(self) -> None:
        self.db.close()
        self._lock.close()

    def known(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        uniq = list(dict.fromkeys(ids))
        for i in range(0, len(uniq), 500):
            chunk = uniq[i : i + 500]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT message_key FROM messages WHERE message_key IN ({marks})"
            found.update(r[0] for r in self.db.execute(q, chunk))
        return found

    def commit(self, batch: Batch) -> int | None:
        """One transaction: ids, rows, rejects and counters of a batch; its id (None: only dups)."""
        now = _now()
        batch_id = None
        with _transaction(self.db):
            if batch.new:
                cur = self.db.execute(
                    "INSERT INTO batches(committed_at, messages, landing, quarantine) VALUES (?,?,?,?)",
                    (now, len(batch.new), batch.landing, batch.quarantine),
                )
                batch_id = cur.lastrowid
                self.db.executemany(
                    "INSERT INTO messages VALUES (?,?,?,?,?,?)",
                    [(mid, batch_id, at, n, a, r) for mid, at, n, a, r in batch.new],
                )
            self.db.executemany(
                "UPDATE counters SET value = value + ? WHERE name = ?",
                [(v, k) for k, v in batch.counts.items() if v],
            )
        return batch_id

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.db.execute("SELECT name, value FROM counters")}

    def plan_roll(self, names: Callable[[int, int], tuple[str, str]]) -> int | None:
        """Assign every unrolled batch to a new file record (before any byte is written)."""
        with _transaction(self.db):
            row = self.db.execute(
                "SELECT min(batch_id), max(batch_id) FROM batches WHERE file_id IS NULL"
            ).fetchone()
            if row is None or row[0] is None:
                return None
            first, last = int(row[0]), int(row[1])
            landing_name, quarantine_name = names(first, last)
            rows, rejects = self.db.execute(
                "SELECT coalesce(sum(accepted),0), coalesce(sum(quarantined),0) FROM messages "
                "WHERE batch_id BETWEEN ? AND ?",
                (first, last),
            ).fetchone()
            cur = self.db.execute(
                "INSERT INTO files(first_batch, last_batch, landing_name, quarantine_name, rows,"
                " rejects) VALUES (?,?,?,?,?,?)",
                (first, last, landing_name, quarantine_name, rows, rejects),
            )
            file_id = cur.lastrowid
            self.db.execute(
                "UPDATE batches SET file_id = ? WHERE file_id IS NULL AND batch_id BETWEEN ? AND ?",
                (file_id, first, last),
            )
        return file_id

    def unwritten_files(self) -> list[tuple[int, str, str]]:
        return [
            (int(r[0]), r[1], r[2])
            for r in self.db.execute(
                "SELECT file_id, landing_name, quarantine_name FROM files WHERE written = 0"
                " ORDER BY file_id"
            )
        ]

    def file_text(self, file_id: int) -> tuple[str, str]:
        landing, quarantine = [], []
        for lt, qt in self.db.execute(
            "SELECT landing, quarantine FROM batches WHERE file_id = ? ORDER BY batch_id",
            (file_id,),
        ):
            landing.append(lt or "")
            quarantine.append(qt or "")
        return "".join(landing), "".join(quarantine)

    def mark_written(self, file_id: int) -> None:
        with _transaction(self.db):
            self.db.execute("UPDATE files SET written = 1 WHERE file_id = ?", (file_id,))
            self.db.execute(
                "UPDATE batches SET landing = NULL, quarantine = NULL WHERE file_id = ?",
                (file_id,),
            )

    def prune(self, retention_hours: float) -> int:
        """Forget seen ids (and rolled batches) older than the retention; rows deleted."""
        cutoff = (datetime.now(UTC) - timedelta(hours=retention_hours)).isoformat()
        with _transaction(self.db):
            row = self.db.execute(
                "SELECT max(b.batch_id) FROM batches b JOIN files f ON b.file_id = f.file_id "
                "WHERE f.written = 1 AND b.committed_at < ?",
                (cutoff,),
            ).fetchone()
            if row is None or row[0] is None:
                return 0
            n = self.db.execute("DELETE FROM messages WHERE batch_id <= ?", (row[0],)).rowcount
            self.db.execute("DELETE FROM batches WHERE batch_id <= ?", (row[0],))
        return int(n)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def write_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename, fsync the directory: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Lander:
    """Batches -> journal -> rolled landing/quarantine files. No MQTT here (testable alone)."""

    def __init__(self, cfg: CollectorConfig, validator: Validator) -> None:
        self.cfg, self.validator = cfg, validator
        self.journal = Journal(cfg.state_path)
        self.last_roll = time.monotonic()

    def recover(self) -> int:
        """Finish every roll a crash interrupted (same names, same content); files written."""
        done = 0
        for file_id, landing_name, quarantine_name in self.journal.unwritten_files():
            self._write_file(file_id, landing_name, quarantine_name)
            done += 1
        return done

    def land(self, messages: Sequence[Message]) -> Batch:
        """Commit a batch durably. The caller acknowledges ``messages`` only after this returns."""
        parsed = self.validator.parse(messages)
        seen = self.journal.known([p.key for p in parsed])
        batch = self.validator.batch(messages, parsed, seen)
        self.journal.commit(batch)
        return batch

    def roll(self, force: bool = False) -> str | None:
        """Write committed batches into one landing (and quarantine) file when due."""
        if not force and time.monotonic() - self.last_roll < self.cfg.roll_seconds:
            return None
        self.last_roll = time.monotonic()
        file_id = self.journal.plan_roll(self._names)
        if file_id is None:
            return None
        for fid, landing_name, quarantine_name in self.journal.unwritten_files():
            self._write_file(fid, landing_name, quarantine_name)
        return str(file_id)

    def _names(self, first: int, last: int) -> tuple[str, str]:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        base = f"mqtt-{self.cfg.client_id}-{stamp}-{first:010d}-{last:010d}.csv"
        return base, base

    def _write_file(self, file_id: int, landing_name: str, quarantine_name: str) -> None:
        landing, quarantine = self.journal.file_text(file_id)
        if landing:
            write_atomic(
                self.cfg.landing_dir / landing_name, _csv_text([LANDING_COLUMNS]) + landing
            )
        if quarantine:
            write_atomic(
                self.cfg.quarantine_dir / quarantine_name,
                _csv_text([QUARANTINE_COLUMNS]) + quarantine,
            )
        self.journal.mark_written(file_id)

    def close(self) -> None:
        self.journal.close()


# -- the MQTT side ------------------------------------------------------------------------------


class Inbox:
    """Messages received and not yet acknowledged, in arrival order (network thread -> lander).

    The lander is woken only for the first message and for a full batch, not per message: the
    network thread and the lander would otherwise trade the GIL thousands of times a second.
    """

    def __init__(self, batch_max: int = 2000) -> None:
        self._items: deque[Message] = deque()
        self._cond = threading.Condition()
        self.batch_max = batch_max
        self.generation = 0  # bumped on every (re)connect: older packet ids are void

    def put(self, m: Message) -> None:
        with self._cond:
            m.generation = self.generation
            self._items.append(m)
            if len(self._items) == 1 or len(self._items) >= self.batch_max:
                self._cond.notify()

    def take(self, max_n: int, wait_s: float, idle_s: float = 0.5) -> list[Message]:
        """Up to ``max_n`` messages: wait ``idle_s`` for a first one, then ``wait_s`` for more."""
        with self._cond:
            if not self._items:
                self._cond.wait(idle_s)
            if not self._items:
                return []
            deadline = time.monotonic() + wait_s
            while len(self._items) < max_n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(max_n, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def reconnected(self) -> None:
        with self._cond:
            self.generation += 1


class Collector:
    """Subscribe (QoS 1, persistent session, manual acks), land batches, ack, roll, repeat."""

    def __init__(
        self, cfg: CollectorConfig, lander: Lander, status_path: Path | None = None
    ) -> None:
        import paho.mqtt.client as mqtt

        self.cfg, self.lander = cfg, lander
        self.inbox = Inbox(cfg.batch_max)
        self.stop_event = threading.Event()
        self.status_path = status_path or cfg.state_path.with_suffix(".status.json")
        self.subscribed = threading.Event()
        self.fatal: str | None = None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            self.client.tls_set()
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    # network thread ---------------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._fail(f"broker refused the connection: {reason}")
            return
        self.inbox.reconnected()
        if not flags.session_present:
            logger.warning(
                "broker has no session for %s: messages sent while we were away are not queued "
                "for us (first start, or the broker lost its state)",
                self.cfg.client_id,
            )
        try:
            client.subscribe([(t, 1) for t in self.cfg.topics])
        except ValueError as exc:
            self._fail(f"cannot subscribe to {self.cfg.topics}: {exc}")
            return
        self.subscribed.set()
        logger.info(
            "connected to %s:%d, subscribed to %s", self.cfg.host, self.cfg.port, self.cfg.topics
        )

    def _fail(self, why: str) -> None:
        self.fatal = why
        logger.error("%s", why)
        self.stop_event.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.subscribed.clear()
        if not self.stop_event.is_set():
            logger.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.inbox.put(Message(msg.mid, msg.qos, msg.topic, bytes(msg.payload), _now()))

    # lander thread ----------------------------------------------------------------------------
    def _connect_properties(self) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        return props

    def _ack(self, messages: Sequence[Message]) -> None:
        gen = self.inbox.generation
        for m in messages:
            # a packet id from before a reconnect may name another message now: the broker
            # redelivers that message, and its id is in the journal, so it is acked then
            if m.qos > 0 and m.generation == gen:
                self.client.ack(m.mid, m.qos)

    def run(self) -> dict[str, int]:
        """Until :attr:`stop_event` (SIGTERM/SIGINT): returns the journal counters."""
        recovered = self.lander.recover()
        if recovered:
            logger.info("finished %d landing file(s) an earlier run had planned", recovered)
        self.client.connect(
            self.cfg.host,
            self.cfg.port,
            self.cfg.keepalive,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self.client.loop_start()
        try:
            self._loop()
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            self.lander.roll(force=True)
            self._write_status()
        if self.fatal:
            raise ConnectionError(self.fatal)
        return self.lander.journal.counters()

    def _loop(self) -> None:
        next_stats = time.monotonic() + self.cfg.stats_seconds
        next_prune = time.monotonic() + 60.0
        was_subscribed = False
        while not self.stop_event.is_set():
            if self.subscribed.is_set() != was_subscribed:
                was_subscribed = not was_subscribed
                self._write_status()
            batch = self.inbox.take(self.cfg.batch_max, self.cfg.batch_wait_ms / 1000.0)
            if batch:
                self.lander.land(batch)
                self._ack(batch)
            self.lander.roll()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + self.cfg.stats_seconds
                self._write_status()
            if now >= next_prune:
                next_prune = now + 3600.0
                self.lander.journal.prune(self.cfg.seen_retention_hours)
        # drain what arrived before the stop: land and ack it rather than wait for redelivery
        while batch := self.inbox.take(self.cfg.batch_max, 0.0, idle_s=0.0):
            self.lander.land(batch)
            self._ack(batch)

    def _write_status(self) -> None:
        status = {
            "at": _now(),
            "client_id": self.cfg.client_id,
            "connected": self.client.is_connected(),
            "subscribed": self.subscribed.is_set(),
            "counters": self.lander.journal.counters(),
        }
        with contextlib.suppress(OSError):
            write_atomic(self.status_path, json.dumps(status, indent=2))
