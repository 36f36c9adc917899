"""Large simulator patient pools for the monitor's alarm-rate benchmark, built once and cached.

Simulating a fresh cohort per resample (simulate -> ingest -> features) costs ~0.05 s per
patient; realistic monitoring windows are hundreds to thousands of patients, so the benchmark
simulates a few large pools once and draws seeded patient resamples from them instead:

- ``reference``: the training distribution (consent purpose ``model_training``), seeds 0, 1, ...
- ``none``: fresh patients from the same distribution (care purpose), seeds 1000, 1001, ...
- one pool per drift variant with the SAME seeds as ``none``: the same patients, with the drift
  (``hr_offset`` is exactly the ``none`` pool plus the wearable offset).

Each pool is simulated in chunks of ``CHUNK`` patients (one simulator seed per chunk); patient
pseudonyms are prefixed with the chunk seed so that chunks never share an id. Pools are parquet
files in ``BENCH_MONITORING_POOL_DIR`` (default: the system temp dir), reused while the params,
the pool size and the simulator source are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

CHUNK = 1000
REFERENCE_SEED = 0
CURRENT_SEED = 1000
ROOT = Path(__file__).resolve().parents[1]


def pool_dir() -> Path:
    d = os.environ.get("BENCH_MONITORING_POOL_DIR") or str(
        Path(tempfile.gettempdir()) / "vitalrisk_monitoring_pools"
    )
    return Path(d)


def _fingerprint(params: Path, extra: str) -> str:
    """The simulate/ingest/features params + their code: a change rebuilds the pools."""
    from core.params import read_params

    raw = read_params(params) if params.is_file() else {}
    sections = {k: raw.get(k) for k in ("simulate", "ingest", "features")}
    h = hashlib.sha256(extra.encode())
    h.update(json.dumps(sections, sort_keys=True, default=str).encode())
    for f in [
        ROOT / "simulate" / "cohort.py",
        ROOT / "simulate" / "config.py",
        ROOT / "ingest" / "config.py",
        ROOT / "features" / "build.py",
        ROOT / "ingest" / "ingestion.py",
    ]:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_pool(
    kind: str,
    patients: int,
    *,
    seed: int,
    purpose: str,
    params: str | Path = ROOT / "params.yaml",
    simulate: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Simulate ``patients`` patients with drift ``kind`` in chunks; cached parquet path."""
    from pipelines.monitor import simulated_features

    params = Path(params)
    tag = f"{kind}|{patients}|{seed}|{purpose}|{sorted((simulate or {}).items())}"
    out = pool_dir() / f"{name or kind}_{patients}_{_fingerprint(params, tag)}.parquet"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pool_raw_") as tmp:
        for k, lo in enumerate(range(0, patients, CHUNK)):
            n = min(CHUNK, patients - lo)
            s = seed + k
            f = simulated_features(
                params, kind, n, s, Path(tmp) / f"raw_{s}", purpose=purpose, simulate=simulate
            )
            shutil.rmtree(Path(tmp) / f"raw_{s}", ignore_errors=True)
            f["patient_id"] = f"s{s}-" + f["patient_id"].astype(str)
            parts.append(f)
    frame = pd.concat(parts, ignore_index=True)
    tmp_out = out.with_suffix(".tmp")
    frame.to_parquet(tmp_out)
    tmp_out.replace(out)
    logger.info(
        "pool %s: %d patients, %d rows in %.0f s -> %s",
        name or kind,
        frame["patient_id"].nunique(),
        len(frame),
        time.perf_counter() - t0,
        out,
    )
    return out


def reference_pool(patients: int, params: str | Path = ROOT / "params.yaml") -> Path:
    return build_pool(
        "none",
        patients,
        seed=REFERENCE_SEED,
        purpose="model_training",
        params=params,
        name="reference",
    )


def current_pool(
    kind: str,
    patients: int,
    params: str | Path = ROOT / "params.yaml",
    simulate: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    return build_pool(
        kind,
        patients,
        seed=CURRENT_SEED,
        purpose="care",
        params=params,
        simulate=simulate,
        name=name,
    )


if __name__ == "__main__":  # build the default pools ahead of the benchmark
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    kinds = (
        sys.argv[2].split(",")
        if len(sys.argv) > 2
        else ["reference", "none", "hr_offset", "older", "spo2_missing"]
    )
    for kind in kinds:
        p = reference_pool(n) if kind == "reference" else current_pool(kind, n)
        print(p, flush=True)
