"""``vitalrisk simulate``: write the synthetic cohort (or a drifted variant) in every raw format."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.errors import UserError

HELP = "generate the synthetic ward + wearable cohort (CSV, wide CSV, FHIR ndjson, PSV) into --out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: data, or artifacts/drift/KIND with --drift)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: params simulate.seed)"
    )
    parser.add_argument(
        "--n-patients",
        type=int,
        default=None,
        help="number of patients (default: params simulate.n_patients)",
    )
    parser.add_argument(
        "--drift",
        default=None,
        choices=["none", "hr_offset", "older", "spo2_missing"],
        help="write a shifted variant: hr_offset (wearable HR +3 bpm), older (+12 years), spo2_missing (60%% of wearable SpO2 lost)",
    )
    parser.add_argument(
        "--params",
        default="params.yaml",
        help="params file (section simulate); missing file -> defaults",
    )


def run(args: argparse.Namespace) -> int:
    from core.params import load_section, validate_section
    from simulate.cohort import simulate_cohort, write_cohort
    from simulate.config import SimulateConfig

    params = Path(args.params)
    if params.is_file():
        cfg = load_section(SimulateConfig, "simulate", params)
    else:
        cfg = validate_section(SimulateConfig, "simulate", {}, source=str(params))
    overrides: dict[str, object] = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.n_patients is not None:
        overrides["n_patients"] = args.n_patients
    if args.drift is not None:
        overrides["drift"] = args.drift
    if overrides:
        cfg = validate_section(
            SimulateConfig, "simulate", {**cfg.model_dump(), **overrides}, source="command line"
        )
    out = (
        Path(args.out)
        if args.out
        else (Path("artifacts/drift") / cfg.drift if cfg.drift != "none" else Path("data"))
    )
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory (expected an output directory)")
    t0 = time.perf_counter()
    cohort = simulate_cohort(cfg)
    sizes = write_cohort(cohort, out, cfg)
    n_events = len(cohort.outcomes)
    print(
        f"simulated {cfg.n_patients} patients (seed {cfg.seed}, drift {cfg.drift}): "
        f"{len(cohort.observations):,} observations, {n_events} events "
        f"({n_events / max(cfg.n_patients, 1):.1%}); wrote {len(sizes)} files, "
        f"{sum(sizes.values()) / 1e6:.1f} MB into {out} in {time.perf_counter() - t0:.1f}s"
    )
    return 0
