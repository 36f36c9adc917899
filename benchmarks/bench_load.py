"""Sustained load: 32 clients for 60 s on ``/v1/score``, then on ``/v1/observations``.

A real ``vitalrisk serve`` (tiny real champion, default limits except the per-key rate) on
127.0.0.1, closed-loop aiohttp clients on the same machine. Printed and written per route:
requests, errors (any answer but 200, any connection error), throughput, p50/p99 latency,
the server's CPU per request; for the whole run the server's resident memory (supervisor +
workers) after the warm-up and at the end, open files of the worker, and whether every
answered request is in the verified audit trail.

Targets (issue 15): 0 errors on both routes, RSS growth under 10 %.
``BENCH_LOAD_SECONDS`` (default 60) and ``BENCH_LOAD_CLIENTS`` (default 32) shorten or widen
the run; ``BENCH_LOAD_WORKERS`` (default 1) sets the worker processes.
Run: ``python -m benchmarks.run load``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SECONDS = float(os.environ.get("BENCH_LOAD_SECONDS", "60"))
CLIENTS = int(os.environ.get("BENCH_LOAD_CLIENTS", "32"))
WORKERS = int(os.environ.get("BENCH_LOAD_WORKERS", "1"))
KEY = "bench-load-secret-0001"
WARMUP_REQUESTS = 300


def _rss_bytes(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return int(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))


def _worker_files(pid: int) -> int:
    import psutil

    return int(sum(p.num_fds() for p in psutil.Process(pid).children(recursive=True)))


def _score_bodies(n: int = 40) -> list[bytes]:
    from tests.serving.factory import synthetic_cohort

    obs, _, _, _ = synthetic_cohort(n=n, seed=7)
    out = []
    for pid, g in obs.groupby("patient_id"):
        items = [
            {"time": t.isoformat().replace("+00:00", "Z"), "code": c, "value": float(v)}
            for t, c, v in zip(g["time"], g["code"], g["value"], strict=True)
        ]
        out.append(
            json.dumps(
                {
                    "patients": [
                        {
                            "patient_id": f"LOAD-{pid[-6:]}",
                            "covariates": {"age": 70, "sex": "F"},
                            "observations": items,
                        }
                    ]
                }
            ).encode()
        )
    return out


def _observation_bodies(n: int = 40, per_request: int = 50) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        items = [
            {
                "patient_id": f"DEVICE-{i:03d}-{j % 5}",
                "time": f"2026-01-0{1 + j % 9}T{j % 24:02d}:{j % 60:02d}:00Z",
                "code": ["heart_rate", "spo2", "resp_rate"][j % 3],
                "value": float(rng.integers(60, 100)),
                "source": "wearable",
            }
            for j in range(per_request)
        ]
        out.append(json.dumps({"observations": items}).encode())
    return out


async def _run_route(
    url: str, bodies: list[bytes], seconds: float, clients: int, pid: int, warmup: int
) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds`` after ``warmup`` requests."""
    import aiohttp

    from benchmarks.bench_serving import _tree_cpu_seconds

    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as s:

        async def post(body: bytes) -> int:
            async with s.post(url, data=body) as r:
                await r.read()
                return r.status

        for i in range(warmup):
            await post(bodies[i % len(bodies)])
        rss_start = _rss_bytes(pid)
        cpu0 = _tree_cpu_seconds(pid)
        end = time.monotonic() + seconds

        async def client(n: int) -> None:
            i = n
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    status = await post(bodies[i % len(bodies)])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await asyncio.sleep(0.05)
                    continue
                latencies.append(time.perf_counter() - t)
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(client(n) for n in range(clients)))
        wall = time.perf_counter() - t0
        cpu1 = _tree_cpu_seconds(pid)
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(lat),
        "errors": errors,
        "throughput_rps": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "server_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(1, len(lat)), 2),
        "rss_mb_after_warmup": round(rss_start / 2**20, 1),
        "rss_mb_end": round(_rss_bytes(pid) / 2**20, 1),
    }


def _audit_summary(path: Path) -> dict[str, Any]:
    from governance.audit import AuditLog

    res = AuditLog(path).verify()
    answered = sum(
        e["details"].get("requests", 0)
        for e in AuditLog(path).entries()
        if e["details"].get("status") == 200
    )
    return {"ok": res.ok, "entries": res.entries, "answered_requests_audited": answered}


def main() -> dict[str, Any]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.bench_serving import _free_port, _start, _stop, _wait
    from tests.serving.factory import register_models

    out: dict[str, Any] = {"clients": CLIENTS, "seconds": SECONDS, "workers": WORKERS}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        root = Path(tmp)
        env = dict(os.environ)
        env.update(
            {
                "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns.db",
                "VITALRISK_API_KEYS": f"bench:*:{KEY}",
                "VITALRISK_PREDICTION_LOG": str(root / "logs" / "predictions.sqlite"),
                "VITALRISK_AUDIT_LOG": str(root / "logs" / "audit.jsonl"),
                "VITALRISK_LANDING_DIR": str(root / "landing"),
                "BENTOML_HOME": str(root / "bentoml"),
            }
        )
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        register_models(root / "work", challenger=False)
        (root / "params.yaml").write_text(
            "serve:\n  rate_limit_per_second: 100000\n  rate_limit_burst: 100000\n"
        )
        port = _free_port()
        exe = Path(sys.executable).parent / "vitalrisk"
        cmd = [str(exe), "serve", "--port", str(port), "--params", str(root / "params.yaml")]
        proc, logfile = _start([*cmd, "--workers", str(WORKERS)], env, root, "vitalrisk")
        try:
            _wait(f"http://127.0.0.1:{port}/readyz", proc, logfile)
            base = f"http://127.0.0.1:{port}"
            files0 = _worker_files(proc.pid)
            rss0: int | None = None
            for route, bodies in (
                ("/v1/score", _score_bodies()),
                ("/v1/observations", _observation_bodies()),
            ):
                res = asyncio.run(
                    _run_route(base + route, bodies, SECONDS, CLIENTS, proc.pid, WARMUP_REQUESTS)
                )
                rss0 = rss0 if rss0 is not None else int(res["rss_mb_after_warmup"] * 2**20)
                log.info("%s: %s", route, res)
                out[route] = res
            rss1 = _rss_bytes(proc.pid)
            out["rss_mb_start"] = round((rss0 or rss1) / 2**20, 1)
            out["rss_mb_end"] = round(rss1 / 2**20, 1)
            out["rss_growth_pct"] = round(100 * (rss1 - (rss0 or rss1)) / (rss0 or rss1), 1)
            out["worker_open_files"] = {"start": files0, "end": _worker_files(proc.pid)}
        finally:
            _stop(proc)
        out["audit"] = _audit_summary(root / "logs" / "audit.jsonl")
    answered = sum(out[r]["requests"] for r in ("/v1/score", "/v1/observations"))
    out["targets"] = {
        "zero_errors": not out["/v1/score"]["errors"] and not out["/v1/observations"]["errors"],
        "rss_growth_under_10pct": out["rss_growth_pct"] < 10.0,
        "audit_complete": out["audit"]["ok"]
        and out["audit"]["answered_requests_audited"] >= answered,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
