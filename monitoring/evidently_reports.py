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
    "drift_share_percent": "Monitored features drifted (%)",
    "drifted_features": "Drifted features",
    "predicted_risk_mean": "Mean predicted risk (current window)",
    "verdict_level": "Verdict (-1 insufficient data, 0 ok, 1 warn, 2 retrain)",
    "auroc": "AUROC on labelled predictions",
}
SUMMARY_TAG = "summary"


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    numerical: Sequence[str],
    categorical: Sequence[str],
    widgets: Mapping[str, tuple[str, float]],
    prediction: str | None = None,
    timestamp: datetime | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> Any:
    """The drift widgets of the verdict's own tests, on the verdict's own frames.

    ``reference``/``current`` are the frames the monitor tested (one row per patient when it
    tests patients; a segment's column holds values only for that segment's units);
    ``widgets`` maps the columns shown to ``(method, threshold)``, the threshold being the one
    the verdict applied (the noise floor included), so a widget says "drift detected" exactly
    when the verdict counts the column as drifted.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue, QuantileValue, ValueDrift

    shown = [c for c in [*numerical, *categorical] if c in widgets]
    num = [c for c in numerical if c in widgets]
    cat = [c for c in categorical if c in widgets]
    if prediction:
        num.append(prediction)
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    cols = list(dict.fromkeys([*shown, *([prediction] if prediction else [])]))
    cur = Dataset.from_pandas(current[cols], data_definition=definition)
    ref = Dataset.from_pandas(reference[cols], data_definition=definition)
    # one ValueDrift per column rather than DataDriftPreset: the preset's dataset counter
    # would apply one threshold to every column, not the verdict's per-column ones
    metrics: list[Any] = [
        ValueDrift(column=c, method=widgets[c][0], threshold=widgets[c][1]) for c in cols
    ]
    if prediction:
        metrics += [MeanValue(column=prediction), QuantileValue(column=prediction, quantile=0.9)]
    report = Report(metrics, include_tests=False)
    return report.run(
        cur,
        ref,
        timestamp=timestamp,
        tags=list(tags),
        metadata=dict(metadata or {}),
        name="drift (the verdict's tests)",
    )


def value_drift_scores(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: Mapping[str, tuple[str, float, str]],
) -> dict[str, float]:
    """Evidently's own ``ValueDrift`` score per column (``(method, threshold, "num"|"cat")``):
    the reference the monitor's fast tests are checked against."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    definition = DataDefinition(
        numerical_columns=[c for c, t in columns.items() if t[2] == "num"],
        categorical_columns=[c for c, t in columns.items() if t[2] == "cat"],
    )
    cols = list(columns)
    snap = Report(
        [ValueDrift(column=c, method=m, threshold=t) for c, (m, t, _) in columns.items()],
        include_tests=False,
    ).run(
        Dataset.from_pandas(current[cols], data_definition=definition),
        Dataset.from_pandas(reference[cols], data_definition=definition),
    )
    return drift_scores(snap)


def performance_report(
    labelled: pd.DataFrame,
    *,
    threshold: float | None = None,
    timestamp: datetime | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> Any:
    """Classification quality of the labelled predictions (``probability``, ``label``) at the
    model's alert ``threshold`` (Evidently's default of 0.5 would count almost no alerts)."""
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
    quality = ClassificationQuality(probas_threshold=threshold, conf_matrix=True, pr_curve=True)
    report = Report([quality], include_tests=False)
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


def save_html(snapshot: Any, path: str | Path, header: str | None = None) -> None:
    """The snapshot's HTML, with ``header`` (our HTML: verdict and reasons) at the top."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    if header:
        page = Path(path).read_text(encoding="utf-8")
        page = page.replace("<body>", f"<body>\n{header}\n", 1)
        Path(path).write_text(page, encoding="utf-8")


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

    # counters show whole numbers: a share of 0.003 (1 of 320 features) would read "0" next to
    # a "warn" verdict, so they show the verdict level and the count of drifted features
    return [
        text_panel(
            "vitalrisk monitoring",
            "Each run: drift of the training features vs the current window of the prediction "
            "log, predicted-risk level, data quality and (once outcomes arrive) performance. "
            "The verdict and its reasons are at the top of each run's report.",
        ),
        counter_panel(
            "Latest verdict (-1 insufficient data, 0 ok, 1 warn, 2 retrain)",
            [value("verdict_level")],
            size="half",
        ),
        counter_panel("Drifted features (latest run)", [value("drifted_features")], size="half"),
        line_plot_panel("Verdict over time", [value("verdict_level")], size="half"),
        line_plot_panel("Drifted features over time", [value("drifted_features")], size="half"),
        line_plot_panel(
            "Monitored features drifted (%)", [value("drift_share_percent")], size="half"
        ),
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
