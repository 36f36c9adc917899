"""Serving speed: vitalrisk's BentoML API vs ``mlflow models serve`` on the same model.

Starts both servers on 127.0.0.1 (the same number of worker processes each) on a tiny real
champion registered in a temporary MLflow store, then measures with an asyncio aiohttp client
(bounded request counts), plus each server's own CPU time per request (from /proc):

* ``/v1/score`` one patient from raw observations (24 h of 7 vitals) at concurrency 1, 8, 32
* ``/v1/score/features`` one feature row per request at concurrency 1, 8, 32 (adaptive batching)
* one request of 1,000 feature rows
* ``mlflow models serve`` ``/invocations`` with the same rows (``dataframe_split``)

Targets (issue 5): feature-row throughput >= 3x mlflow serve; p99 < 25 ms at concurrency 8.
Run: ``python -m benchmarks.run serving`` on an otherwise idle machine.
``BENCH_SERVING_WORKERS=N`` runs vitalrisk with N worker processes (default 1);
``BENCH_SERVING_PARTS=features,score`` measures only some of
``features,mlflow,score,batch`` (the full set is needed for the targets).
``BENCH_SERVING_CLIENT=httpx`` uses httpx instead of aiohttp as the load generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 300, 8: 800, 32: 1200}
SCORE_REQUESTS = {1: 200, 8: 1000, 32: 1200}
#: mlflow serve is an order of magnitude slower: fewer requests keep the run to minutes
MLFLOW_REQUESTS = {1: 60, 8: 120, 32: 160}
KEY = "bench-secret-000001"
PARTS = os.environ.get("BENCH_SERVING_PARTS", "features,mlflow,score,batch").split(",")
WORKERS = int(os.environ.get("BENCH_SERVING_WORKERS", "1"))
CLIENT = os.environ.get("BENCH_SERVING_CLIENT", "aiohttp")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], logfile: Path, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {logfile.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s: {logfile.read_text()[-2000:]}")


def _start(
    cmd: list[str], env: dict[str, str], cwd: Path, name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    logfile = cwd / f"{name}.log"
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=logfile.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, logfile


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of a process and all its live descendants (Linux /proc).

    BentoML's workers run in sessions of their own, so the tree, not the process group.
    """
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])  # ppid; utime and stime are fields 11 and 12
        ticks[pid] = int(fields[11]) + int(fields[12])
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


async def _load(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    headers: dict[str, str],
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers, each sends its next body when the answer is in.

    The load generator shares the two cores with the server and every request's latency
    includes the client's own work, so the client is aiohttp (~0.25 ms of CPU per request
    here); ``BENCH_SERVING_CLIENT=httpx`` measures with httpx (~1 ms per request, and ~4 ms
    more latency at concurrency 8 when answers arrive together).
    """
    latencies: list[float] = []
    errors: dict[int, int] = {}
    it = iter(bodies)
    hdrs = {**headers, "content-type": "application/json"}
    async with _client(concurrency, hdrs) as post:
        # warm-up (connections, batching optimiser)
        await asyncio.gather(
            *(post(url, bodies[i % len(bodies)]) for i in range(min(concurrency * 2, 40)))
        )

        async def worker() -> None:
            for body in it:
                t = time.perf_counter()
                status = await post(url, body)
                latencies.append(time.perf_counter() - t)
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1

        cpu0 = _tree_cpu_seconds(server_pid) if server_pid else 0.0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = _tree_cpu_seconds(server_pid) if server_pid else 0.0
    lat = np.array(latencies) * 1000
    out = {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "throughput_rps": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }
    if server_pid:  # the server's own CPU per request: comparable across machine loads
        out["server_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / len(lat), 2)
    return out


@contextlib.asynccontextmanager
async def _client(
    concurrency: int, headers: dict[str, str]
) -> AsyncIterator[Callable[[str, bytes], Awaitable[int]]]:
    """``post(url, body) -> status`` over ``concurrency`` keep-alive connections."""
    if CLIENT == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=60.0, limits=limits, headers=headers) as hc:

            async def post_httpx(url: str, body: bytes) -> int:
                return (await hc.post(url, content=body)).status_code

            yield post_httpx
        return
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60.0)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:

        async def post_aiohttp(url: str, body: bytes) -> int:
            async with session.post(url, data=body) as r:
                await r.read()  # the whole answer, as a client would
                return r.status

        yield post_aiohttp


def main() -> dict[str, Any]:
    # per-request client logging would cost the load generator CPU on a 2-core machine
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # a terminated benchmark still stops the servers it started (finally blocks run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.serving.factory import register_models, synthetic_cohort

    out: dict[str, Any] = {
        "host": "127.0.0.1",
        "workers": WORKERS,
        "mlflow_workers": WORKERS,  # the same number of processes for both servers
        "cpu_count": os.cpu_count(),
        "parts": PARTS,
        "client": CLIENT,
    }
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
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
                # mlflow serve execs `uvicorn` by name: the venv's bin must be on PATH
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        models = register_models(root / "work", challenger=False)
        version, model, _ = models["champion"]
        frame = models["frame"]
        names = model.feature_names
        (root / "params.yaml").write_text(
            "serve:\n  rate_limit_per_second: 100000\n  rate_limit_burst: 100000\n  max_body_bytes: 20000000\n"
        )
        vr_port, ml_port = _free_port(), _free_port()
        exe = Path(sys.executable).parent
        vr, vr_log = _start(
            [
                str(exe / "vitalrisk"),
                "serve",
                "--port",
                str(vr_port),
                "--params",
                str(root / "params.yaml"),
                "--workers",
                str(WORKERS),
            ],
            env,
            root,
            "vitalrisk",
        )
        need_mlflow = bool({"mlflow", "batch"} & set(PARTS))
        ml, ml_log = (
            _start(
                [
                    str(exe / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    f"models:/vitalrisk-deterioration/{version}",
                    "--env-manager",
                    "local",
                    "-p",
                    str(ml_port),
                    "-h",
                    "127.0.0.1",
                    "-w",
                    str(WORKERS),
                ],
                env,
                root,
                "mlflow",
            )
            if need_mlflow
            else (None, None)
        )
        try:
            _wait(f"http://127.0.0.1:{vr_port}/readyz", vr, vr_log)
            if ml is not None and ml_log is not None:
                _wait(f"http://127.0.0.1:{ml_port}/ping", ml, ml_log)
            rows = frame[names].astype(float)
            recs = [
                {k: (None if np.isnan(v) else float(v)) for k, v in r.items()}
                for r in rows.to_dict("records")
            ]
            pids = frame["patient_id"].tolist()
            feat_bodies = [
                json.dumps({"rows": [{"patient_id": pids[i], "features": recs[i]}]}).encode()
                for i in range(len(recs))
            ]
            ml_bodies = [
                json.dumps(
                    {"dataframe_split": {"columns": names, "data": [[r[k] for k in names]]}}
                ).encode()
                for r in recs
            ]
            obs, _, _, _ = synthetic_cohort(n=40, seed=5)
            score_bodies = []
            for pid, g in obs.groupby("patient_id"):
                items = [
                    {"time": t.isoformat().replace("+00:00", "Z"), "code": c, "value": float(v)}
                    for t, c, v in zip(g["time"], g["code"], g["value"], strict=True)
                ]
                score_bodies.append(
                    json.dumps(
                        {
                            "patients": [
                                {
                                    "patient_id": str(pid),
                                    "covariates": {"age": 70, "sex": "F"},
                                    "observations": items,
                                }
                            ]
                        }
                    ).encode()
                )
            auth = {"Authorization": f"Bearer {KEY}"}
            vr_url = f"http://127.0.0.1:{vr_port}"
            ml_url = f"http://127.0.0.1:{ml_port}/invocations"

            def run(
                url: str,
                bodies: list[bytes],
                counts: dict[int, int],
                headers: dict[str, str],
                pid: int,
            ) -> list[dict[str, Any]]:
                res = []
                for c in CONCURRENCY:
                    reps = (bodies * (counts[c] // len(bodies) + 1))[: counts[c]]
                    r = asyncio.run(_load(url, reps, c, headers, pid))
                    log.info("%s c=%d: %s", url, c, r)
                    res.append(r)
                return res

            if "features" in PARTS:
                out["vitalrisk_features_row"] = run(
                    f"{vr_url}/v1/score/features", feat_bodies, REQUESTS, auth, vr.pid
                )
            if "mlflow" in PARTS:
                assert ml is not None
                out["mlflow_serve_row"] = run(ml_url, ml_bodies, MLFLOW_REQUESTS, {}, ml.pid)
            if "score" in PARTS:
                out["vitalrisk_score_raw_patient"] = run(
                    f"{vr_url}/v1/score", score_bodies, SCORE_REQUESTS, auth, vr.pid
                )
            if "batch" in PARTS:
                big = (recs * (1000 // len(recs) + 1))[:1000]
                vr_big = [json.dumps({"rows": [{"features": r} for r in big]}).encode()] * 10
                ml_big = [
                    json.dumps(
                        {
                            "dataframe_split": {
                                "columns": names,
                                "data": [[r[k] for k in names] for r in big],
                            }
                        }
                    ).encode()
                ] * 10
                out["vitalrisk_features_1000_rows"] = asyncio.run(
                    _load(f"{vr_url}/v1/score/features", vr_big, 1, auth)
                )
                out["mlflow_serve_1000_rows"] = asyncio.run(_load(ml_url, ml_big, 1, {}))
        finally:
            _stop(vr)
            if ml is not None:
                _stop(ml)
    targets: dict[str, bool] = {}
    if "vitalrisk_features_row" in out and "mlflow_serve_row" in out:
        ratio = {
            str(a["concurrency"]): round(a["throughput_rps"] / b["throughput_rps"], 2)
            for a, b in zip(out["vitalrisk_features_row"], out["mlflow_serve_row"], strict=True)
        }
        out["throughput_ratio_vs_mlflow"] = ratio
        targets["throughput_3x_mlflow_at_8"] = ratio["8"] >= 3.0
    for part, name in (
        ("vitalrisk_features_row", "p99_under_25ms_at_8_features"),
        ("vitalrisk_score_raw_patient", "p99_under_25ms_at_8_raw_patient"),
    ):
        if part in out:
            c8 = next(r for r in out[part] if r["concurrency"] == 8)
            targets[name] = c8["p99_ms"] < 25.0
    out["targets"] = targets
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
