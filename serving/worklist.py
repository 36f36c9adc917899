"""The clinician's pages as plain HTML: worklist, patient page, login form, cohort view.

Server-rendered, inline SVG for the sparklines and charts, one packaged stylesheet
(``serving/static/worklist.css``): no CDN, no JavaScript, no build step. Every value shown
comes from ``serving.feedback`` (the answer log, the landing area); every text is escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from serving.feedback import Answer, WorkItem, freshness, parse_time

STYLESHEET = Path(__file__).with_name("static") / "worklist.css"
_ESC_TEXT = {
    "news2_emergency": "NEWS2 emergency",
    "news2_urgent": "NEWS2 urgent",
    "news2_single_parameter": "NEWS2 single parameter 3",
}


def _page(title: str, body: str, who: str | None = None, csrf: str | None = None) -> str:
    logout = ""
    if who and csrf:
        logout = (
            '<form method="post" action="/worklist/logout">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<span class="muted">{escape(who)}</span> <button type="submit">Log out</button></form>'
        )
    nav = '<a href="/worklist">Worklist</a> <a href="/cohort">Cohort</a>' if who else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} · vitalrisk</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/worklist/static/worklist.css"></head><body>'
        f"<header><h1>vitalrisk</h1>{nav}{logout}</header><main>{body}</main></body></html>"
    )


def login_page(error: str | None = None) -> str:
    err = f'<p class="error" id="login-error">{escape(error)}</p>' if error else ""
    return _page(
        "Log in",
        '<div class="login"><h2>Clinician worklist</h2>'
        "<p>Log in with an API key that has the <code>read</code> scope. The key is checked "
        "once and exchanged for a session cookie; the worklist shows the patients this key "
        "sent.</p>"
        f"{err}"
        '<form method="post" action="/worklist/login">'
        '<label for="key">API key</label>'
        '<input id="key" name="key" type="password" autocomplete="off" required>'
        '<button class="ack" id="login" type="submit">Log in</button></form></div>',
    )


def _g(v: Any, missing: str) -> str:
    return missing if v is None else f"{float(v):g}"


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * float(v):.1f}%"


def _band(a: Answer) -> str:
    band = a["risk_band"]
    if band is None:
        return '<span class="band band-none">insufficient data</span>'
    return f'<span class="band band-{escape(band)}">{escape(band)}</span>'


def sparkline(
    points: Sequence[tuple[float, float, bool]], width: int = 140, height: int = 28
) -> str:
    """Inline SVG of ``(x in [0, 1], probability, alert)`` points; alerts as red dots."""
    if not points:
        return '<span class="muted">no scores</span>'
    top = max(max(p for _, p, _ in points), 1e-6)

    def xy(x: float, p: float) -> tuple[float, float]:
        return 2 + x * (width - 4), height - 2 - (p / top) * (height - 4)

    coords = [xy(x, p) for x, p, _ in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#c1121f"/>'
        for (x, y), (_, _, alert) in zip(coords, points, strict=True)
        if alert
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" role="img" '
        f'aria-label="risk over the last hours"><polyline fill="none" stroke="#1d3557" '
        f'stroke-width="1.5" points="{line}"/>{dots}</svg>'
    )


def _first(history: Sequence[Answer], start: datetime) -> datetime:
    """The chart's left edge: the first answer in the window (the axis spans the data)."""
    times = [parse_time(a["as_of"]) for a in history]
    return max(start, min(times)) if times else start


def _points(
    history: Sequence[Answer], start: datetime, end: datetime
) -> list[tuple[float, float, bool]]:
    span = max((end - start).total_seconds(), 1.0)
    out = []
    for a in history:
        if a["probability"] is None:
            continue
        x = (parse_time(a["as_of"]) - start).total_seconds() / span
        out.append((min(1.0, max(0.0, x)), float(a["probability"]), bool(a["alert"])))
    return out


def worklist_page(
    items: Sequence[WorkItem],
    who: str,
    csrf: str,
    now: datetime,
    start: datetime,
    setting: str | None,
    hours: float,
) -> str:
    tabs = " ".join(
        f'<a href="/worklist{q}">{label}</a>'
        for q, label in (
            ("", "All"),
            ("?setting=ward", "Ward"),
            ("?setting=home", "Home programme"),
        )
    )
    rows = []
    for rank, it in enumerate(items, 1):
        a = it.current
        esc = _ESC_TEXT.get(a["escalation"] or "", "")
        reasons = escape("; ".join(it.current.reasons[:3])) or (
            '<span class="muted">'
            + ("not scored: too little recent data" if a["risk_band"] is None else "-")
            + "</span>"
        )
        fresh = freshness(it.newest_observation, now)
        stale = a["status"] != "ok"
        prob = _pct(a["probability"])
        rows.append(
            f'<tr class="{"alert" if a["alert"] else ""}" data-rank="{rank}" '
            f'data-patient="{escape(it.caller_id)}">'
            f'<td><a class="patient" href="/worklist/patients/{escape(it.pseudonym)}">'
            f"{escape(it.caller_id or it.pseudonym)}</a></td>"
            f"<td>{_band(a)} {prob}</td>"
            f"<td>{_g(a['news2_total'], '')}</td>"
            f'<td>{"<b>alert</b>" if a["alert"] else ""} <span class="esc">{escape(esc)}</span>'
            f"{' <span class=muted>(acknowledged)</span>' if it.acknowledged else ''}</td>"
            f"<td>{reasons}</td>"
            f"<td>{sparkline(_points(it.history, _first(it.history, start), now))}</td>"
            f'<td class="{"stale" if stale else ""}">{escape(fresh)}</td></tr>'
        )
    table = (
        '<table id="worklist"><thead><tr><th>Patient</th><th>Risk</th><th>NEWS2</th>'
        f"<th>Alert / escalation</th><th>Top reasons</th><th>Risk, last {hours:g} h</th>"
        "<th>Newest data</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    if not items:
        table = '<p class="muted">No patients scored with this key in this period.</p>'
    what = {"ward": "Ward", "home": "Home programme"}.get(setting or "", "All settings")
    body = (
        f'<h2>Worklist · {escape(what)}</h2><p class="tabs">{tabs}</p>'
        f'<p class="muted">Ranked by current risk (alerts first). Bands and alerts come from '
        f"the served model's own thresholds, never quieter than NEWS2 (RCP). As of "
        f"{escape(now.strftime('%Y-%m-%d %H:%M'))} UTC.</p>{table}"
    )
    return _page("Worklist", body, who, csrf)


def line_chart(
    title: str,
    points: Sequence[tuple[float, float]],
    marks: Sequence[float] = (),
    width: int = 340,
    height: int = 120,
    unit: str = "",
) -> str:
    """Inline SVG chart of ``(x in [0, 1], value)``; ``marks`` (x) as red alert lines."""
    if not points:
        return f'<div class="chart"><b>{escape(title)}</b><p class="muted">no values</p></div>'
    lo = min(v for _, v in points)
    hi = max(v for _, v in points)
    pad = (hi - lo) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad

    def xy(x: float, v: float) -> tuple[float, float]:
        return 30 + x * (width - 36), height - 14 - (v - lo) / (hi - lo) * (height - 24)

    line = " ".join("{:.1f},{:.1f}".format(*xy(x, v)) for x, v in points)
    alert_lines = "".join(
        f'<line class="alert-mark" x1="{xy(x, lo)[0]:.1f}" x2="{xy(x, lo)[0]:.1f}" y1="6" '
        f'y2="{height - 14}" stroke="#c1121f" stroke-dasharray="3,2"/>'
        for x in marks
    )
    dots = "".join(
        '<circle cx="{:.1f}" cy="{:.1f}" r="2" fill="#1d3557"/>'.format(*xy(x, v))
        for x, v in points
    )
    return (
        f'<div class="chart"><b>{escape(title)}</b> <span class="muted">{escape(unit)}</span>'
        f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}">'
        f'<text x="0" y="12" font-size="10">{hi - pad:.3g}</text>'
        f'<text x="0" y="{height - 14}" font-size="10">{lo + pad:.3g}</text>'
        f'{alert_lines}<polyline fill="none" stroke="#1d3557" stroke-width="1.5" points="{line}"/>'
        f"{dots}</svg></div>"
    )


def patient_page(
    item: WorkItem,
    vitals: Mapping[str, Sequence[tuple[datetime, float]]],
    units: Mapping[str, str],
    who: str,
    csrf: str,
    now: datetime,
    start: datetime,
    acknowledged: str | None,
) -> str:
    a = item.current
    span = max((now - start).total_seconds(), 1.0)

    def x_of(t: datetime) -> float:
        return min(1.0, max(0.0, (t - start).total_seconds() / span))

    marks = [x_of(parse_time(h["as_of"])) for h in item.history if h["alert"]]
    risk = [
        (x_of(parse_time(h["as_of"])), float(h["probability"]))
        for h in item.history
        if h["probability"] is not None
    ]
    charts = [line_chart("Risk (probability)", risk, marks)]
    for code, pts in sorted(vitals.items()):
        charts.append(
            line_chart(
                code.replace("_", " "),
                [(x_of(t), v) for t, v in pts],
                marks,
                unit=units.get(code, ""),
            )
        )
    reasons = "".join(f"<li>{escape(r)}</li>" for r in a.reasons) or "<li class=muted>none</li>"
    latest = ", ".join(
        f"{escape(k)} {escape(freshness(v, now))}" for k, v in sorted(a.latest.items())
    )
    esc = _ESC_TEXT.get(a["escalation"] or "", "")
    ack = (
        f'<p id="ack-state">Acknowledged at {escape(acknowledged)}.</p>'
        if acknowledged
        else '<p id="ack-state" class="muted">Not acknowledged yet.</p>'
    )
    body = (
        f'<h2 id="patient-id">{escape(item.caller_id or item.pseudonym)}</h2>'
        f"<p>{_band(a)} {_pct(a['probability'])} "
        f"· NEWS2 {_g(a['news2_total'], '-')} "
        f'{"· <b>alert</b>" if a["alert"] else ""} <span class="esc">{escape(esc)}</span> '
        f"· {escape(a['setting'] or 'unknown setting')}"
        f"{'' if a['horizon_hours'] is None else ' · horizon ' + _g(a['horizon_hours'], '') + ' h'}"
        f" · model version {escape(str(a['model_version']))} · as of {escape(a['as_of'])}</p>"
        f'<p class="muted">Newest data: {latest or "none"}</p>'
        f"<h3>Reasons</h3><ul>{reasons}</ul>{ack}"
        '<form method="post" action="/worklist/acknowledge">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        f'<input type="hidden" name="patient" value="{escape(item.pseudonym)}">'
        f'<input type="hidden" name="request_id" value="{escape(str(a["request_id"]))}">'
        '<button class="ack" id="acknowledge" type="submit">Acknowledge</button></form>'
        "<h3>Charts (dashed red: an alert fired)</h3>"
        f'<p class="muted">Time axis {escape(start.strftime("%d %b %H:%M"))} to '
        f"{escape(now.strftime('%d %b %H:%M'))} UTC</p>"
        f'<div class="charts">{"".join(charts)}</div>'
    )
    return _page(str(item.caller_id or item.pseudonym), body, who, csrf)


def cohort_page(doc: Mapping[str, Any], who: str, csrf: str) -> str:
    bands = list(doc["age_bands"])
    head = "".join(f"<th>{escape(b)}</th>" for b in bands)
    rows = []
    for r in doc["rows"]:
        for measure in ("patients", "alerts", "events"):
            cells = r[measure]
            tds = "".join(f"<td>{escape(str(cells.get(b, 0)))}</td>" for b in bands)
            rows.append(
                f"<tr><td>{escape(r['week'])}</td><td>{escape(r['setting'])}</td>"
                f"<td>{measure}</td>{tds}<td>{escape(str(cells['total']))}</td></tr>"
            )
    body = (
        "<h2>Cohort: patients, alerts and events per ISO week</h2>"
        f'<p class="muted">By setting and age band; counts under k = {doc["k"]} are shown as '
        f'"&lt;{doc["k"]}", and a second cell of the row is suppressed where the total would '
        "give the first away. JSON: <code>GET /v1/cohort</code>.</p>"
        '<table id="cohort"><thead><tr><th>Week</th><th>Setting</th><th>Count</th>'
        f"{head}<th>Total</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return _page("Cohort", body, who, csrf)


def stylesheet() -> bytes:
    return STYLESHEET.read_bytes()
