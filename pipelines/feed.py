"""``vitalrisk feed``: play demo patients into a running service, as a ward system would.

The clinician pages show what the service stored; a fresh ``make serve`` has stored nothing.
This command simulates a few patients with the demo's own simulator (``simulate.cohort``,
params ``simulate``, raw source ids ``MRN-...``), moves each one's last days so they end
now, lands their observations (``POST /v1/observations``) and scores them every few hours
(``POST /v1/score``), with the key you give. Patients with an event are cut off a few hours
before it, so the ward has someone deteriorating.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.errors import UserError

HELP = "play simulated demo patients into a running service (for the worklist)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="service base URL")
    parser.add_argument(
        "--key-env",
        default="VITALRISK_FEED_KEY",
        help="environment variable holding the API key (score+ingest scopes); never a flag",
    )
    parser.add_argument("--patients", type=int, default=24, help="patients to play (1-100)")
    parser.add_argument("--hours", type=float, default=72.0, help="history per patient")
    parser.add_argument("--every", type=float, default=4.0, help="hours between scores")
    parser.add_argument("--params", default="params.yaml", help="params (section simulate)")


def _window(obs: Any, outcomes: Any, pid: str, hours: float) -> tuple[Any, Any]:
    """The patient's observations in the window that ends 3 h before an event (or at their
    last observation), and that end time."""
    import pandas as pd

    mine = obs[obs["patient_id"] == pid]
    ev = outcomes[outcomes["patient_id"] == pid]
    end = ev["time"].min() - pd.Timedelta(hours=3) if len(ev) else mine["time"].max()
    sel = mine[(mine["time"] <= end) & (mine["time"] > end - pd.Timedelta(hours=hours))]
    return sel, end


def _items(sel: Any, shift: Any, pid: str, units: dict[str, str]) -> list[dict[str, Any]]:
    """API observations in the simulator's canonical units (named: labs have no default)."""
    return [
        {
            "patient_id": pid,
            "time": (t + shift).isoformat().replace("+00:00", "Z"),
            "code": str(c),
            "value": float(v),
            "unit": units.get(str(c)),
            "source": str(s),
        }
        for t, c, v, s in zip(sel["time"], sel["code"], sel["value"], sel["source"], strict=True)
        if str(c) in units
    ]


def run(args: argparse.Namespace) -> int:
    import httpx

    from core.params import load_section, validate_section
    from simulate.cohort import simulate_cohort
    from simulate.config import SimulateConfig

    key = os.environ.get(args.key_env)
    if not key:
        raise UserError(f"set {args.key_env} to an API key with the score and ingest scopes")
    if not 1 <= args.patients <= 100:
        raise UserError("--patients: expected 1 to 100")
    params = Path(args.params)
    raw = {"n_patients": max(args.patients * 4, 40)}
    cfg = (
        load_section(SimulateConfig, "simulate", params).model_copy(update=raw)
        if params.is_file()
        else validate_section(SimulateConfig, "simulate", raw, source=str(params))
    )
    from core.vocabulary import load_vocabulary

    units = {k: spec.unit for k, spec in load_vocabulary().codes.items()}
    cohort = simulate_cohort(cfg)
    pats = cohort.patients
    with_event = set(cohort.outcomes["patient_id"])
    chosen = [p for p in pats["patient_id"] if p in with_event][: max(1, args.patients // 4)]
    chosen += [p for p in pats["patient_id"] if p not in with_event][: args.patients - len(chosen)]
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    headers = {"Authorization": f"Bearer {key}"}
    landed = scored = 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=60.0) as c:
        for pid in chosen:
            sel, end = _window(cohort.observations, cohort.outcomes, pid, args.hours)
            if sel.empty:
                continue
            shift = now - end.to_pydatetime()
            items = _items(sel, shift, pid, units)
            for i in range(0, len(items), 5000):
                r = c.post("/v1/observations", json={"observations": items[i : i + 5000]})
                if r.status_code != 200:
                    raise UserError(f"POST /v1/observations: {r.status_code} {r.text[:300]}")
                landed += r.json()["accepted"]
            row = pats[pats["patient_id"] == pid].iloc[0]
            cov = {"age": float(row["age"]), "sex": str(row["sex"]), "setting": str(row["setting"])}
            k = 0
            while k * args.every < min(24.0, args.hours):
                as_of = now - timedelta(hours=k * args.every)
                upto = [o for o in items if o["time"] <= as_of.isoformat().replace("+00:00", "Z")]
                obs = [
                    {kk: o[kk] for kk in ("time", "code", "value", "unit", "source")} for o in upto
                ]
                body = {
                    "patients": [
                        {
                            "patient_id": pid,
                            "covariates": cov,
                            "observations": obs[-5000:],
                            "as_of": as_of.isoformat().replace("+00:00", "Z"),
                        }
                    ]
                }
                r = c.post("/v1/score", json=body)
                if r.status_code != 200:
                    raise UserError(f"POST /v1/score: {r.status_code} {r.text[:300]}")
                scored += 1
                k += 1
    print(
        f"fed {len(chosen)} patients: {landed:,} observations landed, {scored} scores; "
        f"open {args.url}/worklist"
    )
    return 0
