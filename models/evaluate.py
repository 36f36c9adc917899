"""Evaluate the model against NEWS2 on the same held-out test rows, with patient-bootstrap CIs.

Input is the per-row predictions table written by the train stage (``split``, ``label``,
``prob``, ``news2_total``, ``age``, ``sex_f``, ``patient_id`` pseudonym, ``time``).

NEWS2 as a probability: ranking metrics (AUROC, AUPRC) use the raw score; for Brier and
calibration the score is mapped to a probability with a logistic regression fitted on the
*training* rows (documented in the model card). Test rows without a NEWS2 score are excluded
from the comparison so both scores are judged on exactly the same rows.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from models.config import EvaluateConfig
from models.metrics import (
    Exposure,
    PatientBootstrap,
    RankedScores,
    alert_metrics,
    bootstrap_ci,
    brier,
    cadence_hours,
    discrimination_calibration,
    lead_times_hours,
    threshold_for_budget,
    weighted_alerts,
    weighted_brier,
    with_ci,
)

log = logging.getLogger(__name__)

BOOT_KEYS = ("auroc", "auprc", "brier", "sensitivity", "ppv")


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    plots: dict[str, pd.DataFrame] = field(default_factory=dict)


class News2Mapping:
    """Logistic map NEWS2 total -> probability, fitted on training rows."""

    def __init__(self) -> None:
        self.coef = 0.0
        self.intercept = 0.0

    def fit(self, score: np.ndarray, y: np.ndarray) -> News2Mapping:
        from sklearn.linear_model import LogisticRegression

        ok = ~np.isnan(score)
        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(score[ok].reshape(-1, 1), y[ok])
        self.coef = float(lr.coef_[0, 0])
        self.intercept = float(lr.intercept_[0])
        return self

    def __call__(self, score: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.intercept + self.coef * np.asarray(score, float))))


def _lead_summary(lead: np.ndarray, prefix: str) -> dict[str, float | None]:
    if len(lead) == 0:
        return {f"{prefix}lead_time_hours_median": None, f"{prefix}lead_time_n": 0.0}
    q1, med, q3 = np.quantile(lead, [0.25, 0.5, 0.75])
    return {
        f"{prefix}lead_time_hours_median": float(med),
        f"{prefix}lead_time_hours_q1": float(q1),
        f"{prefix}lead_time_hours_q3": float(q3),
        f"{prefix}lead_time_n": float(len(lead)),
    }


def _rule(
    test: pd.DataFrame,
    alert: np.ndarray,
    exposure: Exposure,
    threshold: float,
    event_times: Mapping[str, pd.Timestamp] | None,
) -> dict[str, Any]:
    y = test["label"].to_numpy()
    out: dict[str, Any] = {"threshold": threshold}
    out.update(alert_metrics(y, alert, exposure, test["patient_id"].to_numpy()))
    out.update(_lead_summary(lead_times_hours(test, alert, event_times), ""))
    return out


def _age_band(age: pd.Series, edges: list[float]) -> pd.Series:
    labels = [f"age_{int(a)}_{int(b)}" for a, b in itertools.pairwise(edges)]
    return pd.cut(age, bins=edges, labels=labels, right=False).astype("object")


def _subgroup_metrics(
    g: pd.DataFrame, model_thr: float, config: EvaluateConfig, cadence: float | None
) -> dict[str, Any]:
    y = g["label"].to_numpy()
    exposure = Exposure.of(g, cadence)
    n_events = int(g.groupby("patient_id")["label"].max().sum())
    enough = n_events >= config.subgroup_min_events
    res: dict[str, Any] = {
        "n_rows": float(len(g)),
        "n_patients": float(g["patient_id"].nunique()),
        "n_event_patients": float(n_events),
        "prevalence": float(y.mean()) if len(y) else None,
    }
    for name, p, rank in (
        ("model", g["prob"].to_numpy(), None),
        ("news2", g["news2_prob"].to_numpy(), g["news2_total"].to_numpy()),
    ):
        m = discrimination_calibration(y, p, rank) if enough else {"brier": brier(y, p)}
        if enough and config.subgroup_bootstrap_reps:
            ranked = RankedScores(y, p if rank is None else rank)

            def stat(w: np.ndarray, r: RankedScores = ranked) -> dict[str, float | None]:
                return {"auroc": r.auroc(w), "auprc": r.auprc(w)}

            samples = PatientBootstrap(
                g["patient_id"].to_numpy(), config.subgroup_bootstrap_reps, config.seed
            ).weights()
            m = with_ci(m, bootstrap_ci(stat, samples))
        if name == "model":
            alert = g["prob"].to_numpy() >= model_thr
        else:  # the first NEWS2 trigger threshold (5 by default)
            alert = g["news2_total"].to_numpy() >= config.news2_thresholds[0]
        m.update(alert_metrics(y, alert, exposure))
        res[name] = m
    return res


def evaluate_predictions(
    pred: pd.DataFrame,
    config: EvaluateConfig,
    model_threshold: float,
    alert_budget: float,
    event_times: Mapping[str, pd.Timestamp] | None = None,
) -> Evaluation:
    """All test-set metrics for model and NEWS2 (+ bootstrap CIs, subgroups, plot data)."""
    for c in ("split", "label", "prob", "news2_total", "patient_id", "time"):
        if c not in pred.columns:
            raise ValueError(f"predictions table is missing column {c!r}")
    pred = pred.copy()
    if event_times is None and "event_time" in pred.columns:
        ev = pred.dropna(subset=["event_time"]).groupby("patient_id")["event_time"].min()
        event_times = ev.to_dict() if len(ev) else None
    cadence = cadence_hours(pred)
    train = pred[pred["split"] == "train"]
    mapping = News2Mapping().fit(train["news2_total"].to_numpy(float), train["label"].to_numpy())
    pred["news2_prob"] = mapping(pred["news2_total"].to_numpy(float))

    # NEWS2 is not fitted, so its equal-budget threshold may use all non-test rows (more
    # patients, less noise); the model's threshold comes from validation patients only
    val = pred[(pred["split"] != "test") & pred["news2_total"].notna()]
    test_all = pred[pred["split"] == "test"]
    test = test_all[test_all["news2_total"].notna()].reset_index(drop=True)
    if test.empty or test["label"].nunique() < 2:
        raise ValueError("test set needs both classes (and NEWS2 scores) to be evaluated")
    y = test["label"].to_numpy()
    p = test["prob"].to_numpy()
    n2 = test["news2_total"].to_numpy(float)
    n2p = test["news2_prob"].to_numpy()
    exposure = Exposure.of(test, cadence)
    n2_budget_thr = threshold_for_budget(
        val["news2_total"].to_numpy(float), Exposure.of(val, cadence), alert_budget
    )

    metrics: dict[str, Any] = {
        "n_rows": float(len(test)),
        "n_rows_without_news2": float(len(test_all) - len(test)),
        "n_patients": float(test["patient_id"].nunique()),
        "n_event_patients": float(test.groupby("patient_id")["label"].max().sum()),
        "prevalence": float(y.mean()),
        "exposure": exposure.amount,
        "exposure_unit": exposure.unit,
        "cadence_hours": cadence,
        "alert_budget_per_100": alert_budget,
        "news2_mapping": {"intercept": mapping.intercept, "coef": mapping.coef},
    }

    model_alert = p >= model_threshold
    n2_budget_alert = n2 >= n2_budget_thr
    rules: dict[str, tuple[str, np.ndarray, float]] = {
        "model_at_budget": ("model", model_alert, model_threshold),
        "news2_at_budget": ("news2", n2_budget_alert, n2_budget_thr),
    }
    for t in config.news2_thresholds:
        rules[f"news2_ge_{t:g}"] = ("news2", n2 >= t, float(t))

    # -- bootstrap over patients: each replicate as row weights over rows sorted once ------
    samples = PatientBootstrap(test["patient_id"].to_numpy(), config.bootstrap_reps, config.seed)
    ranked_model, ranked_news2 = RankedScores(y, p), RankedScores(y, n2)
    yf = y.astype(np.float64)

    def stat(w: np.ndarray) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            "model.auroc": ranked_model.auroc(w),
            "model.auprc": ranked_model.auprc(w),
            "model.brier": weighted_brier(yf, p, w),
            "news2.auroc": ranked_news2.auroc(w),
            "news2.auprc": ranked_news2.auprc(w),
            "news2.brier": weighted_brier(yf, n2p, w),
        }
        for k in ("auroc", "auprc", "brier"):
            a, b = out[f"model.{k}"], out[f"news2.{k}"]
            out[f"delta.{k}"] = None if a is None or b is None else a - b
        for name, (_, alert, _) in rules.items():
            am = weighted_alerts(yf, alert, w)
            out[f"{name}.sensitivity"] = am["sensitivity"]
            out[f"{name}.ppv"] = am["ppv"]
        return out

    ci = bootstrap_ci(stat, samples.weights()) if config.bootstrap_reps else {}

    def ci_for(prefix: str) -> dict[str, tuple[float | None, float | None]]:
        return {k.split(".", 1)[1]: v for k, v in ci.items() if k.startswith(prefix + ".")}

    model_m = discrimination_calibration(y, p)
    news2_m = discrimination_calibration(y, n2p, rank=n2)
    metrics["model"] = with_ci(model_m, ci_for("model"))
    metrics["news2"] = with_ci(news2_m, ci_for("news2"))
    delta = {
        k: (model_m[k] - news2_m[k]) if model_m[k] is not None and news2_m[k] is not None else None
        for k in ("auroc", "auprc", "brier")
    }
    metrics["delta"] = with_ci(delta, ci_for("delta"))
    metrics["alerts"] = {
        name: with_ci(_rule(test, alert, exposure, thr, event_times), ci_for(name))
        for name, (_, alert, thr) in rules.items()
    }

    # -- subgroups ---------------------------------------------------------------------------
    groups: dict[str, pd.Series] = {}
    if "age" in test.columns:
        groups["age"] = _age_band(test["age"], config.age_bands)
    if "sex_f" in test.columns:
        groups["sex"] = test["sex_f"].map({1.0: "sex_F", 0.0: "sex_M"})
    if "setting" in test.columns:
        groups["setting"] = "setting_" + test["setting"].astype(str)
    sub: dict[str, Any] = {}
    for _, key in groups.items():
        for level, g in test.groupby(key, dropna=True):
            sub[str(level)] = _subgroup_metrics(g, model_threshold, config, cadence)
    metrics["subgroups"] = sub

    plots = plot_data(test, rules, exposure, config)
    return Evaluation(metrics=metrics, plots=plots)


def plot_data(
    test: pd.DataFrame,
    rules: Mapping[str, tuple[str, np.ndarray, float]],
    exposure: Exposure,
    config: EvaluateConfig,
) -> dict[str, pd.DataFrame]:
    """Small tables for DVC plots: ROC, PR, calibration, alert rate vs sensitivity."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = test["label"].to_numpy()
    scores = {
        "model": (test["prob"].to_numpy(), test["prob"].to_numpy()),
        "news2": (test["news2_total"].to_numpy(float), test["news2_prob"].to_numpy()),
    }
    grid = np.linspace(0, 1, 101)
    out: dict[str, pd.DataFrame] = {}
    for name, (rank, prob) in scores.items():
        fpr, tpr, _ = roc_curve(y, rank)
        out[f"roc_{name}"] = pd.DataFrame(
            {"fpr": grid, "tpr": np.interp(grid, fpr, tpr), "score": name}
        )
        prec, rec, _ = precision_recall_curve(y, rank)
        order = np.argsort(rec)
        out[f"pr_{name}"] = pd.DataFrame(
            {
                "recall": grid,
                "precision": np.interp(grid, rec[order], prec[order]),
                "score": name,
            }
        )
        frac, mean_pred = calibration_curve(
            y, prob, n_bins=config.calibration_bins, strategy="quantile"
        )
        out[f"calibration_{name}"] = pd.DataFrame(
            {"mean_predicted": mean_pred, "fraction_positive": frac, "score": name}
        )
        if name == "news2":
            thresholds = np.arange(0, 21, dtype=float)
        else:
            thresholds = np.unique(np.quantile(rank, np.linspace(0, 1, 101)))
        rows = []
        for t in thresholds:
            am = alert_metrics(y, rank >= t, exposure)
            rows.append(
                {
                    "threshold": float(t),
                    "alert_rate": am[f"alerts_per_100_{exposure.unit}"],
                    "sensitivity": am["sensitivity"],
                    "score": name,
                }
            )
        out[f"alerts_{name}"] = pd.DataFrame(rows)
    return out


def importance_table(model: Any, X: pd.DataFrame) -> pd.DataFrame:
    """Gain importance (normalised) and mean |SHAP| (LightGBM ``pred_contrib``) per feature."""
    booster = model.booster
    gain = np.asarray(booster.feature_importance(importance_type="gain"), dtype=float)
    contrib = model.contributions(X)[:, :-1]
    shap = np.abs(contrib).mean(axis=0)
    tbl = pd.DataFrame(
        {
            "feature": model.feature_names,
            "gain": gain / gain.sum() if gain.sum() > 0 else gain,
            "mean_abs_shap": shap,
        }
    )
    return tbl.sort_values("mean_abs_shap", ascending=False).reset_index(drop=True)
