"""Model card (markdown): intended use, data, performance with 95% CIs, subgroups, limits.

Generated from the evaluation metrics so the card can never disagree with the numbers logged
next to it in MLflow. Contains no patient identifiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, int | float):
        return f"{x:.{nd}f}"
    return str(x)


def _ci(m: Mapping[str, Any], k: str, nd: int = 3) -> str:
    lo, hi = m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high")
    if lo is None or hi is None:
        return _f(m.get(k), nd)
    return f"{_f(m.get(k), nd)} ({_f(lo, nd)}–{_f(hi, nd)})"


def _events(label: Mapping[str, Any]) -> str:
    ev = label.get("event_types")
    if not ev or ev == "all":
        return "any recorded outcome event"
    names = [str(e).replace("_", " ") for e in (ev if isinstance(ev, list) else [ev])]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _horizon(label: Mapping[str, Any]) -> str:
    h = label.get("horizon_hours")
    if isinstance(h, Mapping) and h:
        return "; ".join(f"{s}: {float(v):g} h" for s, v in h.items())
    if h:
        return f"{float(h):g} h"
    if label.get("horizon_days"):
        return f"{float(label['horizon_days']):g} days after the index time"
    return "the label horizon"


def _population(metrics: Mapping[str, Any], label: Mapping[str, Any]) -> str:
    settings = sorted(
        k.removeprefix("setting_") for k in metrics.get("subgroups", {}) if k.startswith("setting_")
    )
    if settings:
        return (
            "patients monitored in the "
            + ", ".join(settings)
            + " setting"
            + ("s" if len(settings) > 1 else "")
        )
    if label.get("horizon_days"):
        return "patients of a one-row-per-patient cohort (one prediction at the index time)"
    return "the monitored patients of the training cohort"


def intended_use(metrics: Mapping[str, Any], label: Mapping[str, Any]) -> str:
    """The intended-use paragraph from the configuration: events, horizons, population."""
    return (
        f"Decision support: estimates the probability of {_events(label)} within the label "
        f"horizon ({_horizon(label)}) for {_population(metrics, label)}, from their recent "
        "observations and covariates. It supplements, and does not replace, NEWS2 and clinical "
        "judgement. Not validated for children, pregnancy or populations unlike the training "
        "cohort; not for use as an autonomous alarm."
    )


def render_model_card(
    metrics: Mapping[str, Any],
    run: Mapping[str, Any],
    feature_dictionary: Mapping[str, Any] | None = None,
    importance: list[Mapping[str, Any]] | None = None,
) -> str:
    model, news2, delta = metrics["model"], metrics["news2"], metrics["delta"]
    unit = str(metrics.get("exposure_unit", "patient_days")).replace("_", "-")
    # the label the model was trained with (run metadata), else the feature dictionary's
    label = (run.get("metadata") or {}).get("label") or (feature_dictionary or {}).get("label", {})
    meta = run.get("metadata", {})
    lines = [
        f"# Model card: {run.get('model_name', 'vitalrisk-deterioration')}",
        "",
        f"MLflow run `{run.get('run_id', '?')}`; git commit `{run.get('lineage', {}).get('git_commit', '?')}`; "
        f"data.dvc md5 `{run.get('lineage', {}).get('data_dvc_md5', '') or 'n/a'}`; "
        f"params hash `{run.get('lineage', {}).get('params_hash', '?')}`.",
        "",
        "## Intended use",
        intended_use(metrics, label),
        "",
        "## Data",
        f"- Training/validation/test split by patient ({run.get('split_method', 'patient')}), "
        f"rows {meta.get('n_train_rows', '?')}/{meta.get('n_val_rows', '?')}/{meta.get('n_test_rows', '?')}.",
        f"- Test set: {int(metrics['n_rows'])} prediction times, {int(metrics['n_patients'])} patients, "
        f"{int(metrics['n_event_patients'])} with an event; row prevalence {metrics['prevalence']:.3%}.",
        f"- Features: {len(run.get('feature_names', []))} "
        f"({', '.join(run.get('feature_names', [])[:12])}{', …' if len(run.get('feature_names', [])) > 12 else ''}).",
        "- Model: LightGBM, early stopping on validation patients, "
        f"{meta.get('calibration', 'sigmoid')} calibration fitted on validation patients.",
        "",
        "## Performance on the test set (95% patient-bootstrap intervals)",
        "| metric | model | NEWS2 | model − NEWS2 |",
        "|---|---|---|---|",
        f"| AUROC | {_ci(model, 'auroc')} | {_ci(news2, 'auroc')} | {_ci(delta, 'auroc')} |",
        f"| AUPRC (prevalence {metrics['prevalence']:.3f}) | {_ci(model, 'auprc')} | {_ci(news2, 'auprc')} | {_ci(delta, 'auprc')} |",
        f"| Brier | {_ci(model, 'brier', 4)} | {_ci(news2, 'brier', 4)} | {_ci(delta, 'brier', 4)} |",
        f"| calibration slope | {_f(model.get('calibration_slope'))} | {_f(news2.get('calibration_slope'))} | |",
        f"| calibration intercept | {_f(model.get('calibration_intercept'))} | {_f(news2.get('calibration_intercept'))} | |",
        "",
        "NEWS2 probabilities for Brier/calibration come from a logistic fit of NEWS2 on the "
        "training rows; AUROC/AUPRC use the raw NEWS2 score.",
        "",
        f"### Alerting (alerts per 100 {unit})",
        "| rule | threshold | alerts/100 | sensitivity | PPV | event sensitivity | median lead time (h) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in metrics.get("alerts", {}).items():
        rate = next((v for k, v in a.items() if k.startswith("alerts_per_100_")), None)
        lines.append(
            f"| {name} | {_f(a.get('threshold'), 3)} | {_f(rate, 1)} | {_ci(a, 'sensitivity')} | "
            f"{_ci(a, 'ppv')} | {_f(a.get('event_sensitivity'))} | {_f(a.get('lead_time_hours_median'), 1)} |"
        )
    lines += [
        "",
        "## Subgroups (AUROC with 95% patient-bootstrap CI within the subgroup; NEWS2 alerts at "
        "the first NEWS2 threshold)",
        "| subgroup | patients | events | prevalence | model AUROC | NEWS2 AUROC | model Brier | model sens. | NEWS2 sens. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g, s in metrics.get("subgroups", {}).items():
        lines.append(
            f"| {g} | {int(s['n_patients'])} | {int(s['n_event_patients'])} | {_f(s.get('prevalence'))} | "
            f"{_ci(s['model'], 'auroc')} | {_ci(s['news2'], 'auroc')} | {_f(s['model'].get('brier'), 4)} | "
            f"{_f(s['model'].get('sensitivity'))} | {_f(s['news2'].get('sensitivity'))} |"
        )
    if importance:
        lines += ["", "## Most influential features (mean |SHAP|, log-odds)"]
        lines += [f"- {r['feature']}: {float(r['mean_abs_shap']):.3f}" for r in importance[:10]]
    lines += [
        "",
        "## Limitations",
        "- Trained and tested on one cohort; performance after a change of population, devices "
        "or care pathway must be re-checked (see monitoring drift reports).",
        "- Row-level labels overlap in time: intervals resample patients, but alert counts "
        "assume every scoring above threshold is an alert (no suppression window).",
        "- Lead time is measured from the first alert within the horizon before the event; when "
        "outcome times are unavailable it is a lower bound.",
        "- Subgroups with few events have unstable estimates (AUROC omitted below "
        "the configured minimum number of event patients; note the interval widths).",
        "- Calibration is fitted on the validation patients of this cohort; recalibrate before "
        "use at a site with a different event rate.",
        "",
    ]
    return "\n".join(lines)
