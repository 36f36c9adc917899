"""``vitalrisk bento``: a Bento that pins the registry's champion (``make bento``).

Imports the champion into BentoML's model store (``serving.service.import_champion``), then
runs ``bentoml build`` with ``bentofile.yaml``, which includes that model and installs only
``requirements.serve.txt``. The Bento serves its own copy of the model, so what it scores with
is fixed at build time; a later promotion needs a new Bento.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from core.errors import UserError

HELP = "build a Bento (bentoml build) that pins the registry's champion model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=None, help="registered model (default: params)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--bentofile", default="bentofile.yaml")
    parser.add_argument(
        "--no-build", action="store_true", help="only import the champion into BentoML's store"
    )


def run(args: argparse.Namespace) -> int:
    from pipelines.promote import model_name
    from serving.runtime import StartupError
    from serving.service import import_champion

    name = model_name(args)
    try:
        tag = import_champion(name)
    except StartupError as exc:
        raise UserError(str(exc)) from None
    print(f"champion imported into BentoML's model store as {tag}")
    if args.no_build:
        return 0
    if not Path(args.bentofile).is_file():
        raise UserError(f"{args.bentofile}: bentofile not found")
    bentoml = [sys.executable, "-m", "bentoml"]
    proc = subprocess.run([*bentoml, "build", "-f", args.bentofile], text=True, capture_output=True)
    if proc.returncode != 0:
        raise UserError(f"bentoml build failed: {(proc.stderr or proc.stdout)[-2000:]}")
    built = next((ln for ln in proc.stdout.splitlines() if "Successfully built" in ln), "")
    print(built.strip() or proc.stdout[-500:], f"(model {tag})")
    return 0
