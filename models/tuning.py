"""Optuna hyperparameter search; each trial is a nested MLflow run under the active run.

The objective is validation AUPRC (patient-disjoint validation set, early stopping), never the
test set, so the test metrics of the final model stay honest.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from models.config import TrainConfig
from models.metrics import auprc
from models.splits import TRAIN, VAL, assign_splits

log = logging.getLogger(__name__)


def suggest(trial: Any) -> dict[str, Any]:
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 4, 63, log=True),
        "min_child_samples": trial.suggest_int("min_child_samples", 10, 200, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
    }


def tune(
    frame: pd.DataFrame,
    config: TrainConfig,
    n_trials: int | None = None,
    timeout: float | None = None,
    log_trials: bool = True,
) -> dict[str, Any]:
    """Return ``{"best_params", "best_value", "n_trials"}``; trials logged as nested runs."""
    import optuna

    from models import tracking
    from models.train import (
        TrainingData,
        _booster_params,
        fit_booster,
        select_features,
        validate_frame,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    validate_frame(frame)
    frame = frame.reset_index(drop=True)
    names, categories = select_features(frame, config)
    y = frame["label"].astype(int).to_numpy()
    split = assign_splits(frame, config.split, config.seed).to_numpy()
    tr, va = np.flatnonzero(split == TRAIN), np.flatnonzero(split == VAL)
    data = TrainingData.build(
        frame, names, categories, split, _booster_params(config, y[tr], names, None)
    )
    train_set, valid_set = data.subset(tr), data.subset(va)

    def objective(trial: Any) -> float:
        overrides = suggest(trial)
        params = _booster_params(config, y[tr], names, overrides)
        b = fit_booster(
            train_set, valid_set, params, config.n_estimators, max(config.early_stopping_rounds, 10)
        )
        value = auprc(y[va], data.raw_score(b, va)) or 0.0
        trial.set_user_attr("best_iteration", int(b.best_iteration or b.current_iteration()))
        if log_trials:
            with tracking.start_run(run_name=f"trial-{trial.number}", nested=True):
                tracking.log_params({**overrides, "trial": trial.number})
                tracking.log_metrics(
                    {"val_auprc": value, "best_iteration": trial.user_attrs["best_iteration"]}
                )
        return float(value)

    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed)
    )
    study.optimize(
        objective,
        n_trials=n_trials or config.tuning.n_trials,
        timeout=timeout if timeout is not None else config.tuning.timeout_seconds,
    )
    best = dict(study.best_params)
    log.info("tuning: best val AUPRC %.4f with %s", study.best_value, best)
    return {
        "best_params": best,
        "best_value": float(study.best_value),
        "n_trials": len(study.trials),
        "values": [
            float(t.value) for t in study.trials if t.value is not None and np.isfinite(t.value)
        ],
    }
