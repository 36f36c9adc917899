"""PostgreSQL locations of the shared stores (team mode: serving replicas, monitoring, audit).

One location string names a database and a schema: a libpq URL with an optional ``schema``
query parameter, e.g. ``postgresql://postgres@127.0.0.1:5432/vitalrisk?schema=ward_a``
(default schema ``vitalrisk``). The schema is created on first use and becomes the
connection's ``search_path``, so every store's SQL names its tables unqualified. Passwords
never appear in the location: libpq reads ``PGPASSWORD`` or ``~/.pgpass``.

``psycopg`` is imported lazily: it is part of the ``team`` extra, not of the embedded default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_SCHEMA = "vitalrisk"
#: team mode: the location of the serving replicas' prediction log and audit chain (team.env)
DATABASE_URL_ENV = "VITALRISK_SERVE_DB_URL"
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def is_pg_url(location: object) -> bool:
    """True for ``postgresql://`` / ``postgres://`` locations (everything else is a file)."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def split_location(location: str) -> tuple[str, str]:
    """``(libpq URL without the schema parameter, schema)``; ``ValueError`` naming the problem."""
    parts = urlsplit(location)
    if parts.password:
        raise ValueError(
            "the database URL contains a password: secrets come from the environment only "
            "(PGPASSWORD or ~/.pgpass)"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if not _SCHEMA.match(schema):
        raise ValueError(
            f"schema {schema!r}: use 1-63 of a-z, 0-9 and _ (starting with a letter or _)"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def redact(location: str) -> str:
    """The location as it may be logged (host, port, database, schema; never a password)."""
    parts = urlsplit(location)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def connect(
    location: str, autocommit: bool = False, timeout: float = 10.0, create: bool = True
) -> Any:
    """A psycopg connection whose ``search_path`` is the location's schema (created if absent;
    ``create=False`` for read-only checks: a missing schema then simply has no tables).

    Raises ``ConnectionError`` with one line (server, database, libpq's reason) when the
    database cannot be reached: callers turn it into a start-up refusal or an exit code 2.
    """
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        raise ConnectionError(
            f"{redact(location)}: psycopg is not installed (pip install 'psycopg[binary]', "
            "part of the team extra)"
        ) from None

    url, schema = split_location(location)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
    except psycopg.Error as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        raise ConnectionError(f"{redact(location)}: cannot connect ({reason})") from None
    try:
        if create:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    except psycopg.errors.InsufficientPrivilege:
        pass  # an operator created it; search_path below still selects it
    except psycopg.errors.UniqueViolation:
        pass  # two processes created it at the same moment
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    conn.autocommit = autocommit
    return conn


def ensure_table(conn: Any, ddl: str, lock_key: int) -> None:
    """Run ``ddl`` (``CREATE ... IF NOT EXISTS`` statements) once across concurrent starters.

    PostgreSQL's ``IF NOT EXISTS`` is not safe against a concurrent creator (a unique
    violation on the catalog): a transaction-scoped advisory lock serialises the starters.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        for stmt in (s.strip() for s in ddl.split(";")):
            if stmt:
                conn.execute(stmt)


#: the same tables in PostgreSQL (team mode: replicas share one log). ``rowid`` is explicit
#: there (SQLite has it implicitly), so the monitor's keyset pagination reads both alike.
PREDICTIONS_PG_DDL = """
CREATE TABLE IF NOT EXISTS predictions (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id TEXT, scored_at TEXT, patient_id TEXT, model_name TEXT, model_version TEXT,
    role TEXT, probability DOUBLE PRECISION, news2_total DOUBLE PRECISION, features TEXT,
    setting TEXT, horizon_hours DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS predictions_scored_at ON predictions (scored_at);
CREATE INDEX IF NOT EXISTS predictions_role_time ON predictions (role, scored_at, probability);
CREATE TABLE IF NOT EXISTS outcomes (
    request_id TEXT, patient_id TEXT, event_time TEXT, event TEXT, label INTEGER,
    received_at TEXT
);
CREATE INDEX IF NOT EXISTS outcomes_request ON outcomes (request_id);
CREATE TABLE IF NOT EXISTS answers (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id TEXT, scored_at TEXT, as_of TEXT, patient_id TEXT, key_name TEXT,
    model_name TEXT, model_version TEXT, status TEXT, probability DOUBLE PRECISION,
    risk_band TEXT, model_risk_band TEXT, alert INTEGER, escalation TEXT,
    news2_total DOUBLE PRECISION, news2_max_single DOUBLE PRECISION, setting TEXT,
    horizon_hours DOUBLE PRECISION, age_band TEXT, reasons TEXT, latest TEXT
);
CREATE INDEX IF NOT EXISTS answers_key_patient ON answers (key_name, patient_id);
CREATE INDEX IF NOT EXISTS answers_patient_time ON answers (patient_id, as_of);
CREATE TABLE IF NOT EXISTS acknowledgements (
    acked_at TEXT, patient_id TEXT, key_name TEXT, request_id TEXT
)
"""
#: advisory-lock key under which the prediction-log tables are created (ensure_table)
PREDICTIONS_PG_LOCK = 0x7669_7461_6C01


def upgrade_prediction_log_pg(conn: Any) -> None:
    """Create the PostgreSQL prediction-log tables if absent: the columns of
    ``core.schema.PREDICTION_LOG_COLUMNS`` (tests/monitoring/test_prediction_log_pg.py checks
    they agree), each as its SQLite type's PostgreSQL counterpart."""
    ensure_table(conn, PREDICTIONS_PG_DDL, PREDICTIONS_PG_LOCK)


class QmarkConnection:
    """A psycopg connection with the ``sqlite3`` calls its users make (``?`` parameters,
    ``execute`` returning an iterable cursor, ``with con:`` as one transaction), so one SQL text
    serves the SQLite file and PostgreSQL (monitoring's log reads, serving's identity map)."""

    def __init__(self, location: str, create: bool = True) -> None:
        self.conn: Any = connect(location, autocommit=True, create=create)
        self._tx: Any = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), list(rows))

    def __enter__(self) -> QmarkConnection:
        self._tx = self.conn.transaction()
        self._tx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        tx, self._tx = self._tx, None
        tx.__exit__(*exc)

    def close(self) -> None:
        self.conn.close()
