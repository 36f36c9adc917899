"""``vitalrisk promote --version N --reason ...``: make a registered version the champion."""

from __future__ import annotations

import argparse

from core.errors import UserError

HELP = "make a registered model version the champion (recorded with who, when and why)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", required=True, help="registered model version number")
    parser.add_argument("--reason", required=True, help="why (kept in registry tags and audit log)")
    parser.add_argument("--actor", default=None, help="who (default: $USER)")
    parser.add_argument("--name", default=None, help="registered model (default: params)")
    parser.add_argument("--params", default="params.yaml")


def model_name(args: argparse.Namespace) -> str:
    if args.name:
        return str(args.name)
    from core.params import load_section
    from models.config import RegisterConfig

    return load_section(RegisterConfig, "register", args.params).model_name


def run(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from models.registry import default_actor, promote

    if not args.reason.strip():
        raise UserError("--reason must not be empty")
    name = model_name(args)
    try:
        rec = promote(name, str(args.version), default_actor(args.actor), args.reason)
    except MlflowException as exc:
        raise UserError(
            f"registered model {name!r} version {args.version}: {exc.message}"
        ) from None
    print(
        f"{name}@champion -> version {rec['version']} (was {rec['previous_version']}) "
        f"by {rec['actor']} at {rec['at']}: {rec['reason']}"
    )
    return 0
