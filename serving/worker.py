"""``python -m serving.worker``: one BentoML worker process with vitalrisk's limits.

``serving/supervisor.py`` (``vitalrisk serve``) starts these with the listening socket's file
descriptor. Each runs BentoML's own worker (``_bentoml_impl.worker.service``: load the
service, build its ASGI app, serve it with uvicorn). BentoML builds uvicorn's ``Config`` with
only a few of its settings, so that call is given the rest here, from params ``serve``:
``limit_concurrency`` (= ``max_connections``), ``timeout_keep_alive``,
``timeout_graceful_shutdown``, ``h11_max_incomplete_event_size``, the connection limits of
``serving/connections.py`` as the HTTP protocol, and ``serving/guard.MetricsLabels`` around
the app (bounded metrics labels). This is the one place that reaches into BentoML's worker;
``tests/serving/test_resources.py`` fails if the limits stop applying.

A worker dies with the supervisor (``PR_SET_PDEATHSIG``), so a killed ``vitalrisk serve``
never leaves a worker holding the port.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
from typing import Any

SERVICE = "serving.service:VitalRisk"


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when its parent (the supervisor) exits, however it exits."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def install_limits(config: Any) -> None:
    """Give uvicorn's ``Config``, as BentoML's worker builds it, vitalrisk's limits."""
    import uvicorn

    from serving.connections import ConnectionLimits, protocol_class
    from serving.guard import MetricsLabels

    original = uvicorn.Config
    protocol = protocol_class(ConnectionLimits.from_config(config))

    def limited(*args: Any, **kwargs: Any) -> Any:
        if "app" in kwargs:
            kwargs["app"] = MetricsLabels(kwargs["app"])
        elif args:
            args = (MetricsLabels(args[0]), *args[1:])
        kwargs.update(
            http=protocol,
            limit_concurrency=int(config.max_connections),
            timeout_keep_alive=int(config.keep_alive_seconds),
            timeout_graceful_shutdown=int(config.shutdown_timeout_seconds),
            h11_max_incomplete_event_size=int(config.max_header_bytes),
            access_log=False,
        )
        return original(*args, **kwargs)

    uvicorn.Config = limited  # type: ignore[misc,assignment]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.worker")
    parser.add_argument("--fd", type=int, required=True, help="listening socket")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="supervisor pid")
    parser.add_argument("--params", default=None)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)

    from serving.config import load_serve_config

    config = load_serve_config(args.params)
    install_limits(config)
    from _bentoml_impl.worker.service import main as bentoml_worker

    bentoml_worker.main(
        args=[
            SERVICE,
            "--fd",
            str(args.fd),
            "--worker-id",
            str(args.worker_id),
            "--timeout-keep-alive",
            str(config.keep_alive_seconds),
            "--timeout-graceful-shutdown",
            str(config.shutdown_timeout_seconds),
        ],
        standalone_mode=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
