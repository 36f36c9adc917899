"""``vitalrisk register``: new registry version + champion/challenger gate (DVC stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserError

HELP = "register the trained model in MLflow and promote it to champion if it beats the champion"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="train stage output (run.json)")
    parser.add_argument("--features", required=True, help="features.parquet (to score test rows)")
    parser.add_argument("--metrics", required=True, help="evaluate stage metrics JSON")
    parser.add_argument("--out", required=True, help="register.json to write")
    parser.add_argument("--actor", default=None, help="who registers (default: $USER)")
    parser.add_argument("--params", default="params.yaml")


def run(args: argparse.Namespace) -> int:
    from core.params import load_section
    from models.config import RegisterConfig
    from models.registry import default_actor
    from models.workflow import register_run
    from pipelines._modelio import read_features, read_json

    config = load_section(RegisterConfig, "register", args.params)
    from models.cohort import features_path

    features = read_features(features_path(args.model_dir, args.features) or args.features)
    metrics = read_json(args.metrics, "evaluation metrics") or {}
    try:
        result = register_run(args.model_dir, features, metrics, config, default_actor(args.actor))
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"{args.model_dir}: {exc}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(
        f"{result['model_name']} version {result['version']} -> {result['alias']}: "
        f"{result['reason']}"
    )
    return 0
