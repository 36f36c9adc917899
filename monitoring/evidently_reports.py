"""The one module that talks to Evidently (0.7): reports, snapshots, workspace, dashboard.

Evidently's API changed completely between 0.4, 0.6 and 0.7; keeping every call here means an
upgrade touches this file only. Everything else passes plain frames and numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

#: summary values plotted on the project dashboard (one MeanValue metric each)
DASHBOARD_VALUES = {
    "drift_share": "Share of monitored features drifted",
    "drifted_features": "Drifted features",
    "predicted_risk_mean": "Mean predicted risk (current window)",
    "verdict_level": "Verdict (0 ok, 1 warn, 2 retrain)",
    "auroc": "AUROC on labelled predictions",
}
SUMMARY_TAG = "summary"


def stat_test_scores(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    tests: Mapping[str, tuple[str, float, str]],
) -> dict[str, tuple[float, bool]]:
    """``column -> (drift score, drifted)`` with Evidently's stat tests, no report widgets.

    ``tests`` maps a column to ``(method, threshold, "num" | "cat")``. This is the very test
    ``ValueDrift`` runs (missing and infinite values dropped first); it skips the plots, which
    cost far more than the test at a hundred columns. Columns empty on either side are left out.
    """
    import numpy as np
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    out: dict[str, tuple[float, bool]] = {}
    for col, (method, threshold, kind) in tests.items():
        ref = reference[col].replace([-np.inf, np.inf], np.nan).dropna()
        cur = current[col].replace([-np.inf, np.inf], np.nan).dropna()
        if ref.empty or cur.empty:
            continue
        ctype = ColumnType.Numerical if kind == "num" else ColumnType.Categorical
        test = get_stattest(ref, cur, ctype, method)
        res = test(ref, cur, ctype, threshold)
        out[col] = (float(res.drift_score), bool(res.drifted))
    return out


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    numerical: Sequence[str],
    categorical: Sequence[str],
    tests: Mapping[str, tuple[str, float]],
    ranges: Mapping[str, tuple[float, float]],
    categories: Mapping[str, Sequence[Any]],
    prediction: str | None = None,
    prediction_test: tuple[str, float] | None = None,
    timestamp: datetime | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> Any:
    """Data drift, prediction drift and data quality in one report.

    ``tests`` maps the features shown with a drift widget (distribution plots) to
    ``(method, threshold)``; every feature gets a missing-values metric; ``ranges`` gives the
    plausible range of features that carry a vocabulary code's value; ``categories`` the
    reference categories of categorical features (values outside are "new categories").
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import (
        MeanValue,
        MissingValueCount,
        OutListValueCount,
        OutRangeValueCount,
        QuantileValue,
        ValueDrift,
    )

    features = [*numerical, *categorical]
    num = list(numerical) + ([prediction] if prediction else [])
    definition = DataDefinition(numerical_columns=num, categorical_columns=list(categorical))
    cols = [*features, *([prediction] if prediction else [])]
    cur = Dataset.from_pandas(current[cols], data_definition=definition)
    ref = Dataset.from_pandas(reference[cols], data_definition=definition)
    # One ValueDrift per column rather than DataDriftPreset: the preset recomputes every test
    # three times (per column, for the dataset counter, for its table), which triples the
    # cost at a hundred columns; the per-column widgets show the same scores and histograms,
    # and our drift share (value + missingness) goes to the summary snapshot.
    metrics: list[Any] = [
        ValueDrift(column=c, method=tests[c][0], threshold=tests[c][1])
        for c in features
        if c in tests
    ]
    if prediction and prediction_test:
        metrics += [
            ValueDrift(column=prediction, method=prediction_test[0], threshold=prediction_test[1]),
            MeanValue(column=prediction),
            QuantileValue(column=prediction, quantile=0.9),
        ]
    metrics += [MissingValueCount(column=c) for c in features]
    metrics += [OutRangeValueCount(column=c, left=lo, right=hi) for c, (lo, hi) in ranges.items()]
    metrics += [
        OutListValueCount(column=c, values=list(v)) for c, v in categories.items() if len(v)
    ]
    report = Report(metrics, include_tests=False)
    return report.run(
        cur,
        ref,
        timestamp=timestamp,
        tags=list(tags),
        metadata=dict(metadata or {}),
        name="drift and data quality",
    )


def performance_report(
    labelled: pd.DataFrame,
    *,
    timestamp: datetime | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> Any:
    """Classification quality of the labelled predictions (``probability``, ``label``)."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.presets import ClassificationQuality

    definition = DataDefinition(
        classification=[
            BinaryClassification(target="label", prediction_probas="probability", pos_label=1)
        ],
        numerical_columns=["probability"],
        categorical_columns=["label"],
    )
    ds = Dataset.from_pandas(labelled[["probability", "label"]], data_definition=definition)
    report = Report([ClassificationQuality(pr_curve=True)], include_tests=False)
    return report.run(
        ds,
        None,
        timestamp=timestamp,
        tags=list(tags),
        metadata=dict(metadata or {}),
        name="performance on fed-back outcomes",
    )


def summary_snapshot(
    values: Mapping[str, float],
    *,
    timestamp: datetime | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> Any:
    """A one-row report of the run's headline numbers, so dashboard panels can plot them.

    Evidently dashboards plot metric values stored in snapshots; the verdict and our combined
    drift share are computed after the drift report, so they travel as a small second
    snapshot of built-in ``MeanValue`` metrics (no custom metric classes the UI would need to
    import).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    frame = pd.DataFrame({k: [float(v)] for k, v in values.items()})
    ds = Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(frame)))
    report = Report([MeanValue(column=c) for c in frame.columns], include_tests=False)
    return report.run(
        ds,
        None,
        timestamp=timestamp,
        tags=[SUMMARY_TAG, *tags],
        metadata=dict(metadata or {}),
        name="monitoring summary",
    )


def metric_values(snapshot: Any) -> list[dict[str, Any]]:
    """``[{"type", "params", "value"}]`` of every metric in a snapshot (plain Python)."""
    out = []
    for m in snapshot.dict()["metrics"]:
        cfg = dict(m["config"])
        mtype = str(cfg.pop("type", "")).rsplit(":", 1)[-1]
        out.append({"type": mtype, "params": cfg, "value": _plain(m["value"])})
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    return v


def drift_scores(snapshot: Any) -> dict[str, float]:
    """Column -> drift score of every ``ValueDrift`` metric."""
    return {
        m["params"]["column"]: float(m["value"])
        for m in metric_values(snapshot)
        if m["type"] == "ValueDrift"
    }


def save_html(snapshot: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))


def _dashboard_panels() -> list[Any]:
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import counter_panel, line_plot_panel, text_panel

    def value(name: str) -> Any:
        return PanelMetric(
            legend=DASHBOARD_VALUES[name],
            metric="MeanValue",
            metric_labels={"column": name},
            tags=[SUMMARY_TAG],
        )

    return [
        text_panel(
            "vitalrisk monitoring",
            "Each run: drift of the training features vs the current window of the prediction "
            "log, predicted-risk level, data quality and (once outcomes arrive) performance.",
        ),
        counter_panel(
            "Latest verdict (0 ok, 1 warn, 2 retrain)", [value("verdict_level")], size="half"
        ),
        counter_panel("Latest drift share", [value("drift_share")], size="half"),
        line_plot_panel("Verdict over time", [value("verdict_level")], size="half"),
        line_plot_panel("Drift share over time", [value("drift_share")], size="half"),
        line_plot_panel("Predicted risk level", [value("predicted_risk_mean")], size="half"),
        line_plot_panel("AUROC on fed-back outcomes", [value("auroc")], size="half"),
    ]


def _save_dashboard(ws: Any, project_id: Any) -> None:
    """Write the dashboard in one go (``dashboard.add_panel(tab=...)`` in 0.7.23 lists each
    panel twice in an existing tab)."""
    from evidently.sdk.models import DashboardModel, DashboardTabModel

    panels = _dashboard_panels()
    tab = DashboardTabModel(title="Monitoring", panels=[p.id for p in panels])
    ws.save_dashboard(project_id, DashboardModel(tabs=[tab], panels=panels))


def add_to_workspace(
    workspace: str | Path, project_name: str, snapshots: Sequence[Any], description: str = ""
) -> dict[str, Any]:
    """Add snapshots to the project (created with its dashboard on first use).

    Returns ``{"project_id", "snapshot_ids"}`` so the JSON summary can link to the UI.
    """
    from evidently.ui.workspace import Workspace

    Path(workspace).mkdir(parents=True, exist_ok=True)
    ws = Workspace.create(str(workspace))
    found = ws.search_project(project_name)
    if found:
        project = found[0]
    else:
        project = ws.create_project(project_name, description=description or None)
        _save_dashboard(ws, project.id)
        logger.info("created Evidently project %s (%s) in %s", project_name, project.id, workspace)
    ids = [str(ws.add_run(project.id, snap, include_data=False).id) for snap in snapshots]
    return {"project_id": str(project.id), "snapshot_ids": ids}


def list_workspace_runs(workspace: str | Path, project_name: str) -> list[str]:
    from evidently.ui.workspace import Workspace

    ws = Workspace.create(str(workspace))
    found = ws.search_project(project_name)
    return [str(s) for s in ws.list_runs(found[0].id)] if found else []
