"""``vitalrisk features``: prediction times, labels and point-in-time features (DVC stage)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from core.errors import UserError

HELP = "build point-in-time features and labels from canonical observations (local or Dask)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--observations",
        required=True,
        help="directory with observations.parquet, patients.parquet and outcomes.parquet "
        "(a local folder or a URL such as s3://bucket/observations)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory: features.parquet, feature_dictionary.json, features_report.json "
        "(a local folder or a URL)",
    )
    parser.add_argument("--params", default="params.yaml", type=Path, help="params file")
    parser.add_argument(
        "--vocabulary",
        default=None,
        type=Path,
        help="vocabulary YAML (default: config/vocabulary.yaml)",
    )
    parser.add_argument(
        "--backend", choices=["local", "dask"], default=None, help="override features.backend"
    )
    parser.add_argument(
        "--verbose-dask", action="store_true", help="show the Dask scheduler/worker log"
    )


def run(args: argparse.Namespace) -> int:
    import time

    from pydantic import ValidationError

    from core.params import load_section
    from core.vocabulary import load_vocabulary
    from features.config import FeaturesConfig
    from features.stage import run as run_stage
    from features.stage import tune_process

    config = load_section(FeaturesConfig, "features", args.params)
    if args.backend:
        config = config.model_copy(update={"backend": args.backend})
    try:
        vocab = load_vocabulary(args.vocabulary)
    except (OSError, ValidationError) as exc:
        raise UserError(f"{args.vocabulary or 'config/vocabulary.yaml'}: {exc}") from None
    if config.backend == "dask" and not args.verbose_dask:
        logging.getLogger("distributed").setLevel(logging.WARNING)
    tune_process()
    t0 = time.perf_counter()
    try:
        summary = run_stage(args.observations, args.out, config, vocab)
    except FileNotFoundError as exc:
        raise UserError(f"{exc} (expected the ingest stage's outputs)") from None
    except ValueError as exc:
        raise UserError(f"features: {exc}") from None
    secs = time.perf_counter() - t0
    if not summary["rows"]:
        _explain_empty(args.observations, config, summary)
    print(
        f"features ({config.backend}): {summary['rows']} rows x {summary['n_features']} features "
        f"-> {args.out} in {secs:.1f}s"
    )
    for name, s in summary["by_setting"].items():
        print(
            f"  {name:<6} rows {int(s['rows']):>8}  positives {int(s['positives']):>6}  "
            f"prevalence {s['prevalence']:.3%}"
        )
    excluded = ", ".join(f"{k} {v}" for k, v in summary["excluded"].items())
    print(f"  excluded prediction times: {excluded}")
    return 0


def _explain_empty(observations: str, config, summary: dict) -> None:  # type: ignore[no-untyped-def]
    """0 feature rows: fine for a one-row-per-patient cohort project, else exit 2 with why."""
    import pandas as pd

    from core import storage

    cohort = storage.join(observations, "cohort.parquet")
    if storage.exists(cohort) and len(storage.read_parquet(cohort, columns=["patient_id"])):
        print(
            "features: 0 observation-based rows; the one-row-per-patient cohort goes to train "
            "(set train.cohort_horizon_days)"
        )
        return
    pats = storage.read_parquet(storage.join(observations, "patients.parquet"))
    outs = storage.read_parquet(storage.join(observations, "outcomes.parquet"))
    if pats.empty:
        why = (
            "no patients (the ingest stage wrote an empty patients table: supply a patients "
            "table, or data files that carry patients such as PSV demographics)"
        )
    else:
        settings = sorted(set(pats.get("setting", pd.Series(dtype=str)).dropna().astype(str)))
        missing = [
            s
            for s in settings
            if s not in config.prediction_times or s not in config.labels.horizon_hours
        ]
        if missing:
            why = (
                f"setting(s) {missing} have no features.prediction_times / features.labels."
                "horizon_hours entry (add one per setting)"
            )
        else:
            why = f"every prediction time was excluded ({summary['excluded']})"
    if outs.empty:
        why += "; there are no outcomes either (no outcomes table, or no PSV label rule)"
    raise UserError(f"features: 0 feature rows written: {why}")
