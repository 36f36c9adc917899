"""Data benchmark: ``vitalrisk simulate`` and ``ingest`` throughput on a generated cohort.

Figures: simulate and ingest wall seconds, raw bytes written, raw records read by ingest,
records per second for each, and the ingest accounting (accepted / quarantined / ...).
Environment knob: ``BENCH_DATA_PATIENTS`` (default 200; the default cohort is 500).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from core.params import load_section
from core.vocabulary import load_vocabulary
from ingest.config import IngestConfig
from ingest.ingestion import ingest
from simulate.cohort import simulate_cohort, write_cohort
from simulate.config import SimulateConfig

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


def main() -> dict:
    n = int(os.environ.get("BENCH_DATA_PATIENTS", "200"))
    sim_cfg = load_section(SimulateConfig, "simulate", PARAMS).model_copy(update={"n_patients": n})
    ing_cfg = load_section(IngestConfig, "ingest", PARAMS)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "data"
        t0 = time.perf_counter()
        sizes = write_cohort(simulate_cohort(sim_cfg), out, sim_cfg)
        t_sim = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = ingest([out], ing_cfg, load_vocabulary(), b"bench-key")
        t_ing = time.perf_counter() - t0
    totals = res.report["totals"]
    result = {
        "patients": n,
        "raw_mb": round(sum(sizes.values()) / 1e6, 2),
        "simulate_seconds": round(t_sim, 2),
        "ingest_seconds": round(t_ing, 2),
        "records_read": totals["read"],
        "ingest_records_per_s": round(totals["read"] / t_ing),
        **{f"ingest_{k}": v for k, v in totals.items() if k != "read"},
        "balanced": res.report["balanced"],
    }
    for k, v in result.items():
        print(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
