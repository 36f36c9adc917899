"""Write the golden feature fixture (run deliberately: ``python -m tests.features.golden.make_golden``).

The fixture pins today's features bit for bit so that refactoring the feature engine cannot
change them unnoticed. Inputs are stored, not re-simulated, so a change to the simulator or
to ``config/vocabulary.yaml`` by another area does not move the goalposts: the simulated
demo-style cohort (ward spot checks, home wearables, labs, events, COPD patients on SpO2
scale 2), a copy of the vocabulary and the features configs live next to the expected output.

Files (all small): ``observations.parquet``, ``patients.parquet``, ``outcomes.parquet``,
``vocabulary.yaml``, ``configs.json``; per config ``expected_<name>.parquet`` (the stage's
rows: ids, label and every feature as float64) and ``serving_<name>.parquet`` (one patient
per call at one time each, the few-queries path). ``meta.json`` records how it was made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

#: feature configs of the fixture: the stage's params (as float64, so bits are not hidden by
#: the float32 cast) and a variant that exercises other windows, statistics and families
CONFIG_OVERRIDES: dict[str, dict] = {
    "params": {"dtype": "float64"},
    "variant": {
        "dtype": "float64",
        "codes": ["heart_rate", "spo2", "steps", "sleep_duration", "lactate", "o2_support"],
        "lookback_hours": 200.0,
        "windows": {
            "hours": {"vital": [1.0, 6.0, 30.0], "activity": [12.0, 48.0], "sleep": [48.0]},
            "stats": {
                "continuous": ["slope", "max", "count", "std", "sum"],
                "count": ["sum", "mean", "max"],
                "binary": ["min", "mean"],
            },
        },
        "baseline": {"start_days": 5.0, "end_days": 0.5, "min_count": 5, "compare_hours": 12.0},
        "missingness": {"window_hours": 8.0},
        "families": {"shock_index": False, "sleep": True, "static": True},
        "static": ["age", "cm_*"],
    },
}


def simulate_inputs() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from simulate.cohort import simulate_cohort
    from simulate.config import SimulateConfig

    cohort = simulate_cohort(
        SimulateConfig(
            seed=7,
            n_patients=30,
            followup_days=(3.0, 8.0),
            enrolment_days=4,
            event_rate=0.4,
            wearable_intervals_min=[5, 15],
            wearable_interval_weights=[0.3, 0.7],
        )
    )
    pats = cohort.patients[[c for c in cohort.patients.columns if not c.startswith("_")]]
    pats = pats.drop(columns=["source_system"])
    # an early event (times after it are excluded) and tied / duplicated observations
    outs = cohort.outcomes.copy()
    early = pats.iloc[[1, 2, 5]][["patient_id", "followup_start"]].rename(
        columns={"followup_start": "time"}
    )
    early = early.assign(time=early["time"] + pd.Timedelta(hours=40), event="rapid_response")
    outs = pd.concat([outs, early], ignore_index=True)
    obs = cohort.observations.drop(columns=["source"])
    rng = np.random.default_rng(0)
    dup = obs.sample(200, random_state=1)
    tie = obs.sample(200, random_state=2).assign(value=lambda d: d["value"] + rng.integers(1, 3))
    obs = pd.concat([obs, dup, tie], ignore_index=True)
    obs = obs.sort_values(["patient_id", "time", "code"], kind="stable", ignore_index=True)
    return obs, pats.reset_index(drop=True), outs.reset_index(drop=True)


def configs(params_features: dict) -> dict[str, dict]:
    out = {}
    for name, over in CONFIG_OVERRIDES.items():
        base = dict(params_features) if name == "params" else {}
        base.update(over)
        out[name] = base
    return out


def serving_queries(expected: pd.DataFrame, seed: int = 3) -> pd.DataFrame:
    """One (patient, time) per patient among the stage's rows: the serving-sized calls."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, g in expected.groupby("patient_id", sort=True):
        rows.append(g.iloc[int(rng.integers(0, len(g)))][["patient_id", "time"]])
    return pd.DataFrame(rows).reset_index(drop=True)


def main() -> None:
    import yaml

    from core.vocabulary import load_vocabulary
    from features.build import build_feature_matrix_with_report, compute_features
    from features.config import FeaturesConfig

    obs, pats, outs = simulate_inputs()
    obs.to_parquet(HERE / "observations.parquet", index=False, compression="zstd")
    pats.to_parquet(HERE / "patients.parquet", index=False, compression="zstd")
    outs.to_parquet(HERE / "outcomes.parquet", index=False, compression="zstd")
    shutil.copy(ROOT / "config" / "vocabulary.yaml", HERE / "vocabulary.yaml")
    vocab = load_vocabulary(HERE / "vocabulary.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["features"]
    cfgs = configs(params)
    (HERE / "configs.json").write_text(json.dumps(cfgs, indent=1, sort_keys=True))
    meta: dict = {"reports": {}}
    for name, raw in cfgs.items():
        config = FeaturesConfig.model_validate(raw)
        frame, report = build_feature_matrix_with_report(obs, pats, outs, config, vocab)
        frame.to_parquet(HERE / f"expected_{name}.parquet", index=False, compression="zstd")
        meta["reports"][name] = {"rows": report.rows, "excluded": report.excluded}
        q = serving_queries(frame)
        single = [
            compute_features(
                obs[obs["patient_id"] == r.patient_id], pats, q.iloc[[i]], config, vocab
            )
            for i, r in enumerate(q.itertuples())
        ]
        pd.concat(single, ignore_index=True).to_parquet(
            HERE / f"serving_{name}.parquet", index=False, compression="zstd"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.strip()
    meta["made_at_commit"] = commit
    (HERE / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
