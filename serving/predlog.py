"""Durable prediction log in SQLite (the contract monitoring reads; see docs/contracts.md).

WAL journal with ``synchronous=FULL`` and one transaction per request: a request's rows are
either all on disk or none are, even if the process or machine dies mid-write.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from core.schema import ANSWER_LOG_COLUMNS, PREDICTION_LOG_COLUMNS, upgrade_prediction_log

logger = logging.getLogger(__name__)

SCHEMA = "CREATE INDEX IF NOT EXISTS predictions_scored_at ON predictions (scored_at)"

COLUMNS = PREDICTION_LOG_COLUMNS


class LogUnavailable(RuntimeError):
    """The prediction log cannot be written or read now (disk full or read-only, database down):
    the request gets 503 with a retry hint (``serving/service.py``), never a 500."""


def _store_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the store cannot take this now" (not a bug of ours: those stay
    500): I/O, locks, a read-only or full disk, a lost connection, a missing table or grant."""
    errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError, OSError)
    try:
        import psycopg
        from psycopg import errors as pg_errors
    except ImportError:  # team extra not installed: no PostgreSQL log either
        return errors
    return (
        *errors,
        psycopg.OperationalError,
        psycopg.InterfaceError,
        pg_errors.UndefinedTable,
        pg_errors.InsufficientPrivilege,
        pg_errors.ReadOnlySqlTransaction,
    )


@contextlib.contextmanager
def _unavailable(what: str, where: object) -> Iterator[None]:
    """Turn the store's own errors into ``LogUnavailable`` (logged without any row values)."""
    try:
        yield
    except _store_errors() as exc:
        logger.error("prediction log %s failed (%s): %s", what, where, type(exc).__name__)
        raise LogUnavailable(f"prediction log unavailable ({what}); retry later") from exc


@dataclass(frozen=True)
class PredictionRecord:
    request_id: str
    scored_at: str
    patient_id: str
    model_name: str
    model_version: str
    role: str
    probability: float
    news2_total: float | None
    features: Mapping[str, Any] | str  # mapping, or its JSON text when already serialised
    #: care setting of the patient (per-setting drift tests) and the model's label horizon
    #: for it (hours: outcomes are labelled over the horizon the model predicts)
    setting: str | None = None
    horizon_hours: float | None = None

    def row(self) -> tuple[Any, ...]:
        feats = self.features if isinstance(self.features, str) else features_json(self.features)
        return (
            self.request_id,
            self.scored_at,
            self.patient_id,
            self.model_name,
            self.model_version,
            self.role,
            float(self.probability),
            _clean(self.news2_total),
            feats,
            self.setting,
            _clean(self.horizon_hours),
        )


@dataclass(frozen=True)
class AnswerRecord:
    """One row of table ``answers`` (``core.schema.ANSWER_LOG_COLUMNS``, in that order)."""

    request_id: str
    scored_at: str
    as_of: str
    patient_id: str  # pseudonym
    key_name: str
    model_name: str
    model_version: str
    status: str
    probability: float | None
    risk_band: str | None
    model_risk_band: str | None
    alert: bool
    escalation: str | None
    news2_total: float | None
    news2_max_single: float | None
    setting: str | None
    horizon_hours: float | None
    age_band: str | None
    reasons: tuple[str, ...]
    latest: Mapping[str, str]

    def row(self) -> tuple[Any, ...]:
        return (
            self.request_id,
            self.scored_at,
            self.as_of,
            self.patient_id,
            self.key_name,
            self.model_name,
            self.model_version,
            self.status,
            _clean(self.probability),
            self.risk_band,
            self.model_risk_band,
            int(bool(self.alert)),
            self.escalation,
            _clean(self.news2_total),
            _clean(self.news2_max_single),
            self.setting,
            _clean(self.horizon_hours),
            self.age_band,
            orjson.dumps(list(self.reasons)).decode("utf-8"),
            orjson.dumps(dict(self.latest)).decode("utf-8"),
        )


_ANSWER_SQL = (
    f"INSERT INTO answers ({', '.join(ANSWER_LOG_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(ANSWER_LOG_COLUMNS))})"
)


def features_json(features: Mapping[str, Any]) -> str:
    """JSON object feature -> value; NaN/inf become null (orjson does this natively)."""
    return orjson.dumps(dict(features), option=orjson.OPT_SERIALIZE_NUMPY).decode("utf-8")


def _clean(v: Any) -> Any:
    """JSON/SQL-safe scalar: NaN and missing become None (null)."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


class PredictionLog:
    """Thread-safe appender; one connection per process, writes serialised by a lock."""

    def __init__(
        self, path: str | Path, synchronous: str = "FULL", checkpoint_seconds: float = 0.5
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL (power-loss durable) or NORMAL")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        # a new log gets SQLite's largest pages: a feature row's JSON (~10 kB for ~400
        # features) then fits one page instead of a chain of overflow pages, and a 1,000-row
        # commit writes half the WAL frames (measured: 32 -> 17 ms; a one-row commit +0.1 ms).
        # Only takes effect before the first table exists (an existing log keeps its size).
        self._conn.execute("PRAGMA page_size=65536")
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: every committed request survives power loss; NORMAL (WAL): still atomic (no
        # partial records) and safe against process crashes, but the last commits may be lost
        # on power failure, and commits skip the fsync (much faster on a busy disk)
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        upgrade_prediction_log(self._conn)
        self._conn.executescript(SCHEMA)
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if checkpoint_seconds > 0:
            # SQLite copies the WAL back into the database every ~1000 pages inside whichever
            # commit crosses the mark: a ~30 ms stall of that request (measured). A passive
            # checkpoint from a background connection does that work off the request path.
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop,
                args=(checkpoint_seconds,),
                name="vitalrisk-predlog-checkpoint",
                daemon=True,
            )
            self._checkpointer.start()

    def _checkpoint_loop(self, every: float) -> None:
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        try:
            while not self._stop.wait(every):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # busy: the next round tries again
                    logger.debug("prediction-log checkpoint skipped: %s", exc)
        finally:
            conn.close()

    def append(
        self, records: Iterable[PredictionRecord], answers: Iterable[AnswerRecord] = ()
    ) -> int:
        """Prediction rows and the answers they belong to, in one transaction."""
        rows = [r.row() for r in records]
        answer_rows = [a.row() for a in answers]
        if not rows and not answer_rows:
            return 0
        sql = f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self._lock, _unavailable("append", self.path.name):
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    cur.executemany(sql, rows)
                if answer_rows:
                    cur.executemany(_ANSWER_SQL, answer_rows)
                cur.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                raise
        return len(rows)

    def acknowledge(self, acked_at: str, pseudonym: str, key_name: str, request_id: str) -> None:
        with self._lock, _unavailable("acknowledge", self.path.name):
            self._conn.execute(
                "INSERT INTO acknowledgements VALUES (?, ?, ?, ?)",
                (acked_at, pseudonym, key_name, request_id),
            )

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one query (``?`` parameters) as dicts, on a read-only connection of its own
        (WAL: never waits for a writer); [] while a queried table does not exist yet."""
        if not self.path.is_file():
            return []
        with _unavailable("read", self.path.name):
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
            con.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in con.execute(sql, tuple(params))]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # a log older than the answers table
                    return []
                raise
            finally:
                con.close()

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=30)
        with self._lock:
            self._conn.close()


class PgPredictionLog:
    """The same log in PostgreSQL, shared by every replica (team mode, ``serve.database_url``).

    One connection per process, writes serialised by a lock; one transaction per call, so a
    request's rows are all committed or none are, and ``append`` returns only after the commit
    (``synchronous_commit`` of the server: durable by default). A broken connection (server
    restart) fails that call and is replaced on the next one: an append whose outcome is
    unknown is never retried, so no row is written twice.
    """

    def __init__(self, location: str) -> None:
        from core.pg import connect, upgrade_prediction_log_pg

        self.location = location
        self._lock = threading.Lock()
        self._conn: Any = connect(location, autocommit=True)
        upgrade_prediction_log_pg(self._conn)
        self._sql = (
            f"INSERT INTO predictions ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(COLUMNS))})"
        )
        self._answer_sql = (
            f"INSERT INTO answers ({', '.join(ANSWER_LOG_COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(ANSWER_LOG_COLUMNS))})"
        )

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            from core.pg import connect

            self._conn = connect(self.location, autocommit=True)
        return self._conn

    def append(
        self, records: Iterable[PredictionRecord], answers: Iterable[AnswerRecord] = ()
    ) -> int:
        """Prediction rows and the answers they belong to, in one transaction."""
        rows = [r.row() for r in records]
        answer_rows = [a.row() for a in answers]
        if not rows and not answer_rows:
            return 0
        with self._lock, _unavailable("append", "PostgreSQL"):
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                if rows:
                    cur.executemany(self._sql, rows)
                if answer_rows:
                    cur.executemany(self._answer_sql, answer_rows)
        return len(rows)

    def acknowledge(self, acked_at: str, pseudonym: str, key_name: str, request_id: str) -> None:
        with self._lock, _unavailable("acknowledge", "PostgreSQL"):
            conn = self._connection()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO acknowledgements VALUES (%s, %s, %s, %s)",
                    (acked_at, pseudonym, key_name, request_id),
                )

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one query (``?`` parameters, as for the SQLite log) as dicts: the feedback
        pages read what every replica wrote."""
        with self._lock, _unavailable("read", "PostgreSQL"):
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), tuple(params))
                names = [d.name for d in cur.description or ()]
                return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def count(self) -> int:
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                return int(conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def open_prediction_log(
    location: str | Path, synchronous: str = "FULL"
) -> PredictionLog | PgPredictionLog:
    """The SQLite file log, or the PostgreSQL one for a ``postgresql://`` location."""
    from core.pg import is_pg_url

    if is_pg_url(location):
        return PgPredictionLog(str(location))
    return PredictionLog(location, synchronous)
