"""Governance figures: audit-log append rate (one and several processes), verify rate, and the
cost of a research export on a simulated-size cohort."""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from governance.audit import AuditLog
from governance.export import ExportConfig, build_export
from governance.pseudonym import pseudonymise

KEY = b"benchmark-key"


def _writer(path: str, n: int) -> None:
    log = AuditLog(path)
    pid = pseudonymise("bench", KEY)
    for i in range(n):
        log.append("bench", "predict", f"/predict/{i}", patients=[pid])


def _appends(path: Path, procs: int, per_proc: int) -> float:
    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    ps = [ctx.Process(target=_writer, args=(str(path), per_proc)) for _ in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return procs * per_proc / (time.perf_counter() - t0)


def _cohort(n: int, obs_per_patient: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    ids = [pseudonymise(f"MRN-{i}", KEY) for i in range(n)]
    start = pd.Timestamp("2026-01-05", tz="UTC")
    patients = pd.DataFrame(
        {
            "patient_id": ids,
            "age": rng.integers(20, 95, n).astype(float),
            "sex": rng.choice(["F", "M"], n),
            "setting": rng.choice(["ward", "home"], n),
            "followup_start": start,
            "followup_end": start + pd.Timedelta(days=14),
            "consent_research": rng.random(n) < 0.8,
        }
    )
    obs = pd.DataFrame(
        {
            "patient_id": np.repeat(ids, obs_per_patient),
            "time": start + pd.to_timedelta(np.tile(np.arange(obs_per_patient), n), unit="min"),
            "code": "heart_rate",
            "value": rng.normal(80, 10, n * obs_per_patient),
            "source": "wearable",
        }
    )
    return obs, patients


def main() -> dict:
    out: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        out["audit_appends_per_s_1proc"] = round(_appends(path, 1, 2000), 1)
        out["audit_appends_per_s_4proc"] = round(_appends(path, 4, 500), 1)
        t0 = time.perf_counter()
        res = AuditLog(path).verify()
        assert res.ok, res.reason
        out["audit_entries"] = res.entries
        out["audit_verify_entries_per_s"] = round(res.entries / (time.perf_counter() - t0), 1)
    obs, patients = _cohort(2000, 500)
    t0 = time.perf_counter()
    res_e = build_export(obs, patients, None, ExportConfig(k=5), KEY)
    out["export_patients"] = res_e.manifest["patients"]
    out["export_observations"] = res_e.manifest["observations"]
    out["export_seconds"] = round(time.perf_counter() - t0, 2)
    for k, v in out.items():
        print(f"{k}: {v}")
    return out
