"""The train -> evaluate -> register steps as importable functions (the stages are thin CLIs).

Files handed between the DVC stages (paths come from ``dvc.yaml``):
* train writes ``<model_dir>/run.json`` (MLflow run id, model URI, features, threshold,
  lineage; no patient identifiers), ``<model_dir>/predictions.parquet`` (one row per
  prediction time: pseudonym, time, split, label, calibrated ``prob``, ``news2_total``, age,
  sex) and a small DVC metrics file (validation and CV figures).
* evaluate writes ``metrics.json`` (everything), a headline metrics file for DVC, plot CSVs,
  PNG figures and ``model_card.md``, and logs them to the same MLflow run.
* register writes ``register.json`` (version, alias, decision and reason).

Every MLflow run says where it came from (:class:`RunContext`): the DVC experiment or the
pipeline, the git commit (``mlflow.source.git.commit``) and whether the checkout was dirty.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from models import tracking
from models.config import EvaluateConfig, RegisterConfig, TrainConfig

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
VOCABULARY_ARTIFACT = "vocabulary.json"
PREDICTIONS_FILE = "predictions.parquet"


class StageInputError(ValueError):
    """A stage's input does not fit (the message names the file and what was expected)."""


@dataclass(frozen=True)
class RunContext:
    """Where a training run happens: a DVC experiment (name, baseline commit) or the pipeline."""

    experiment: str | None = None
    baseline_rev: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], lineage_tags: Mapping[str, str] | None = None
    ) -> RunContext:
        """From DVC's variables (``DVC_EXP_NAME``, ``DVC_EXP_BASELINE_REV``) and the lineage."""
        tags = dict(lineage_tags or {})
        dirty = tags.get("git_dirty")
        return cls(
            experiment=env.get("DVC_EXP_NAME") or None,
            baseline_rev=env.get("DVC_EXP_BASELINE_REV") or None,
            git_commit=tags.get("git_commit"),
            git_dirty=None if dirty is None else dirty == "True",
        )

    @property
    def run_name(self) -> str:
        """``<experiment>@<commit>`` or ``repro@<commit>`` (+ ``+dirty``): one glance says which."""
        where = self.experiment or "repro"
        commit = (self.git_commit or "nogit")[:7]
        return f"{where}@{commit}{'+dirty' if self.git_dirty else ''}"

    def tags(self) -> dict[str, str]:
        tags = {"dvc.experiment": self.experiment, "dvc.baseline_rev": self.baseline_rev}
        if self.git_commit:
            tags["mlflow.source.git.commit"] = self.git_commit
        return {k: v for k, v in tags.items() if v}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _describe_run(context: RunContext, frame: pd.DataFrame, source: str | None) -> str:
    where = f"DVC experiment `{context.experiment}`" if context.experiment else "`dvc repro`"
    commit = context.git_commit or "an unknown commit"
    dirty = " with uncommitted changes" if context.git_dirty else ""
    return (
        f"Training run of {where} at {commit}{dirty}: LightGBM with early stopping, "
        f"calibration and the alert threshold, on {len(frame):,} prediction times of "
        f"{frame['patient_id'].nunique():,} patients from {source or 'an in-memory frame'} "
        "(patient-disjoint train/validation/test). Test metrics vs NEWS2 are added by evaluate."
    )


def _log_datasets(frame: pd.DataFrame, split: pd.Series, source: str | None) -> dict[str, str]:
    """The three patient-disjoint splits as MLflow dataset inputs; returns their digests."""
    digests = {}
    for name, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        rows = frame[split.to_numpy() == name]
        digests[name] = tracking.log_dataset(
            rows, name=f"features-{name}", context=context, source=source or "in-memory"
        )
    return digests


def _train_metrics(result: Any) -> dict[str, Any]:
    """The DVC metrics of the train stage: small and flat, so ``dvc exp show`` stays readable."""
    val = {k: v for k, v in result.val_metrics.items() if v is not None}
    cv = {k: v for k, v in result.cv.items() if k.endswith("_mean")}
    return {
        **val,
        **cv,
        "best_iteration": result.best_iteration,
        "threshold": result.threshold,
        "n_features": len(result.model.feature_names),
    }


def train_and_log(
    frame: pd.DataFrame,
    config: TrainConfig,
    out_dir: str | Path,
    feature_dictionary: Mapping[str, Any] | None = None,
    lineage_info: Mapping[str, str] | None = None,
    client: Any = None,
    lineage_record: Mapping[str, Any] | None = None,
    vocabulary: Mapping[str, Any] | None = None,
    *,
    context: RunContext | None = None,
    features_path: str | None = None,
    metrics_path: str | Path | None = None,
    schema: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Train (optionally tune first), log everything to a new MLflow run, write run.json.

    ``vocabulary`` (the project's, as a dict) is logged as ``vocabulary.json`` so the service
    converts units and judges ranges with the vocabulary the model was trained with.
    ``schema`` (with ``train.backend: dask`` and ``features_path``): ``frame`` holds the row
    keys only and the Dask workers read the features (``models.dask_store``).
    """
    from models.train import train_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = context or RunContext.from_env({}, lineage_info)
    label_info = dict((feature_dictionary or {}).get("label", {}) or {})
    tags = {"stage": "train", **(lineage_info or {}), **context.tags()}
    with tracking.start_run(
        experiment=config.experiment,
        run_name=context.run_name,
        tags=tags,
        description=_describe_run(context, frame, features_path),
        system_metrics=True,
    ) as run:
        tracking.log_params(_flatten(config.model_dump(), "train."))
        if schema is not None and config.tuning.enabled:
            raise ValueError("tuning needs the whole feature matrix in this process")
        overrides, tuning_result = _tune(frame, config)
        result = train_model(
            frame,
            config,
            overrides=overrides,
            client=client,
            metadata={"label": label_info} if label_info else None,
            # Dask workers read the training rows from the features file (not a cohort table)
            features_path=features_path if config.cohort_horizon_days is None else None,
            schema=schema,
        )
        digests = _log_datasets(frame, result.split, features_path)
        _log_training(frame, result, feature_dictionary, lineage_record)
        if vocabulary:
            tracking.log_dict(dict(vocabulary), VOCABULARY_ARTIFACT)
        # input example: the training medians, so no individual's values leave in the artifact
        example = result.example
        if example is None:
            prepared = result.model.prepare(frame[result.split.to_numpy() == "train"])
            example = prepared.median().fillna(0.0).to_frame().T.reset_index(drop=True)
        with tempfile.TemporaryDirectory() as tmp:
            model_uri = tracking.log_risk_model(result.model, example, tmp)
        result.predictions(frame).to_parquet(out / PREDICTIONS_FILE, index=False)
        info = {
            "run_id": run.info.run_id,
            "run_name": context.run_name,
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
            "dvc_experiment": context.experiment,
            "datasets": digests,
            "tuning": tuning_result,
        }
    (out / RUN_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    if metrics_path is not None:
        _write_json(metrics_path, _train_metrics(result))
    log.info("train run %s (%s) logged; model %s", info["run_id"], context.run_name, model_uri)
    return info


def _tune(frame: pd.DataFrame, config: TrainConfig) -> tuple[dict[str, Any] | None, Any]:
    if not config.tuning.enabled:
        return None, None
    from models.tuning import tune

    tuning_result = tune(frame, config)
    overrides = tuning_result["best_params"]
    tracking.log_params({f"tuned.{k}": v for k, v in overrides.items()})
    tracking.log_metrics({"tuning_best_val_auprc": tuning_result["best_value"]})
    return overrides, tuning_result


def _log_training(
    frame: pd.DataFrame,
    result: Any,
    feature_dictionary: Mapping[str, Any] | None,
    lineage_record: Mapping[str, Any] | None,
) -> None:
    counts = result.split.value_counts().to_dict()
    patients = frame.assign(split=result.split.to_numpy()).groupby("split")["patient_id"].nunique()
    tracking.log_params(
        {
            "n_features": len(result.model.feature_names),
            "best_iteration": result.best_iteration,
            "split.patients": json.dumps(patients.to_dict()),
            "split.rows": json.dumps({str(k): int(v) for k, v in counts.items()}),
        }
    )
    tracking.log_metrics({**result.cv, **result.val_metrics, "threshold": result.threshold})
    bands = result.model.metadata.get("thresholds") or {}
    tracking.log_params({f"thresholds.{k}": v for k, v in bands.items()})
    if feature_dictionary:
        tracking.log_dict(dict(feature_dictionary), "feature_dictionary.json")
    if lineage_record:
        tracking.log_dict(dict(lineage_record), "lineage.json")


def _write_json(path: str | Path, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def load_run(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / RUN_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: run info not found (run the train stage first)")
    return json.loads(p.read_text(encoding="utf-8"))


def load_run_in_store(model_dir: str | Path) -> dict[str, Any]:
    """``run.json``, checked against the tracking store (``tracking.StoreMismatchError``)."""
    run = load_run(model_dir)
    where = str(Path(model_dir) / RUN_FILE)
    tracking.check_model_in_store(str(run["run_id"]), str(run["model_uri"]), where)
    return run


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The test figures people compare across experiments (``dvc metrics show``/``exp show``)."""
    keys = ("auroc", "auroc_ci_low", "auroc_ci_high", "auprc", "brier", "calibration_slope")
    out: dict[str, Any] = {
        "model": {k: metrics["model"].get(k) for k in keys},
        "news2": {k: metrics["news2"].get(k) for k in ("auroc", "auprc", "brier")},
        "delta": {
            k: metrics["delta"].get(k)
            for k in ("auroc", "auroc_ci_low", "auroc_ci_high", "auprc", "auprc_ci_low")
        },
        "prevalence": metrics.get("prevalence"),
        "n_patients": metrics.get("n_patients"),
        "n_event_patients": metrics.get("n_event_patients"),
    }
    at_budget = (metrics.get("alerts") or {}).get("model_at_budget") or {}
    rate = next((v for k, v in at_budget.items() if k.startswith("alerts_per_100_")), None)
    out["alerts"] = {
        "sensitivity": at_budget.get("sensitivity"),
        "ppv": at_budget.get("ppv"),
        "per_100_exposure": rate,
    }
    return out


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
    headline_path: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate test predictions vs NEWS2, write reports and log them to the train run."""
    from models.card import render_model_card
    from models.evaluate import evaluate_predictions, importance_table
    from models.plots import write_figures, write_plot_data

    run = load_run_in_store(model_dir)
    preds = pd.read_parquet(Path(model_dir) / PREDICTIONS_FILE)
    ev = evaluate_predictions(
        preds, config, float(run["threshold"]), float(run["alert_budget"]), event_times
    )
    metrics = ev.metrics
    metrics["cv"] = run.get("cv", {})
    importance = None
    model = tracking.load_model(run["model_uri"])
    if features is not None:
        test_keys = preds.loc[preds["split"] == "test", ["patient_id", "time"]]
        test_x = features.merge(test_keys, on=["patient_id", "time"], how="inner")
        if len(test_x) > 5000:
            test_x = test_x.sample(5000, random_state=config.seed)
        importance = importance_table(model, test_x)
    plots_dir = Path(plots_dir)
    _write_json(metrics_path, metrics)
    if headline_path is not None:
        _write_json(headline_path, headline_metrics(metrics))
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
    with tracking.resume_run(run["run_id"]):
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
    experiment: str | None = None,
) -> dict[str, Any]:
    """Register the run's model and apply the gate on its test rows.

    ``experiment``: the DVC experiment this runs in; its version gets no alias.
    """
    from models.lineage import params_hash
    from models.registry import baseline_from_metrics, register_and_gate

    run = load_run_in_store(model_dir)
    preds = pd.read_parquet(Path(model_dir) / PREDICTIONS_FILE)
    keys = preds.loc[preds["split"] == "test", ["patient_id", "time"]]
    test = features.merge(keys, on=["patient_id", "time"], how="inner")
    if test.empty:
        raise StageInputError("no test rows of the run were found in the feature frame")
    model = tracking.load_model(run["model_uri"])
    fingerprint = params_hash({"keys": sorted(map(str, keys["patient_id"].unique()))})
    tags = {
        "run_id": run["run_id"],
        "test_set": fingerprint,
        "threshold": f"{run['threshold']:.6f}",
        **{f"lineage.{k}": v for k, v in run.get("lineage", {}).items()},
    }
    result = register_and_gate(
        run["model_uri"],
        test,
        model,
        config,
        actor,
        tags,
        baseline_from_metrics(metrics),
        experiment=experiment,
    )
    result["run_id"] = run["run_id"]
    result["test_set"] = fingerprint
    return result


def gate_metrics_file(result: Mapping[str, Any]) -> dict[str, Any]:
    """The register stage's DVC metrics: did this model pass the gate, which version is it."""
    return {
        "version": int(result["version"]),
        "gate_passed": bool(result["gate_passed"]),
        "champion": None if result.get("champion_now") is None else int(result["champion_now"]),
    }
