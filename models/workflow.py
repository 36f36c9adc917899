"""The train -> evaluate -> register steps as importable functions (the stages are thin CLIs).

Files handed between the DVC stages (paths come from ``dvc.yaml``):
* train writes ``<model_dir>/run.json`` (MLflow run id, model URI, features, threshold,
  lineage; no patient identifiers) and ``<model_dir>/predictions.parquet`` (one row per
  prediction time: pseudonym, time, split, label, calibrated ``prob``, ``news2_total``, age, sex).
* evaluate writes ``metrics.json``, plot CSVs, PNG figures and ``model_card.md`` and logs them
  to the same MLflow run.
* register writes ``register.json`` (version, alias, decision and reason).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from models import tracking
from models.config import EvaluateConfig, RegisterConfig, TrainConfig

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
VOCABULARY_ARTIFACT = "vocabulary.json"
PREDICTIONS_FILE = "predictions.parquet"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def train_and_log(
    frame: pd.DataFrame,
    config: TrainConfig,
    out_dir: str | Path,
    feature_dictionary: Mapping[str, Any] | None = None,
    lineage_info: Mapping[str, str] | None = None,
    client: Any = None,
    lineage_record: Mapping[str, Any] | None = None,
    vocabulary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (optionally tune first), log everything to a new MLflow run, write run.json.

    ``vocabulary`` (the project's, as a dict) is logged as ``vocabulary.json`` so the service
    converts units and judges ranges with the vocabulary the model was trained with.
    """
    from models.train import train_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_info = dict((feature_dictionary or {}).get("label", {}) or {})
    with tracking.start_run(experiment=config.experiment, run_name="train") as run:
        tracking.set_tags({"stage": "train", **(lineage_info or {})})
        tracking.log_params(_flatten(config.model_dump(), "train."))
        overrides: dict[str, Any] | None = None
        tuning_result = None
        if config.tuning.enabled:
            from models.tuning import tune

            tuning_result = tune(frame, config)
            overrides = tuning_result["best_params"]
            tracking.log_params({f"tuned.{k}": v for k, v in overrides.items()})
            tracking.log_metrics({"tuning_best_val_auprc": tuning_result["best_value"]})
        result = train_model(
            frame,
            config,
            overrides=overrides,
            client=client,
            metadata={"label": label_info} if label_info else None,
        )
        counts = result.split.value_counts().to_dict()
        tracking.log_params(
            {
                "n_features": len(result.model.feature_names),
                "best_iteration": result.best_iteration,
                "split.patients": json.dumps(
                    frame.assign(split=result.split.to_numpy())
                    .groupby("split")["patient_id"]
                    .nunique()
                    .to_dict()
                ),
                "split.rows": json.dumps({str(k): int(v) for k, v in counts.items()}),
            }
        )
        tracking.log_metrics({**result.cv, **result.val_metrics, "threshold": result.threshold})
        if feature_dictionary:
            tracking.log_dict(dict(feature_dictionary), "feature_dictionary.json")
        if lineage_record:
            tracking.log_dict(dict(lineage_record), "lineage.json")
        if vocabulary:
            tracking.log_dict(dict(vocabulary), VOCABULARY_ARTIFACT)
        # input example: the training medians, so no individual's values leave in the artifact
        prepared = result.model.prepare(frame[result.split.to_numpy() == "train"])
        example = prepared.median().fillna(0.0).to_frame().T.reset_index(drop=True)
        with tempfile.TemporaryDirectory() as tmp:
            model_uri = tracking.log_risk_model(result.model, example, tmp)
        preds = result.predictions(frame)
        preds.to_parquet(out / PREDICTIONS_FILE, index=False)
        info = {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "model_uri": model_uri,
            "feature_names": result.model.feature_names,
            "categorical_features": list(result.model.categories),
            "threshold": result.threshold,
            "alert_budget": config.alert_budget_per_100_patient_days,
            "best_iteration": result.best_iteration,
            "split_method": config.split.method,
            "backend": config.backend,
            "cv": result.cv,
            "val": result.val_metrics,
            "metadata": result.model.metadata,
            "lineage": dict(lineage_info or {}),
            "tuning": tuning_result,
        }
    (out / RUN_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    log.info("train run %s logged; model %s", info["run_id"], model_uri)
    return info


def load_run(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / RUN_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: run info not found (run the train stage first)")
    return json.loads(p.read_text(encoding="utf-8"))


def evaluate_and_log(
    model_dir: str | Path,
    features: pd.DataFrame | None,
    config: EvaluateConfig,
    metrics_path: str | Path,
    plots_dir: str | Path,
    figures_dir: str | Path,
    card_path: str | Path,
    feature_dictionary: Mapping[str, Any] | None = None,
    event_times: Mapping[str, pd.Timestamp] | None = None,
    model_name: str = tracking.DEFAULT_MODEL_NAME,
) -> dict[str, Any]:
    """Evaluate test predictions vs NEWS2, write reports and log them to the train run."""
    import mlflow

    from models.card import render_model_card
    from models.evaluate import evaluate_predictions, importance_table
    from models.plots import write_figures, write_plot_data

    run = load_run(model_dir)
    preds = pd.read_parquet(Path(model_dir) / PREDICTIONS_FILE)
    ev = evaluate_predictions(
        preds, config, float(run["threshold"]), float(run["alert_budget"]), event_times
    )
    metrics = ev.metrics
    metrics["cv"] = run.get("cv", {})
    importance = None
    tracking.configure()
    model = tracking.load_model(run["model_uri"])
    if features is not None:
        test_keys = preds.loc[preds["split"] == "test", ["patient_id", "time"]]
        test_x = features.merge(test_keys, on=["patient_id", "time"], how="inner")
        if len(test_x) > 5000:
            test_x = test_x.sample(5000, random_state=config.seed)
        importance = importance_table(model, test_x)
    metrics_path, plots_dir = Path(metrics_path), Path(plots_dir)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
    plot_tables = dict(ev.plots)
    if importance is not None:
        plot_tables["importance"] = importance
    write_plot_data(plot_tables, plots_dir)
    unit = str(metrics.get("exposure_unit", "patient_days")).replace("_", "-")
    figures = write_figures(ev.plots, importance, figures_dir, unit)
    card = render_model_card(
        metrics,
        {**run, "model_name": model_name},
        feature_dictionary,
        None if importance is None else importance.to_dict("records"),
    )
    Path(card_path).parent.mkdir(parents=True, exist_ok=True)
    Path(card_path).write_text(card, encoding="utf-8")
    flat = {
        f"test.{k}": v
        for k, v in _flatten({k: metrics[k] for k in ("model", "news2", "delta", "alerts")}).items()
    }
    flat.update({"test.prevalence": metrics["prevalence"], "test.n_rows": metrics["n_rows"]})
    with mlflow.start_run(run_id=run["run_id"]):
        tracking.log_metrics(flat)
        tracking.log_dict(metrics, "evaluation/metrics.json")
        tracking.log_text(card, "model_card.md")
        for f in figures:
            tracking.log_artifact(f, "evaluation/figures")
        for f in sorted(plots_dir.glob("*.csv")):
            tracking.log_artifact(f, "evaluation/plots")
        tracking.set_tags({"evaluated": "true"})
    return metrics


def register_run(
    model_dir: str | Path,
    features: pd.DataFrame,
    metrics: Mapping[str, Any],
    config: RegisterConfig,
    actor: str,
) -> dict[str, Any]:
    """Register the run's model and apply the champion/challenger gate on its test rows."""
    from models.registry import register_and_gate

    run = load_run(model_dir)
    preds = pd.read_parquet(Path(model_dir) / PREDICTIONS_FILE)
    keys = preds.loc[preds["split"] == "test", ["patient_id", "time"]]
    test = features.merge(keys, on=["patient_id", "time"], how="inner")
    if test.empty:
        raise ValueError("no test rows of the run were found in the feature frame")
    model = tracking.load_model(run["model_uri"])
    from models.lineage import params_hash

    fingerprint = params_hash({"keys": sorted(map(str, keys["patient_id"].unique()))})
    tags = {
        "run_id": run["run_id"],
        "test_set": fingerprint,
        "threshold": f"{run['threshold']:.6f}",
        **{f"lineage.{k}": v for k, v in run.get("lineage", {}).items()},
    }
    news2_auprc = metrics.get("news2", {}).get("auprc") if metrics else None
    result = register_and_gate(run["model_uri"], test, model, config, actor, tags, news2_auprc)
    result["run_id"] = run["run_id"]
    result["test_set"] = fingerprint
    return result
