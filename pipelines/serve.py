"""``vitalrisk serve``: start the BentoML API on the registry's champion.

Checks what the service needs first (valid ``serve`` params, API keys, production secrets,
a ``champion`` alias, enough open files) so that a missing piece is one clear line instead of
a worker traceback, then runs the server (``serving/supervisor.py``) until SIGTERM or SIGINT,
and returns only once every worker has stopped and the port is free.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from core.errors import UserError

HELP = "serve the champion model over HTTP (BentoML): /v1/score, /v1/score/features, FHIR, data collection"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default serve.port, 3000)")
    parser.add_argument("--params", default="params.yaml", help="params file (section serve)")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default serve.workers)"
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the registry pre-check (the service itself still stops without a champion)",
    )


def run(args: argparse.Namespace) -> int:
    from serving.config import PARAMS_ENV
    from serving.runtime import StartupError, load_startup
    from serving.supervisor import Supervisor, ensure_open_files

    params = str(Path(args.params).resolve()) if Path(args.params).is_file() else args.params
    os.environ[PARAMS_ENV] = params
    try:
        config, _, name = load_startup(args.params)
    except StartupError as exc:
        raise UserError(str(exc)) from None
    if not args.no_check:
        from models import tracking

        if tracking.get_alias(name, tracking.CHAMPION) is None:
            raise UserError(
                f"registered model {name!r} has no '{tracking.CHAMPION}' alias in "
                f"{tracking.tracking_uri()}: run `dvc repro` (or `vitalrisk register`) first"
            )
    ensure_open_files(config.max_connections)
    host = args.host or config.host
    port = args.port or config.port
    workers = args.workers or config.workers
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    env["VITALRISK_SERVE_WORKERS"] = str(workers)
    env["VITALRISK_ADAPTIVE_BATCHING"] = "1" if config.adaptive_batching else "0"
    env["VITALRISK_MAX_BATCH_SIZE"] = str(config.max_batch_size)
    env["VITALRISK_MAX_LATENCY_MS"] = str(config.max_latency_ms)
    env["VITALRISK_ACCESS_LOG"] = "1" if config.access_log else "0"
    env["VITALRISK_TRACING"] = "1" if config.tracing else "0"
    log.info("serving %s@champion on http://%s:%d (%d worker(s))", name, host, port, workers)
    supervisor = Supervisor(
        host=host,
        port=port,
        workers=workers,
        params=params if Path(params).is_file() else None,
        env=env,
        shutdown_timeout=float(config.shutdown_timeout_seconds),
        max_restarts_per_minute=config.max_worker_restarts_per_minute,
    )
    return supervisor.run()
