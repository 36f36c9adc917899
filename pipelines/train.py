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
    parser.add_argument(
        "--vocabulary",
        default=None,
        help="vocabulary YAML logged with the model (default: the project's)",
    )
    parser.add_argument(
        "--cohort",
        default=None,
        help="cohort.parquet (ingest): with train.cohort_horizon_days, the one-row-per-patient input",
    )


def run(args: argparse.Namespace) -> int:
    from core.params import load_section, read_params
    from core.vocabulary import load_vocabulary
    from models.config import TrainConfig
    from models.lineage import build_lineage
    from models.workflow import RunContext, train_and_log
    from pipelines._modelio import feature_schema, read_features, read_json, read_optional_parquet

    config = load_section(TrainConfig, "train", args.params)
    if args.backend:
        config = config.model_copy(update={"backend": args.backend})
    cohort = config.cohort_horizon_days is not None
    dictionary = read_json(args.dictionary, "feature dictionary")
    schema = None
    if cohort:
        frame, dictionary = _cohort_frame(args, config, dictionary)
    else:
        columns = key_columns(config) if near_data(config) else None
        frame = read_features(args.features, columns=columns)
        if columns is not None:
            schema = feature_schema(args.features)
        check_labels(frame, args.features)
    consent = None
    patients = read_optional_parquet(args.patients)
    if patients is not None and "consent_model_training" not in patients.columns:
        # no consent records at all (e.g. a de-identified dataset ingested with
        # ingest.missing_consent: include): ingest's policy was the gate
        log.warning(
            "%s has no consent_model_training column: ingest's consent policy applied",
            args.patients,
        )
        patients = None
    if patients is not None:
        from governance.consent import filter_by_consent

        frame, result = filter_by_consent(frame, "model_training", patients)
        consent = result.as_dict()
        if frame.empty:
            raise UserError(
                f"{args.patients}: no feature row left after the consent filter (model_training): "
                f"{result.patients_excluded} patients without consent_model_training=true"
            )
    raw = read_params(args.params)
    used = {k: raw.get(k) for k in ("features", "train") if k in raw}
    record, tags = build_lineage(used, dictionary, args.features, consent, args.data_dvc)
    vocab = load_vocabulary(args.vocabulary)
    context = RunContext.from_env(os.environ, tags)
    try:
        info = train_and_log(
            frame,
            config,
            args.out,
            dictionary,
            tags,
            lineage_record=record,
            vocabulary=vocab.model_dump(mode="json"),
            context=context,
            features_path=str(args.features),
            metrics_path=args.metrics,
            schema=schema,
        )
    except ValueError as exc:
        raise UserError(f"{args.features}: {exc}") from None
    if cohort:  # evaluate and register read the labelled cohort rows from the model folder
        from pathlib import Path

        from models.cohort import COHORT_FEATURES

        frame.to_parquet(Path(args.out) / COHORT_FEATURES, index=False)
    print(
        f"trained run {info['run_id']} ({info['run_name']}): {len(info['feature_names'])} features, "
        f"{info['best_iteration']} trees, val AUPRC {info['val'].get('val_auprc') or float('nan'):.3f}, "
        f"alert threshold {info['threshold']:.4f}"
    )
    return 0


def near_data(config) -> bool:  # type: ignore[no-untyped-def]
    """``train.backend: dask`` on the features output: this process reads the row keys only
    and the workers everything else (``models.dask_store``); tuning needs the whole matrix."""
    return (
        config.backend == "dask"
        and config.cohort_horizon_days is None
        and not config.tuning.enabled
    )


def key_columns(config) -> list[str]:  # type: ignore[no-untyped-def]
    """What the client reads in ``near_data`` mode: the row keys and label, the columns of the
    predictions file (NEWS2, age, sex) and the categorical features (their levels)."""
    from models.train import ID_COLUMNS

    return [*ID_COLUMNS, "news2_total", "age", "sex_f", *config.categorical_features]


def check_labels(frame, path: str) -> None:  # type: ignore[no-untyped-def]
    """Stop (exit 2) on a feature matrix that cannot train a model, saying why."""
    if frame.empty:
        raise UserError(
            f"{path}: 0 feature rows (the features stage found no prediction times: see its report)"
        )
    n_pos = int((frame["label"] == 1).sum())
    if n_pos == 0 or n_pos == len(frame):
        what = "no positive label" if n_pos == 0 else "no negative label"
        raise UserError(
            f"{path}: {what} in {len(frame):,} rows: no outcomes matched "
            "features.labels.event_types within the horizon (check the outcomes table, the PSV "
            "label rule ingest.psv.label, or features.labels)"
        )


def _cohort_frame(args: argparse.Namespace, config, dictionary):  # type: ignore[no-untyped-def]
    """The one-row-per-patient path: ingest's cohort table -> labelled frame at the horizon."""
    import pandas as pd

    from core import storage
    from models.cohort import cohort_matrix, label_at_horizon

    # --cohort: ingest's cohort table (dvc.yaml); without it --features holds a prepared cohort
    path = args.cohort or args.features
    try:
        cohort = storage.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path}: not a readable cohort table ({exc}); run the ingest stage"
        ) from None
    if cohort.empty:
        raise UserError(f"{path}: 0 cohort rows (see reports/ingest.json: consent or quarantine)")
    try:
        mat = cohort_matrix(cohort)
        labelled = label_at_horizon(mat.frame, float(config.cohort_horizon_days or 0))
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    unused = [
        c for c in mat.text_columns if c not in config.categorical_features and c in labelled.frame
    ]
    if unused:
        log.warning("cohort text columns not in train.categorical_features (not used): %s", unused)
    frame = labelled.frame.drop(columns=[c for c in ("event_type",) if c in labelled.frame])
    frame = frame.assign(event_time=frame["patient_id"].map(labelled.event_times))
    check_labels(frame, path)
    dictionary = {
        **(dictionary or {}),
        "label": {
            "horizon_days": config.cohort_horizon_days,
            "event_types": sorted(
                set(cohort.get("event_type", pd.Series(dtype=str)).dropna()) - {""}
            )
            or "all",
            "positive": labelled.n_positive,
            "negative": labelled.n_negative,
            "excluded_censored_before_horizon": labelled.n_excluded_censored,
            "news2_partial_rows": mat.news2_partial_rows,
        },
    }
    return frame, dictionary
