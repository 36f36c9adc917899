"""``vitalrisk evaluate``: test-set metrics vs NEWS2 with CIs, plots and model card (DVC stage)."""

from __future__ import annotations

import argparse

from core.errors import UserError

HELP = "evaluate the trained model against NEWS2 on the test patients (metrics, plots, model card)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="train stage output (run.json)")
    parser.add_argument("--features", default=None, help="features.parquet (for SHAP importance)")
    parser.add_argument("--dictionary", default=None, help="feature_dictionary.json")
    parser.add_argument(
        "--outcomes", default=None, help="outcomes.parquet: exact event times for lead time"
    )
    parser.add_argument("--metrics", required=True, help="metrics JSON to write (everything)")
    parser.add_argument(
        "--headline", default=None, help="headline test metrics JSON (DVC metrics, one table)"
    )
    parser.add_argument("--plots", required=True, help="folder for DVC plot CSVs")
    parser.add_argument("--figures", required=True, help="folder for PNG figures")
    parser.add_argument("--card", required=True, help="model card markdown to write")
    parser.add_argument("--params", default="params.yaml")


def _event_times(path: str | None):  # type: ignore[no-untyped-def]
    import pandas as pd

    from pipelines._modelio import read_optional_parquet

    out = read_optional_parquet(path)
    if out is None or out.empty or not {"patient_id", "time"} <= set(out.columns):
        return None
    t = pd.to_datetime(out["time"], utc=True)
    return t.groupby(out["patient_id"]).min().to_dict()


def _cohort_event_times(features):  # type: ignore[no-untyped-def]
    """Exact event times a cohort frame carries (train's ``event_time``), else None."""
    if features is None or "event_time" not in features.columns:
        return None
    return features.dropna(subset=["event_time"]).set_index("patient_id")["event_time"].to_dict()


def run(args: argparse.Namespace) -> int:
    from core.params import load_section
    from models.config import EvaluateConfig, RegisterConfig
    from models.tracking import StoreMismatchError
    from models.workflow import evaluate_and_log
    from pipelines._modelio import read_features, read_json

    config = load_section(EvaluateConfig, "evaluate", args.params)
    reg = load_section(RegisterConfig, "register", args.params)
    from models.cohort import features_path

    fpath = features_path(args.model_dir, args.features)  # a cohort model: its labelled rows
    features = read_features(fpath) if fpath else None
    try:
        metrics = evaluate_and_log(
            args.model_dir,
            features,
            config,
            args.metrics,
            args.plots,
            args.figures,
            args.card,
            read_json(args.dictionary, "feature dictionary"),
            _cohort_event_times(features) or _event_times(args.outcomes),
            reg.model_name,
            headline_path=args.headline,
        )
    except StoreMismatchError as exc:
        raise UserError(str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"{args.model_dir}: {exc}") from None
    m, n = metrics["model"], metrics["news2"]
    print(
        f"test AUROC model {m['auroc']:.3f} vs NEWS2 {n['auroc']:.3f}; "
        f"AUPRC {m['auprc']:.3f} vs {n['auprc']:.3f} (prevalence {metrics['prevalence']:.3f})"
    )
    return 0
