"""``vitalrisk tune``: Optuna search on validation AUPRC; trials are nested MLflow runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserError

HELP = "search LightGBM hyperparameters with Optuna (trials as nested MLflow runs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="features.parquet")
    parser.add_argument("--trials", type=int, default=None, help="default: train.tuning.n_trials")
    parser.add_argument("--timeout", type=float, default=None, help="seconds")
    parser.add_argument("--out", default=None, help="write best params as JSON here")
    parser.add_argument("--params", default="params.yaml")


def run(args: argparse.Namespace) -> int:
    from core.params import load_section
    from models import tracking
    from models.config import TrainConfig
    from models.tuning import tune
    from pipelines._modelio import read_features

    config = load_section(TrainConfig, "train", args.params)
    frame = read_features(args.features)
    try:
        with tracking.start_run(experiment=config.experiment, run_name="tune") as run_:
            tracking.set_tags({"stage": "tune"})
            result = tune(frame, config, args.trials, args.timeout)
            tracking.log_params({f"best.{k}": v for k, v in result["best_params"].items()})
            tracking.log_metrics({"best_val_auprc": result["best_value"]})
    except ValueError as exc:
        raise UserError(f"{args.features}: {exc}") from None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    sets = " ".join(
        f"-S train.{k}={v:.4g}" if isinstance(v, float) else f"-S train.{k}={v}"
        for k, v in result["best_params"].items()
    )
    print(
        f"tuning run {run_.info.run_id}: {result['n_trials']} trials, best val AUPRC "
        f"{result['best_value']:.4f}\napply with: dvc exp run {sets}"
    )
    return 0
