"""``vitalrisk register``: new registry version + the promotion gate (DVC stage).

Inside a DVC experiment (DVC sets ``DVC_EXP_NAME``) the version is registered, tagged with the
experiment and judged by the gate, but gets no alias: experiments never change what runs on
patients. ``vitalrisk promote --version N --reason ...`` promotes one by hand.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from core.errors import UserError

HELP = "register the trained model in MLflow; the gate decides champion or challenger"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="train stage output (run.json)")
    parser.add_argument("--features", required=True, help="features.parquet (to score test rows)")
    parser.add_argument("--metrics", required=True, help="evaluate stage metrics JSON")
    parser.add_argument("--out", required=True, help="register.json to write")
    parser.add_argument(
        "--gate-metrics", default=None, help="small JSON: version, gate passed (DVC metrics)"
    )
    parser.add_argument("--actor", default=None, help="who registers (default: $USER)")
    parser.add_argument("--params", default="params.yaml")


def run(args: argparse.Namespace) -> int:
    from core.params import load_section
    from models.config import RegisterConfig
    from models.registry import default_actor
    from models.tracking import StoreMismatchError
    from models.workflow import gate_metrics_file, register_run
    from pipelines._modelio import read_features, read_json

    config = load_section(RegisterConfig, "register", args.params)
    from models.cohort import features_path

    features = read_features(features_path(args.model_dir, args.features) or args.features)
    metrics = read_json(args.metrics, "evaluation metrics") or {}
    experiment = os.environ.get("DVC_EXP_NAME") or None
    try:
        result = register_run(
            args.model_dir, features, metrics, config, default_actor(args.actor), experiment
        )
    except StoreMismatchError as exc:
        raise UserError(str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"{args.model_dir}: {exc}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    if args.gate_metrics:
        Path(args.gate_metrics).write_text(json.dumps(gate_metrics_file(result), indent=2) + "\n")
    name, version = result["model_name"], result["version"]
    if experiment:
        verdict = "passes" if result["gate_passed"] else "fails"
        print(
            f"{name} version {version} (DVC experiment {experiment}): no alias, champion stays "
            f"version {result['champion_now']}; the gate {verdict}: {result['reason']}"
        )
    else:
        print(f"{name} version {version} -> {result['alias']}: {result['reason']}")
    return 0
