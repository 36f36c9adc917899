"""``vitalrisk rollback``: move champion back to the previous champion in the history."""

from __future__ import annotations

import argparse

from core.errors import UserError

HELP = "roll the champion back to the previous champion (recorded with who, when and why)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", default="manual rollback", help="why")
    parser.add_argument("--actor", default=None, help="who (default: $USER)")
    parser.add_argument("--name", default=None, help="registered model (default: params)")
    parser.add_argument("--params", default="params.yaml")


def run(args: argparse.Namespace) -> int:
    from models.registry import default_actor, rollback
    from pipelines.promote import model_name

    name = model_name(args)
    try:
        rec = rollback(name, default_actor(args.actor), args.reason)
    except LookupError as exc:
        raise UserError(str(exc).strip("'\"")) from None
    print(
        f"{name}@champion rolled back from version {rec['rolled_back_version']} to "
        f"{rec['version']} by {rec['actor']} at {rec['at']}: {rec['reason']}"
    )
    return 0
