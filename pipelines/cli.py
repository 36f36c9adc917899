"""``vitalrisk``: one subcommand per pipeline stage and operations task.

Each subcommand lives in its own module under ``pipelines`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``vitalrisk --help`` is quick and a broken optional stack does not break unrelated commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from core.errors import UserError

#: subcommand -> module under ``pipelines``
COMMANDS: dict[str, str] = {
    "simulate": "simulate",
    "ingest": "ingest",
    "features": "features",
    "train": "train",
    "tune": "tune",
    "evaluate": "evaluate",
    "register": "register",
    "promote": "promote",
    "rollback": "rollback",
    "serve": "serve",
    "bento": "bento",
    "monitor": "monitor",
    "export": "export",
    "audit": "audit",
    "lineage": "lineage",
    "summary": "summary",
    "collect": "collect",
    "team": "team",
    "feed": "feed",
}


def _available() -> dict[str, object]:
    mods: dict[str, object] = {}
    for name, mod in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(f"pipelines.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pipelines.{mod}":
                continue  # not built yet
            raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitalrisk",
        description=(
            "Vital-sign deterioration-risk models end to end: simulate or ingest observations, "
            "build point-in-time features, train LightGBM against NEWS2, register in MLflow, "
            "serve with BentoML and monitor drift with Evidently. Stages read params.yaml."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)  # type: ignore[attr-defined]
        mod.add_arguments(p)  # type: ignore[attr-defined]
        p.set_defaults(_run=mod.run)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else getattr(logging, os.environ.get("VITALRISK_LOG_LEVEL", "INFO")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"vitalrisk {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
