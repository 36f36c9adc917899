"""``vitalrisk summary``: the registered model's test metrics with 95% CIs next to NEWS2's.

The last step of ``make demo``: reads the evaluate stage's metrics JSON and the register
stage's result; prints plain text (no MLflow access needed).
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "print the registered model version and its test metrics (95%% CI) next to NEWS2's"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", default="reports/metrics.json", help="evaluate output")
    parser.add_argument("--register", default="reports/register.json", help="register output")


def _fmt(m: dict[str, Any], k: str, nd: int = 3) -> str:
    v = m.get(k)
    if v is None:
        return "–"
    lo, hi = m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high")
    ci = f" ({lo:.{nd}f}–{hi:.{nd}f})" if lo is not None and hi is not None else ""
    return f"{v:.{nd}f}{ci}"


def render(metrics: dict[str, Any], register: dict[str, Any] | None) -> str:
    lines = []
    if register:
        alias = register.get("alias")
        where = f"@{alias}" if alias else f"no alias (DVC experiment {register.get('experiment')})"
        verdict = "passes" if register.get("gate_passed") else "fails"
        lines.append(
            f"model {register.get('model_name')} version {register.get('version')} -> {where}; "
            f"champion is version {register.get('champion_now') or 'none'}"
        )
        lines.append(f"gate: {verdict} - {register.get('reason')}")
    unit = str(metrics.get("exposure_unit", "patient_days")).replace("_", "-")
    lines.append(
        f"test set: {int(metrics['n_rows'])} prediction times, {int(metrics['n_patients'])} "
        f"patients ({int(metrics['n_event_patients'])} with events), prevalence "
        f"{metrics['prevalence']:.3f}; 95% patient-bootstrap intervals"
    )
    rows = [("metric", "model", "NEWS2", "model - NEWS2")]
    m, n, d = metrics["model"], metrics["news2"], metrics["delta"]
    for k, label, nd in (("auroc", "AUROC", 3), ("auprc", "AUPRC", 3), ("brier", "Brier", 4)):
        rows.append((label, _fmt(m, k, nd), _fmt(n, k, nd), _fmt(d, k, nd)))
    rows.append(
        ("calibration slope", _fmt(m, "calibration_slope"), _fmt(n, "calibration_slope"), "")
    )
    rows.append(
        (
            "calibration intercept",
            _fmt(m, "calibration_intercept"),
            _fmt(n, "calibration_intercept"),
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    lines.append("")
    arows: list[tuple[str, ...]] = [
        ("alert rule", "threshold", f"alerts/100 {unit}", "sensitivity", "PPV", "lead h")
    ]
    for name, a in metrics.get("alerts", {}).items():
        rate = next((v for k, v in a.items() if k.startswith("alerts_per_100_")), None)
        arows.append(
            (
                name,
                f"{a['threshold']:.3f}",
                "–" if rate is None else f"{rate:.1f}",
                _fmt(a, "sensitivity"),
                _fmt(a, "ppv"),
                "–"
                if a.get("lead_time_hours_median") is None
                else f"{a['lead_time_hours_median']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in arows) for i in range(6)]
    for ar in arows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(ar, widths, strict=True)))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines._modelio import read_json

    metrics = read_json(args.metrics, "evaluation metrics (run `dvc repro evaluate`)") or {}
    register = (
        read_json(args.register, "register result") if Path(args.register).is_file() else None
    )
    print(render(metrics, register))
    return 0
