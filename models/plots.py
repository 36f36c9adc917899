"""Write evaluation curves as DVC plot data (CSV) and as PNG figures for MLflow.

The CSVs are small (≈100 points per curve) so ``dvc plots diff`` between experiments stays
readable; ``dvc.yaml`` declares them under ``plots:`` with x/y fields and templates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

#: figure -> (data key prefix, x, y, x label, y label)
FIGURES = {
    "roc": ("roc", "fpr", "tpr", "false positive rate", "sensitivity (true positive rate)"),
    "pr": ("pr", "recall", "precision", "recall (sensitivity)", "precision (PPV)"),
    "calibration": (
        "calibration",
        "mean_predicted",
        "fraction_positive",
        "mean predicted probability",
        "observed event fraction",
    ),
    "alerts": (
        "alerts",
        "alert_rate",
        "sensitivity",
        "alerts per 100 {unit}",
        "sensitivity",
    ),
}


def write_plot_data(plots: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in plots.items():
        p = out / f"{name}.csv"
        df.to_csv(p, index=False, float_format="%.6g")
        paths.append(p)
    return paths


def write_figures(
    plots: dict[str, pd.DataFrame],
    importance: pd.DataFrame | None,
    out_dir: str | Path,
    unit: str = "patient-days",
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fig_name, (prefix, x, y, xl, yl) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
        for score in ("model", "news2"):
            df = plots.get(f"{prefix}_{score}")
            if df is None or df.empty:
                continue
            style = "o-" if fig_name in ("calibration", "alerts") else "-"
            ax.plot(df[x], df[y], style, label=score, markersize=3)
        if fig_name in ("roc", "calibration"):
            ax.plot([0, 1], [0, 1], ":", color="grey", label="reference")
        ax.set_xlabel(xl.format(unit=unit))
        if fig_name == "alerts":
            ax.set_xscale("symlog", linthresh=10)  # the clinically usable range is small
        ax.set_ylabel(yl)
        ax.set_title(fig_name)
        ax.legend()
        fig.tight_layout()
        p = out / f"{fig_name}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    if importance is not None and not importance.empty:
        top = importance.head(20).iloc[::-1]
        fig, axes = plt.subplots(1, 2, figsize=(9, max(3, 0.3 * len(top) + 1)), dpi=100)
        axes[0].barh(top["feature"], top["gain"])
        axes[0].set_title("gain (share)")
        axes[1].barh(top["feature"], top["mean_abs_shap"])
        axes[1].set_title("mean |SHAP| (log-odds)")
        axes[1].set_yticklabels([])
        fig.tight_layout()
        p = out / "importance.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths
