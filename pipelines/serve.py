"""``vitalrisk serve``: start the BentoML API on the registry's champion.

Checks what the service needs first (valid ``serve`` params, API keys, a ``champion`` alias)
so that a missing piece is one clear line instead of a worker traceback, then hands the
process over to ``bentoml serve serving.service:VitalRisk``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from core.errors import UserError

HELP = "serve the champion model over HTTP (BentoML): /v1/score, /v1/score/features, FHIR, data collection"
SERVICE = "serving.service:VitalRisk"

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


def build_command(host: str, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("bentoml")
    bentoml = str(exe) if exe.exists() else (shutil.which("bentoml") or "bentoml")
    return [bentoml, "serve", SERVICE, "--host", host, "--port", str(port)]


def run(args: argparse.Namespace) -> int:
    from serving.config import PARAMS_ENV
    from serving.runtime import StartupError, load_startup

    os.environ[PARAMS_ENV] = (
        str(Path(args.params).resolve()) if Path(args.params).is_file() else args.params
    )
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
    host = args.host or config.host
    port = args.port or config.port
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    env["VITALRISK_SERVE_WORKERS"] = str(args.workers or config.workers)
    env["VITALRISK_ADAPTIVE_BATCHING"] = "1" if config.adaptive_batching else "0"
    env["VITALRISK_MAX_BATCH_SIZE"] = str(config.max_batch_size)
    env["VITALRISK_MAX_LATENCY_MS"] = str(config.max_latency_ms)
    env["VITALRISK_ACCESS_LOG"] = "1" if config.access_log else "0"
    env["VITALRISK_TRACING"] = "1" if config.tracing else "0"
    cmd = build_command(host, port)
    log.info("serving %s@champion on http://%s:%d (%s)", name, host, port, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)  # replaces this process: signals go straight to bentoml
    return 0  # pragma: no cover
