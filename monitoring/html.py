"""What a reader sees first in the monitoring reports: the verdict and its reasons (report.html)
and the performance at the alert threshold with a calibration plot (performance.html).

Built from ``summary.json``'s own dict, so the pages cannot say something else than the
summary; Evidently's widgets follow below them (``monitoring.evidently_reports.save_html``).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

COLOURS = {
    "ok": "#1b7f3b",
    "warn": "#b36b00",
    "retrain": "#b00020",
    "insufficient_data": "#555555",
}


def _page_style() -> str:
    return (
        "font-family: system-ui, sans-serif; margin: 16px 24px; padding: 16px 20px; "
        "border: 1px solid #ccc; border-radius: 8px; background: #fafafa; max-width: 1100px"
    )


def verdict_header(summary: Mapping[str, Any]) -> str:
    """Verdict, reasons and every drifted feature, as an HTML section."""
    verdict = str(summary.get("verdict"))
    colour = COLOURS.get(verdict, "#333")
    window = summary.get("window") or {}
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in summary.get("reasons") or [])
    drifted = summary.get("drifted_features") or []
    unit = "patients" if summary.get("drift_unit") == "patient" else "rows"
    feats = (
        "<p><b>Drifted features ({n})</b>: {names}</p>".format(
            n=len(drifted), names=html.escape(", ".join(drifted))
        )
        if drifted
        else "<p>No feature drifted.</p>"
    )
    return (
        f'<section id="vitalrisk-verdict" style="{_page_style()}">'
        f'<h1 style="margin: 0 0 8px; color: {colour}">Verdict: {html.escape(verdict)}</h1>'
        f"<p>Window {html.escape(str(window.get('start')))} to "
        f"{html.escape(str(window.get('end')))}: {window.get('rows')} predictions; drift tested "
        f"per {unit[:-1]} ({summary.get('current_units')} {unit} vs "
        f"{summary.get('reference_units')} in the training reference).</p>"
        f"<ul>{reasons}</ul>{feats}"
        "<p style='color:#555'>The drift widgets below are the verdict's own tests on the same "
        "frames, with the thresholds the verdict applied (noise floor included); "
        "<code>summary.json</code> has every feature's score.</p></section>"
    )


def calibration_png(table: Sequence[Mapping[str, Any]]) -> str:
    """Observed event rate against mean predicted risk per bin, as a data: URI (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=100)
    top = max([0.05, *(max(r["mean_predicted"], r["observed_rate"]) for r in table)])
    ax.plot([0, top], [0, top], color="#999", linestyle="--", label="perfect calibration")
    ax.plot(
        [r["mean_predicted"] for r in table],
        [r["observed_rate"] for r in table],
        marker="o",
        label="served model",
    )
    ax.set_xlabel("mean predicted risk (bin)")
    ax.set_ylabel("observed event rate")
    ax.set_title("Calibration on fed-back outcomes")
    ax.legend(loc="upper left")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}" if isinstance(v, float) else str(v)


def performance_header(perf: Mapping[str, Any]) -> str:
    """Performance at the alert threshold and the calibration plot, as an HTML section."""
    o = perf.get("overall") or {}
    t = perf.get("at_alert_threshold")
    rows = [
        ("labelled predictions (events)", f"{o.get('n')} ({o.get('positives')})"),
        ("AUROC / AUPRC", f"{_fmt(o.get('auroc'))} / {_fmt(o.get('auprc'))}"),
        ("Brier / expected calibration error", f"{_fmt(o.get('brier'))} / {_fmt(o.get('ece'))}"),
    ]
    if t:
        rows += [
            ("alert threshold (the model's, from training)", _fmt(t.get("threshold"))),
            ("alerts", f"{t.get('alerts')} ({_fmt(t.get('alert_share'), pct=True)})"),
            (
                "sensitivity / PPV at the threshold",
                f"{_fmt(t.get('sensitivity'))} / {_fmt(t.get('ppv'))}",
            ),
        ]
    else:
        rows.append(("alert threshold", "unknown (no model to read it from): not reported"))
    table = "".join(
        f"<tr><td style='padding-right:16px'>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    plot = perf.get("calibration") or []
    img = f'<img alt="calibration plot" src="{calibration_png(plot)}">' if plot else ""
    return (
        f'<section id="vitalrisk-performance" style="{_page_style()}">'
        "<h1 style='margin: 0 0 8px'>Performance on fed-back outcomes</h1>"
        f"<div style='display:flex; gap:32px; align-items:flex-start'><table>{table}</table>"
        f"{img}</div><p style='color:#555'>Evidently's classification widgets below use the same "
        "threshold.</p></section>"
    )


def standalone(section: str, title: str) -> str:
    """A page with our section only (no Evidently report: too little data to test)."""
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='UTF-8'><title>{html.escape(title)}"
        f"</title></head><body>\n{section}\n</body></html>\n"
    )
