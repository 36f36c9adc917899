"""Team-mode serving stores on the request path: what one audit group commit, one
prediction-log transaction and one rate-limit decision cost on the shared services
(PostgreSQL, Redis) against the embedded defaults (file, SQLite, memory).

Each figure is operations per second of one writer, and for the audit chain also of two
processes appending at once (they serialise on the head row's lock, as two replicas do).
PostgreSQL: ``VITALRISK_BENCH_PG_URL`` (default database ``test`` on 127.0.0.1:5432, a
temporary schema dropped afterwards); Redis: ``VITALRISK_BENCH_REDIS_URL``. A service that
does not answer is reported as skipped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from governance.audit import AuditLog, AuditRecord, PgAuditStore
from governance.pseudonym import pseudonymise
from serving.auth import RateLimiter, RedisRateLimiter
from serving.predlog import PgPredictionLog, PredictionLog, PredictionRecord

PG = os.environ.get("VITALRISK_BENCH_PG_URL") or "postgresql://postgres@127.0.0.1:5432/test"
REDIS = os.environ.get("VITALRISK_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0"
N = int(os.environ.get("VITALRISK_BENCH_TEAM_OPS", "1000"))
PID = pseudonymise("bench", b"benchmark-key")


def _rate(fn: Callable[[int], Any], n: int = N) -> float:
    fn(0)  # warm: connection, tables, first page
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return round(n / (time.perf_counter() - t0), 1)


def _record(i: int) -> AuditRecord:
    return AuditRecord("bench", "predict", "POST /v1/score", [PID], "3", {"request_ids": [str(i)]})


def _row(i: int) -> PredictionRecord:
    feats = {f"f{j}": float(j) for j in range(40)}
    return PredictionRecord(
        f"r{i}", "2026-12-01T00:00:00Z", PID, "m", "3", "champion", 0.1, 2.0, feats, "ward", 24.0
    )


def _open_store(where: str) -> Any:
    return (
        PgAuditStore(where) if where.startswith("postgresql") else AuditLog(where, keep_open=True)
    )


def _append_proc(where: str, n: int) -> None:
    store = _open_store(where)
    for i in range(n):
        store.append_many([_record(i)])
    store.close()


def _two_processes(where: str, n: int) -> float:
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_append_proc, args=(where, n)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return round(2 * n / (time.perf_counter() - t0), 1)


def _audit(where: str) -> dict[str, Any]:
    store = _open_store(where)
    one = _rate(lambda i: store.append_many([_record(i)]))
    store.close()
    two = _two_processes(where, N // 2)
    store = _open_store(where)
    ok = store.verify()
    store.close()
    return {"appends_per_s_one_writer": one, "appends_per_s_two_processes": two, "verify_ok": ok.ok}


def _available(url: str, port: int) -> bool:
    from ops import procs
    from ops.settings import host_port

    return procs.port_open(*host_port(url, port))


def main() -> dict[str, Any]:
    out: dict[str, Any] = {"ops": N}
    with tempfile.TemporaryDirectory() as tmp:
        out["audit_file"] = _audit(str(Path(tmp) / "audit.jsonl"))
        log = PredictionLog(Path(tmp) / "p.sqlite")
        out["predlog_sqlite_full_tx_per_s"] = _rate(lambda i: log.append([_row(i)]))
        log.close()
    local = RateLimiter(1e9, 10**9)
    out["limit_memory_per_s"] = _rate(lambda i: local.acquire("k"), 20 * N)
    if _available(PG, 5432):
        import psycopg

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        where = f"{PG}?schema={schema}"
        try:
            out["audit_postgresql"] = _audit(where)
            pg_log = PgPredictionLog(where)
            out["predlog_postgresql_tx_per_s"] = _rate(lambda i: pg_log.append([_row(i)]))
            pg_log.close()
        finally:
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    else:
        out["postgresql"] = f"skipped: {PG} does not answer"
    if _available(REDIS, 6379):
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        limiter = RedisRateLimiter(1e9, 10**9, REDIS, prefix)
        out["limit_redis_per_s"] = _rate(lambda i: limiter.acquire("k"))
        limiter.buckets._client.delete(prefix + "rate:k")
        limiter.close()
    else:
        out["redis"] = f"skipped: {REDIS} does not answer"
    return out


if __name__ == "__main__":
    print(main())
