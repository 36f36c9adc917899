"""``vitalrisk train``: fit the calibrated LightGBM model and log it to MLflow (DVC stage)."""

from __future__ import annotations

import argparse
import logging
import os

from core.errors import UserError

HELP = "train LightGBM (patient split, early stopping, calibration) and log the run to MLflow"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="features.parquet (features stage)")
    parser.add_argument("--dictionary", default=None, help="feature_dictionary.json")
    parser.add_argument(
        "--patients",
        default=None,
        help="patients.parquet: if given, keep only patients consenting to model_training",
    )
    parser.add_argument("--out", required=True, help="output folder (run.json, predictions)")
    parser.add_argument(
        "--metrics", default=None, help="small JSON of validation/CV figures (DVC metrics)"
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data-dvc", default="data.dvc", help="for lineage (md5 of raw data)")
    parser.add_argument("--backend", choices=["local", "dask"], default=None, help="override")


def run(args: argparse.Namespace) -> int:
    from core.params import load_section, read_params
    from models.config import TrainConfig
    from models.lineage import build_lineage
    from models.workflow import RunContext, train_and_log
    from pipelines._modelio import read_features, read_json, read_optional_parquet

    config = load_section(TrainConfig, "train", args.params)
    if args.backend:
        config = config.model_copy(update={"backend": args.backend})
    cohort = config.cohort_horizon_days is not None
    frame = read_features(args.features, cohort=cohort)
    dictionary = read_json(args.dictionary, "feature dictionary")
    if cohort:
        from models.cohort import label_at_horizon

        try:
            labelled = label_at_horizon(frame, float(config.cohort_horizon_days or 0))
        except ValueError as exc:
            raise UserError(f"{args.features}: {exc}") from None
        frame = labelled.frame.assign(
            event_time=labelled.frame["patient_id"].map(labelled.event_times)
        )
        dictionary = {
            **(dictionary or {}),
            "label": {
                "horizon_days": config.cohort_horizon_days,
                "positive": labelled.n_positive,
                "negative": labelled.n_negative,
                "excluded_censored_before_horizon": labelled.n_excluded_censored,
            },
        }
    consent = None
    patients = read_optional_parquet(args.patients)
    if patients is not None:
        from governance.consent import filter_by_consent

        frame, result = filter_by_consent(frame, "model_training", patients)
        consent = result.as_dict()
    raw = read_params(args.params)
    used = {k: raw.get(k) for k in ("features", "train") if k in raw}
    record, tags = build_lineage(used, dictionary, args.features, consent, args.data_dvc)
    context = RunContext.from_env(os.environ, tags)
    try:
        info = train_and_log(
            frame,
            config,
            args.out,
            dictionary,
            tags,
            lineage_record=record,
            context=context,
            features_path=str(args.features),
            metrics_path=args.metrics,
        )
    except ValueError as exc:
        raise UserError(f"{args.features}: {exc}") from None
    print(
        f"trained run {info['run_id']} ({info['run_name']}): {len(info['feature_names'])} features, "
        f"{info['best_iteration']} trees, val AUPRC {info['val'].get('val_auprc') or float('nan'):.3f}, "
        f"alert threshold {info['threshold']:.4f}"
    )
    return 0
