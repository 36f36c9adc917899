"""Ingest benchmark: a PhysioNet/CinC-2019-style directory end to end, next to a plain read.

Generates (seeded, cached in ``BENCH_INGEST_DIR``) ``BENCH_INGEST_FILES`` PSV files (default
20,000; ~38 hourly rows each, the 41 columns of the layout, PhysioNet-like sparsity: vitals
mostly present, labs mostly NaN; ~120 MB), then times ``vitalrisk ingest`` on it in-process
(read, canonical path, pseudonyms, consent, duplicates, Parquet out, report) with the
PhysioNet vocabulary, and a plain ``pyarrow.csv`` read of the same files (one call per file,
concatenated): the floor any reader pays. Prints values/s for both.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ingest.formats.psv import read_blocks

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [
    "HR",
    "O2Sat",
    "Temp",
    "SBP",
    "MAP",
    "DBP",
    "Resp",
    "EtCO2",
    "BaseExcess",
    "HCO3",
    "FiO2",
    "pH",
    "PaCO2",
    "SaO2",
    "AST",
    "BUN",
    "Alkalinephos",
    "Calcium",
    "Chloride",
    "Creatinine",
    "Bilirubin_direct",
    "Glucose",
    "Lactate",
    "Magnesium",
    "Phosphate",
    "Potassium",
    "Bilirubin_total",
    "TroponinI",
    "Hct",
    "Hgb",
    "PTT",
    "WBC",
    "Fibrinogen",
    "Platelets",
    "Age",
    "Gender",
    "Unit1",
    "Unit2",
    "HospAdmTime",
    "ICULOS",
    "SepsisLabel",
]
#: (mean, sd, share present) per clinical column, roughly as in the PhysioNet training set
SPEC = {
    "HR": (84, 17, 0.9),
    "O2Sat": (97, 3, 0.87),
    "Temp": (37, 0.7, 0.34),
    "SBP": (123, 23, 0.85),
    "MAP": (82, 16, 0.88),
    "DBP": (63, 14, 0.69),
    "Resp": (18.7, 5, 0.85),
    "EtCO2": (33, 8, 0.04),
    "BaseExcess": (-0.7, 4, 0.05),
    "HCO3": (24, 4, 0.04),
    "FiO2": (0.55, 0.1, 0.08),
    "pH": (7.38, 0.07, 0.07),
    "PaCO2": (41, 9, 0.06),
    "SaO2": (92, 10, 0.03),
    "AST": (60, 40, 0.02),
    "BUN": (23, 15, 0.07),
    "Alkalinephos": (100, 50, 0.02),
    "Calcium": (7.6, 1.5, 0.06),
    "Chloride": (105, 5, 0.05),
    "Creatinine": (1.5, 1.0, 0.06),
    "Bilirubin_direct": (0.5, 0.3, 0.002),
    "Glucose": (136, 40, 0.17),
    "Lactate": (2.6, 1.5, 0.03),
    "Magnesium": (2.0, 0.3, 0.06),
    "Phosphate": (3.5, 1.0, 0.04),
    "Potassium": (4.1, 0.6, 0.09),
    "Bilirubin_total": (1.5, 1.0, 0.015),
    "TroponinI": (2, 1, 0.01),
    "Hct": (30.8, 5, 0.09),
    "Hgb": (10.4, 2, 0.07),
    "PTT": (41, 15, 0.03),
    "WBC": (11, 5, 0.06),
    "Fibrinogen": (287, 100, 0.007),
    "Platelets": (196, 80, 0.06),
}


def _ranges() -> dict[str, tuple[float, float]]:
    """Plausible range per PSV column, from the PhysioNet vocabulary and the PSV mapping."""
    from core.params import load_section
    from core.vocabulary import load_vocabulary
    from ingest.config import IngestConfig
    from ingest.formats.wide import targets

    with tempfile.TemporaryDirectory() as tmp:
        vocab = load_vocabulary(_vocabulary(Path(tmp)))
    cfg = load_section(IngestConfig, "ingest", ROOT / "params.yaml")
    out = {}
    for col, m in cfg.psv_columns.items():
        t = targets(m)[0]
        spec = vocab.codes[t.code]
        conv = spec.units[t.unit or spec.unit]
        lo, hi = spec.range
        out[col] = ((lo - conv.offset) / conv.scale, (hi - conv.offset) / conv.scale)
    return out


def generate(d: Path, n_files: int, seed: int = 2019) -> None:
    """One seeded table of every row, split into one file per patient."""
    rng = np.random.default_rng(seed)
    ranges = _ranges()
    rows = np.clip(rng.poisson(38, n_files), 8, 336)
    n = int(rows.sum())
    frame = {}
    for c in COLUMNS:
        if c in SPEC:
            mean, sd, share = SPEC[c]
            # within the vocabulary's plausible range but for ~0.1% outliers (the real data's
            # order of magnitude; each quarantined record costs ~50 us to explain)
            lo, hi = ranges[c]
            v = np.clip(rng.normal(mean, sd, n), lo, hi)
            v = np.where(rng.random(n) < 0.001, v * 50 + 1000, v)
            v = np.round(v, 2)
            frame[c] = np.where(rng.random(n) < share, v, np.nan)
    pid = np.repeat(np.arange(n_files), rows)
    frame["Age"] = np.repeat(rng.integers(18, 100, n_files), rows).astype(float)
    frame["Gender"] = np.repeat(rng.integers(0, 2, n_files), rows).astype(float)
    unit1 = np.repeat(rng.integers(0, 2, n_files), rows).astype(float)
    frame["Unit1"], frame["Unit2"] = unit1, 1 - unit1
    frame["HospAdmTime"] = np.repeat(-np.round(rng.exponential(50, n_files), 2), rows)
    start = np.cumsum(rows) - rows
    frame["ICULOS"] = (np.arange(n) - np.repeat(start, rows) + 1).astype(float)
    onset = np.repeat(
        np.where(rng.random(n_files) < 0.07, rng.integers(1, 30, n_files), 10**6), rows
    )
    frame["SepsisLabel"] = (frame["ICULOS"] >= onset).astype(float)
    text = pd.DataFrame(frame)[COLUMNS].to_csv(
        sep="|", index=False, header=False, na_rep="NaN", float_format="%.6g"
    )
    lines = text.split("\n")
    header = "|".join(COLUMNS) + "\n"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n".join(lines[start[i] : start[i] + rows[i]])
        (d / f"p{i:06d}.psv").write_text(header + body + "\n")
    del pid


def _vocabulary(tmp: Path) -> Path:
    v = tmp / "vocabulary.yaml"
    text = (ROOT / "config/vocabulary.yaml").read_text()
    v.write_text(text.replace("include: []", f"include: [{ROOT / 'config/physionet2019.yaml'}]"))
    return v


def main() -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from pipelines.cli import main as cli

    n_files = int(os.environ.get("BENCH_INGEST_FILES", "20000"))
    d = Path(os.environ.get("BENCH_INGEST_DIR", f"/tmp/vitalrisk-bench-psv-v3-{n_files}"))
    if not d.is_dir() or len(list(d.glob("*.psv"))) != n_files:
        t0 = time.perf_counter()
        generate(d, n_files)
        print(f"generated {n_files} files in {time.perf_counter() - t0:.1f}s into {d}")
    files = sorted(d.glob("*.psv"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    t0 = time.perf_counter()
    opts = pacsv.ConvertOptions(column_types={c: pa.float64() for c in COLUMNS})
    parse = pacsv.ParseOptions(delimiter="|")
    tables = [pacsv.read_csv(f, parse_options=parse, convert_options=opts) for f in files]
    plain = pa.concat_tables(tables)
    t_plain = time.perf_counter() - t0
    clinical = [c for c in COLUMNS if c in SPEC]
    values = int(sum(len(plain) - plain.column(c).null_count for c in clinical))
    del tables, plain
    read_blocks(files[:1])  # warm the imports
    with tempfile.TemporaryDirectory(prefix="h12-bench-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text("ingest:\n  missing_consent: include\n")
        out = Path(tmp) / "out"
        t0 = time.perf_counter()
        code = cli(
            [
                "ingest",
                str(d),
                "--out",
                str(out),
                "--quiet",
                "--params",
                str(params),
                "--vocabulary",
                str(_vocabulary(Path(tmp))),
            ]
        )
        t_ingest = time.perf_counter() - t0
        import json

        report = json.loads((out / "ingest.json").read_text())
    result = {
        "files": n_files,
        "megabytes": round(mb, 1),
        "clinical_values": values,
        "ingest_exit_code": code,
        "ingest_seconds": round(t_ingest, 2),
        "ingest_values_per_s": round(values / t_ingest),
        "plain_pyarrow_csv_seconds": round(t_plain, 2),
        "plain_pyarrow_values_per_s": round(values / t_plain),
        "ingest_vs_plain_read": round(t_ingest / t_plain, 2),
        "accepted": report["totals"]["accepted"],
        "quarantined": report["totals"]["quarantined"],
        "unmapped": report["totals"]["unmapped"],
        "balanced": report["balanced"],
        "target_seconds": 20,
    }
    for k, v in result.items():
        print(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
