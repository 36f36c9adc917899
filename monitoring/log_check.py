"""Read-only checks of a prediction log before ``vitalrisk monitor`` touches it.

A log that is empty, truncated, not SQLite at all (garbage, another file), damaged inside, or
without the contract's tables and columns (docs/contracts.md, "Prediction log") stops the
monitor with one line (``UserError``: exit code 2) instead of a sqlite traceback — and
before anything is written to it (outcomes, indexes). The checks, cheapest first:

1. the file's bytes: not empty, the SQLite header, a page size that is a power of two, and a
   size that holds every page the header counts (a cut-off copy fails here);
2. SQLite's own ``PRAGMA quick_check`` (every page and b-tree, ~0.4 GB/s measured): garbage
   written over part of a valid file fails here;
3. the schema: table ``predictions`` with exactly the contract's columns, in order, and
   ``outcomes`` likewise when present.

Read-only for real: the database is opened ``mode=ro``, and also ``immutable`` when no
``-wal`` file exists (no writer has it open then), so not even a ``-shm``/``-wal`` sidecar is
created next to a log that is then refused.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

from core.errors import UserError
from core.schema import OUTCOME_LOG_COLUMNS, PREDICTION_LOG_COLUMNS

SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER = 100


def _header_problem(path: Path) -> str | None:
    size = path.stat().st_size
    if size == 0:
        return "empty file, not a prediction log (an SQLite database with table predictions)"
    with path.open("rb") as fh:
        header = fh.read(_HEADER)
    if len(header) < _HEADER or not header.startswith(SQLITE_MAGIC):
        return "not an SQLite database (damaged, or a different kind of file)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"damaged SQLite header (page size {page_size})"
    pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96]
    if size % page_size or (header_valid and size < pages * page_size):
        expected = f"{pages * page_size} bytes" if header_valid else "whole pages"
        return f"truncated: {size} bytes where the database needs {expected}"
    return None


def _connect_read_only(path: Path) -> sqlite3.Connection:
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    if not Path(f"{path}-wal").exists():
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, timeout=30)


def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in con.execute(f"PRAGMA table_info({table})")]


def _content_problem(con: sqlite3.Connection) -> str | None:
    found = [str(row[0]) for row in con.execute("PRAGMA quick_check(3)")]
    if found != ["ok"]:
        first = found[0].splitlines()[0] if found and found[0] else "unknown problem"
        return f"damaged database: {first}"
    tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "predictions" not in tables:
        shown = sorted(tables)[:5] or "none"
        return f"no table 'predictions' (tables: {shown}): not a prediction log"
    for table, want in (("predictions", PREDICTION_LOG_COLUMNS), ("outcomes", OUTCOME_LOG_COLUMNS)):
        if table not in tables:
            continue
        got = _columns(con, table)
        if got != list(want):
            return f"table {table!r} has columns {got}; the contract's are {list(want)}"
    return None


def _database_problem(location: str) -> str | None:
    """The same schema check on a PostgreSQL log (team mode): tables and contract columns
    (its table has the explicit ``rowid`` first). Page-level damage is the server's business."""
    from core.pg import QmarkConnection

    try:
        con = QmarkConnection(location, create=False)
    except (ConnectionError, ValueError) as exc:
        return str(exc)
    try:
        rows = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name IN ('predictions', 'outcomes') "
            "ORDER BY table_name, ordinal_position"
        ).fetchall()
    finally:
        con.close()
    cols: dict[str, list[str]] = {}
    for table, column in rows:
        cols.setdefault(str(table), []).append(str(column))
    if "predictions" not in cols:
        return "no table 'predictions' in this schema: nothing served here yet, or a wrong schema"
    want = {
        "predictions": ["rowid", *PREDICTION_LOG_COLUMNS],
        "outcomes": list(OUTCOME_LOG_COLUMNS),
    }
    for table, columns in cols.items():
        if columns != want[table]:
            return f"table {table!r} has columns {columns}; the contract's are {want[table]}"
    return None


def check_log(path: str | Path) -> None:
    """Raise ``UserError`` (one line naming ``path``) unless it is an intact prediction log.

    Reads only; never creates, changes or repairs anything.
    """
    from core.pg import is_pg_url, redact

    if is_pg_url(path):
        problem = _database_problem(str(path))
        if problem is not None:
            raise UserError(f"{redact(str(path))}: {problem}")
        return
    p = Path(path)
    problem = _header_problem(p)
    if problem is None:
        try:
            with closing(_connect_read_only(p)) as con:
                problem = _content_problem(con)
        except sqlite3.DatabaseError as exc:
            problem = f"not a readable SQLite database ({exc})"
    if problem is not None:
        raise UserError(f"{p}: {problem}")
