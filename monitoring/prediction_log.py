"""Read (and, for tests and demos, write) the prediction log of docs/contracts.md.

Serving writes the ``predictions`` table; monitoring reads a time window of it in chunks so
that a million logged predictions never sit in memory at once, and writes fed-back outcomes
to the ``outcomes`` table. The log is an SQLite file, or in team mode a PostgreSQL location
(``postgresql://HOST/DB?schema=NAME``, core/pg.py) that every serving replica writes: every
function here takes either, and runs the same SQL on both (:class:`QmarkConnection` speaks the
small part of ``sqlite3`` used here; PostgreSQL's table has an explicit ``rowid``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from core.pg import QmarkConnection, is_pg_url, upgrade_prediction_log_pg
from core.schema import (
    OUTCOME_LOG_COLUMNS,
    PREDICTION_LOG_COLUMNS,
    upgrade_prediction_log,
)

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = list(PREDICTION_LOG_COLUMNS)
OUTCOME_COLUMNS = list(OUTCOME_LOG_COLUMNS)

#: covering index for the monitor's window queries (count, risk level, sampled rowids): they
#: then never touch the rows' feature JSON, which is what makes a million-row log slow to scan
MONITOR_INDEX_DDL = (
    "CREATE INDEX IF NOT EXISTS predictions_role_time ON predictions (role, scored_at, probability)"
)
#: outcomes are joined to predictions by request id: without it the join is quadratic
OUTCOMES_INDEX_DDL = "CREATE INDEX IF NOT EXISTS outcomes_request ON outcomes (request_id)"


def iso(ts: datetime | pd.Timestamp) -> str:
    """ISO-8601 UTC with a ``T`` separator: the text form that sorts like the time."""
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.isoformat()


def _bound(ts: pd.Timestamp, upper: bool = False) -> str:
    """Text bound for comparing ISO-8601 strings whatever their UTC suffix (``Z``/``+00:00``)."""
    key = pd.Timestamp(ts).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S")
    return key + "~" if upper else key


Connection = sqlite3.Connection | QmarkConnection


def is_database(path: str | Path) -> bool:
    """True for a PostgreSQL location (team mode), False for an SQLite file."""
    return is_pg_url(path)


def _open(path: str | Path) -> Connection:
    """A connection to the log, whichever kind it is (reads; SQLite without a timeout)."""
    return QmarkConnection(str(path)) if is_pg_url(path) else sqlite3.connect(str(path))


def connect(path: str | Path) -> Connection:
    if is_pg_url(path):
        return QmarkConnection(str(path))
    con = sqlite3.connect(str(path), timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    return con


def log_exists(path: str | Path) -> bool:
    """The file exists, or the database schema has a ``predictions`` table (nothing created)."""
    if not is_pg_url(path):
        return Path(path).is_file()
    with closing(QmarkConnection(str(path), create=False)) as con:
        (found,) = con.execute("SELECT to_regclass('predictions') IS NOT NULL").fetchone()
    return bool(found)


def _tables(con: Connection) -> set[str]:
    if isinstance(con, QmarkConnection):
        sql = (
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    else:
        sql = "SELECT name FROM sqlite_master WHERE type='table'"
    return {str(r[0]) for r in con.execute(sql)}


def _frame(con: Connection, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    if isinstance(con, sqlite3.Connection):
        return pd.read_sql_query(sql, con, params=tuple(params))
    cur = con.execute(sql, params)
    names = [d.name for d in cur.description]
    return pd.DataFrame(cur.fetchall(), columns=names).infer_objects()


def _upgrade(con: Connection) -> None:
    if isinstance(con, QmarkConnection):
        upgrade_prediction_log_pg(con.conn)  # tables and the monitor's indexes
        return
    upgrade_prediction_log(con)  # a log of an older service gets setting/horizon (NULL)
    con.execute(MONITOR_INDEX_DDL)
    con.execute(OUTCOMES_INDEX_DDL)


def ensure_tables(path: str | Path) -> None:
    """Create both tables if absent (serving creates them too; the DDL is the contract)."""
    if not is_pg_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with closing(connect(path)) as con:
        _upgrade(con)
        if isinstance(con, sqlite3.Connection):
            con.commit()


def ensure_monitor_index(path: str | Path) -> None:
    """Add the monitor's indexes to an existing log (one scan the first time, then kept up)."""
    ensure_tables(path)


def write_predictions(path: str | Path, frame: pd.DataFrame) -> int:
    """Append predictions (``features`` as dict or JSON text) in one transaction."""
    ensure_tables(path)
    df = frame.copy()
    df["scored_at"] = [iso(t) for t in pd.to_datetime(df["scored_at"], utc=True)]
    df["features"] = [
        f if isinstance(f, str) else json.dumps(_json_safe(f)) for f in df["features"]
    ]
    for col in PREDICTION_COLUMNS:
        if col not in df.columns:
            df[col] = None
    rows = df[PREDICTION_COLUMNS].astype(object).where(df[PREDICTION_COLUMNS].notna(), None)
    with closing(connect(path)) as con, con:
        con.executemany(
            f"INSERT INTO predictions ({', '.join(PREDICTION_COLUMNS)}) "
            f"VALUES ({','.join('?' * len(PREDICTION_COLUMNS))})",
            rows.itertuples(index=False, name=None),
        )
    return len(rows)


def _json_safe(d: dict) -> dict:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, float | np.floating) and not np.isfinite(v):
            out[k] = None
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def write_outcomes(path: str | Path, frame: pd.DataFrame) -> int:
    """Append outcome rows (columns of the contract's ``outcomes`` table)."""
    ensure_tables(path)
    df = frame.copy()
    if "received_at" not in df.columns:
        df["received_at"] = iso(datetime.now(UTC))
    for col in OUTCOME_COLUMNS:
        if col not in df.columns:
            df[col] = None
    df["label"] = df["label"].astype("Int64")
    rows = df[OUTCOME_COLUMNS].astype(object).where(df[OUTCOME_COLUMNS].notna(), None)
    with closing(connect(path)) as con, con:
        con.executemany(
            f"INSERT INTO outcomes ({', '.join(OUTCOME_COLUMNS)}) "
            f"VALUES ({','.join('?' * len(OUTCOME_COLUMNS))})",
            rows.itertuples(index=False, name=None),
        )
    return len(rows)


@dataclass(frozen=True)
class Window:
    start: pd.Timestamp
    end: pd.Timestamp
    rows: int


def find_window(
    path: str | Path,
    days: float,
    role: str,
    end: datetime | pd.Timestamp | None = None,
) -> Window:
    """The last ``days`` before ``end`` (default: the latest logged prediction of ``role``)."""
    with closing(_open(path)) as con:
        if end is None:
            (last,) = con.execute(
                "SELECT MAX(scored_at) FROM predictions WHERE role = ?", (role,)
            ).fetchone()
            if last is None:
                return Window(pd.NaT, pd.NaT, 0)  # type: ignore[arg-type]
            end_ts = pd.Timestamp(last)
        else:
            end_ts = pd.Timestamp(end)
        end_ts = end_ts.tz_localize("UTC") if end_ts.tzinfo is None else end_ts.tz_convert("UTC")
        start = end_ts - timedelta(days=days)
        (n,) = con.execute(
            "SELECT COUNT(*) FROM predictions WHERE role = ? AND scored_at > ? AND scored_at <= ?",
            (role, _bound(start), _bound(end_ts, upper=True)),
        ).fetchone()
    return Window(start, end_ts, int(n))


def iter_window(
    path: str | Path,
    window: Window,
    role: str,
    schema: dict[str, str],
    chunk_rows: int,
) -> Iterator[pd.DataFrame]:
    """Chunks of the window, features parsed into columns typed by ``schema``.

    ``schema`` maps feature name -> ``"float"`` or ``"str"``; features absent from a log row
    become missing values, features not in ``schema`` are ignored. Keyset pagination on rowid
    keeps each query cheap however far into the log it is.
    """
    dtype = pl.Struct(
        [pl.Field(k, pl.Float64 if v == "float" else pl.String) for k, v in schema.items()]
    )
    last_rowid = -1
    lo, hi = _bound(window.start), _bound(window.end, upper=True)
    with closing(_open(path)) as con:
        while True:
            rows = con.execute(
                "SELECT rowid, request_id, scored_at, patient_id, model_version, probability, "
                "news2_total, features, setting FROM predictions "
                "WHERE rowid > ? AND role = ? AND scored_at > ? AND scored_at <= ? "
                "ORDER BY rowid LIMIT ?",
                (last_rowid, role, lo, hi, chunk_rows),
            ).fetchall()
            if not rows:
                return
            last_rowid = rows[-1][0]
            yield _parse_chunk(rows, dtype)


def _where() -> str:
    return "role = ? AND scored_at > ? AND scored_at <= ?"


def window_risk(path: str | Path, window: Window, role: str) -> tuple[float, int]:
    """Exact ``(sum, count)`` of the logged probabilities in the window (one SQL pass)."""
    lo, hi = _bound(window.start), _bound(window.end, upper=True)
    with closing(_open(path)) as con:
        total, n = con.execute(
            f"SELECT COALESCE(SUM(probability), 0.0), COUNT(probability) FROM predictions WHERE {_where()}",
            (role, lo, hi),
        ).fetchone()
    return float(total), int(n)


#: rows per block when sampling the window (see sample_window)
SAMPLE_BLOCK = 50


def patient_sample_rows(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """About ``size`` rows balanced over patients: every patient keeps up to the same number
    of their rows (chosen at random), the largest number that fits ``size``; with more
    patients than ``size``, ``size`` random patients with one row each. All rows when the
    frame has no more than ``size``.

    Row (or block) samples include a patient with a probability that grows with their row
    count, so the patient mix of a sample depends on the sampling rate: a reference and a
    window sampled at different rates differ in their mix of hourly ward and 6-hourly home
    patients although the populations do not.
    """
    if len(frame) <= size:
        return frame
    ids = frame["patient_id"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if len(uniq) >= size:  # one row each of ``size`` random patients
        chosen = np.zeros(len(uniq), bool)
        chosen[rng.choice(len(uniq), size, replace=False)] = True
        cap = 1
    else:  # largest per-patient cap whose total fits the budget (water filling)
        chosen = np.ones(len(uniq), bool)
        lo, hi = 1, int(counts.max())
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if np.minimum(counts, mid).sum() <= size else (lo, mid - 1)
        cap = lo
    order = rng.permutation(len(frame))  # random rank of each row within its patient
    rank = np.empty(len(frame), np.int64)
    by_patient = order[np.argsort(inverse[order], kind="stable")]
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank[by_patient] = np.arange(len(frame)) - np.repeat(starts, counts)
    keep = chosen[inverse] & (rank < cap)
    return frame[keep]


def sample_window(
    path: str | Path,
    window: Window,
    role: str,
    schema: dict[str, str],
    size: int,
    seed: int,
    chunk_rows: int,
    by_patient: bool = False,
) -> Iterator[pd.DataFrame]:
    """Chunks of a random sample of ``size`` rows of the window (all if fewer).

    The sample is made of random blocks of 50 consecutive log rows (at least 100 blocks),
    spread over the whole window. ``by_patient``: a sample balanced over patients instead
    (``patient_sample_rows``), for drift tests on one row per patient: row or block samples
    include a patient with a probability that grows with their row count (hourly ward scores
    vs 6-hourly home scores; a patient's rows sit together in a batch-written log), which
    skews the patient mix of the window against the reference's.

    Only the sampled rows' feature JSON is read and parsed: parsing is what costs at a million
    rows, and a 20,000-row sample estimates a share to within about half a percentage point.
    """
    dtype = pl.Struct(
        [pl.Field(k, pl.Float64 if v == "float" else pl.String) for k, v in schema.items()]
    )
    lo, hi = _bound(window.start), _bound(window.end, upper=True)
    with closing(_open(path)) as con:
        if by_patient:
            ids = pd.DataFrame(
                con.execute(
                    f"SELECT rowid, patient_id FROM predictions WHERE {_where()}", (role, lo, hi)
                ).fetchall(),
                columns=["rowid", "patient_id"],
            )
            rowids = np.sort(patient_sample_rows(ids, size, seed)["rowid"].to_numpy(np.int64))
        else:
            cur = con.execute(f"SELECT rowid FROM predictions WHERE {_where()}", (role, lo, hi))
            rowids = np.sort(np.fromiter((r[0] for r in cur), dtype=np.int64))
        if len(rowids) > size and not by_patient:
            # random blocks of consecutive rows: the same sample size, but the reads are
            # sequential runs instead of one random page per row of a multi-GB file
            rng = np.random.default_rng(seed)
            block = max(1, min(SAMPLE_BLOCK, size // 100))
            n_blocks = len(rowids) // block
            take = rng.choice(n_blocks, size=min(n_blocks, -(-size // block)), replace=False)
            pos = (np.sort(take)[:, None] * block + np.arange(block)[None, :]).ravel()
            rowids = rowids[pos[:size]]
        pk = "INTEGER" if isinstance(con, sqlite3.Connection) else "BIGINT"
        con.execute(f"CREATE TEMP TABLE pick (r {pk} PRIMARY KEY)")
        for a in range(0, len(rowids), chunk_rows):
            con.execute("DELETE FROM pick")
            con.executemany(
                "INSERT INTO pick VALUES (?)", ((int(r),) for r in rowids[a : a + chunk_rows])
            )
            rows = con.execute(
                "SELECT p.rowid, p.request_id, p.scored_at, p.patient_id, p.model_version, "
                "p.probability, p.news2_total, p.features, p.setting FROM pick JOIN predictions p "
                "ON p.rowid = pick.r ORDER BY p.rowid"
            ).fetchall()
            if rows:
                yield _parse_chunk(rows, dtype)


def _parse_chunk(rows: Sequence[tuple], dtype: pl.Struct) -> pd.DataFrame:
    cols = list(zip(*rows, strict=True))
    meta = pl.DataFrame(
        {
            "request_id": pl.Series(cols[1], dtype=pl.String),
            "scored_at": pl.Series(cols[2], dtype=pl.String),
            "patient_id": pl.Series(cols[3], dtype=pl.String),
            "model_version": pl.Series(cols[4], dtype=pl.String),
            "probability": pl.Series(cols[5], dtype=pl.Float64),
            "_news2": pl.Series(cols[6], dtype=pl.Float64),
        }
    )
    feats = (
        pl.Series("f", cols[7], dtype=pl.String)
        .fill_null("{}")
        .str.json_decode(dtype)
        .struct.unnest()
    )
    logged_setting = pl.Series("_setting", cols[8], dtype=pl.String)
    if "setting" in feats.columns:  # the log's column wins; older logs had it in the JSON only
        feats = feats.with_columns(
            pl.coalesce(logged_setting, pl.col("setting").cast(pl.String)).alias("setting")
        )
    elif logged_setting.null_count() < len(logged_setting):
        feats = feats.with_columns(logged_setting.alias("setting"))
    out = pl.concat([meta, feats], how="horizontal")
    if "news2_total" in out.columns:
        out = out.with_columns(pl.col("news2_total").fill_null(pl.col("_news2")))
    else:
        out = out.rename({"_news2": "news2_total"})
    out = out.drop("_news2", strict=False)
    df = out.to_pandas()
    df["scored_at"] = pd.to_datetime(df["scored_at"], utc=True, format="ISO8601")
    return df


def logged_feature_names(path: str | Path, role: str, probe: int = 200) -> set[str]:
    """Feature keys present in the latest ``probe`` log rows (which columns serving logs)."""
    names: set[str] = set()
    with closing(_open(path)) as con:
        for text, setting in con.execute(
            "SELECT features, setting FROM predictions WHERE role = ? ORDER BY rowid DESC LIMIT ?",
            (role, probe),
        ):
            if text:
                names.update(json.loads(text).keys())
            if setting is not None:
                names.add("setting")
    return names


def read_labelled(path: str | Path, window: Window, role: str) -> pd.DataFrame:
    """Predictions of the window that have a fed-back label (latest outcome per request)."""
    q = """
        SELECT p.request_id, p.scored_at, p.patient_id, p.probability, o.label, o.received_at
        FROM predictions p JOIN outcomes o
          ON o.request_id = p.request_id AND o.patient_id = p.patient_id
        WHERE p.role = ? AND p.scored_at > ? AND p.scored_at <= ? AND o.label IS NOT NULL
    """
    with closing(_open(path)) as con:
        if "outcomes" not in _tables(con):
            return pd.DataFrame(columns=["request_id", "scored_at", "probability", "label"])
        df = _frame(con, q, (role, _bound(window.start), _bound(window.end, upper=True)))
    df = df.sort_values("received_at").drop_duplicates("request_id", keep="last")
    df["scored_at"] = pd.to_datetime(df["scored_at"], utc=True, format="ISO8601")
    df["label"] = df["label"].astype(int)
    return df.reset_index(drop=True)


def read_predictions_for(
    path: str | Path,
    request_ids: Sequence[str] | None = None,
    patient_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """``request_id, patient_id, scored_at, setting, horizon_hours`` of the given requests or
    patients (any role)."""
    key, values = (
        ("request_id", request_ids) if request_ids is not None else ("patient_id", patient_ids)
    )
    with closing(_open(path)) as con:
        con.execute("CREATE TEMP TABLE wanted (v TEXT PRIMARY KEY)")
        con.executemany(
            "INSERT INTO wanted VALUES (?) ON CONFLICT DO NOTHING",
            ((str(v),) for v in values or []),
        )
        df = _frame(
            con,
            f"SELECT request_id, patient_id, scored_at, setting, horizon_hours FROM predictions "
            f"WHERE {key} IN (SELECT v FROM wanted)",
        )
    df["scored_at"] = pd.to_datetime(df["scored_at"], utc=True, format="ISO8601")
    return df.drop_duplicates("request_id")
