"""``vitalrisk monitor``: drift, data quality and performance of the served model.

Reference = the training features (sampled); current = a time window of the prediction log.
Writes ``summary.json`` (verdict ``ok``/``warn``/``retrain``/``insufficient_data`` with
reasons) and, built from it and the same tests, ``report.html`` and ``performance.html`` (once
outcomes exist) to ``--out``; adds the run to the Evidently workspace (``make monitor-ui``;
the drift demo to its own project), and exits 0 / 10 / 20 / 3 for ok / warn / retrain /
insufficient data so that a scheduler can act (``--exit-zero`` for DVC). ``--outcomes FILE`` feeds
outcomes back first; ``--retrain`` closes the loop with ``dvc repro``; ``--drift-demo KIND``
simulates a drifted cohort, scores it with the champion and monitors it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.params import DEFAULT_PARAMS, load_section, read_params

logger = logging.getLogger(__name__)

HELP = "drift/quality/performance report of logged predictions vs training features (Evidently)"
DEFAULT_LOG = "logs/predictions.sqlite"
DEFAULT_WORKSPACE = "workspace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--features",
        default="artifacts/features/features.parquet",
        help="training feature matrix: the reference (default: %(default)s)",
    )
    parser.add_argument(
        "--dictionary",
        default="artifacts/features/feature_dictionary.json",
        help="feature dictionary, maps features to vocabulary codes (optional)",
    )
    parser.add_argument(
        "--log",
        default=None,
        help=f"prediction log (default: $VITALRISK_PREDICTION_LOG or {DEFAULT_LOG})",
    )
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file")
    parser.add_argument("--out", default="reports/monitoring", help="report directory")
    parser.add_argument(
        "--workspace",
        default=None,
        help=f"Evidently workspace (default: $EVIDENTLY_WORKSPACE or {DEFAULT_WORKSPACE})",
    )
    parser.add_argument("--no-workspace", action="store_true", help="do not add to the workspace")
    parser.add_argument(
        "--window-end", default=None, help="end of the current window (ISO-8601; default: latest)"
    )
    parser.add_argument(
        "--reference-model",
        default="champion",
        help="registry alias whose predictions on the reference give the reference risk "
        "distribution, or 'none' (default: %(default)s)",
    )
    parser.add_argument(
        "--outcomes",
        default=None,
        help="CSV/Parquet of outcomes (request_id + label/event, or patient_id, time, event) "
        "to join to logged predictions before monitoring",
    )
    parser.add_argument(
        "--exit-zero", action="store_true", help="exit 0 whatever the verdict (DVC stage)"
    )
    parser.add_argument(
        "--if-no-log",
        choices=["fail", "skip"],
        default="fail",
        help="no prediction log yet: fail (exit 2) or write a no-data summary and exit 0",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="when the verdict is 'retrain' (or with --force), add --new-data and run dvc repro",
    )
    parser.add_argument("--force", action="store_true", help="with --retrain: whatever the verdict")
    parser.add_argument(
        "--new-data", default=None, help="with --retrain: directory of newly labelled raw files"
    )
    parser.add_argument("--data-dir", default="data", help="with --retrain: raw data directory")
    parser.add_argument("--repo", default=".", help="with --retrain: DVC repository root")
    parser.add_argument(
        "--dry-run", action="store_true", help="with --retrain: show what dvc repro would run"
    )
    parser.add_argument(
        "--drift-demo",
        default=None,
        choices=["none", "hr_offset", "older", "spo2_missing"],
        help="simulate this drift, score it with the champion, log it and monitor it",
    )
    parser.add_argument(
        "--demo-patients", type=int, default=300, help="with --drift-demo: cohort size"
    )
    parser.add_argument(
        "--demo-out",
        default="reports/monitoring_demo",
        help="with --drift-demo: output root (a subfolder per drift kind)",
    )


# --------------------------------------------------------------------------- helpers
def _log_path(args: argparse.Namespace) -> Path | str:
    """``--log``, else where serving writes: the replicas' database
    (``VITALRISK_SERVE_DB_URL``), then ``VITALRISK_PREDICTION_LOG``, else the default file. A ``postgresql://``
    location stays a string (``Path`` would fold its ``//``)."""
    from core.pg import is_pg_url
    from serving.config import DATABASE_URL_ENV

    chosen = (
        args.log
        or os.environ.get(DATABASE_URL_ENV)
        or os.environ.get("VITALRISK_PREDICTION_LOG")
        or DEFAULT_LOG
    )
    return str(chosen) if is_pg_url(chosen) else Path(chosen)


def _workspace(args: argparse.Namespace) -> Path:
    return Path(args.workspace or os.environ.get("EVIDENTLY_WORKSPACE") or DEFAULT_WORKSPACE)


def _load_config(params: str) -> Any:
    from monitoring.config import MonitorConfig

    return load_section(MonitorConfig, "monitor", params)


def _model_name(params: str) -> str:
    section = read_params(params).get("register") or {}
    return str(section.get("model_name") or "vitalrisk-deterioration")


def _read_features(path: str) -> Any:
    """The reference matrix: a file, or the Dask stage's folder of parts / a URL (core.storage)."""
    import pandas as pd

    from core import storage

    p = path if storage.is_url(path) else Path(path)
    if not storage.exists(p):
        raise UserError(f"{p}: reference feature matrix not found (run `vitalrisk features`)")
    try:
        if storage.is_url(p) or storage.is_dir(p):
            from features.io import read_features

            return read_features(p)
        return pd.read_parquet(p)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{p}: not a readable Parquet feature matrix ({exc})") from None


def _read_dictionary(path: str | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    try:
        return dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def score_reference(reference: Any, model_name: str, alias: str) -> tuple[Any, float | None]:
    """Add the model's predicted risk on the reference rows (``probability``), if loadable;
    also return the model's alert threshold (performance is judged at it)."""
    if alias.lower() == "none":
        return reference, None
    try:
        from models import tracking

        info, model = tracking.load_by_alias(model_name, alias)
    except Exception as exc:  # no registry, no alias, unreadable artefact: monitor without it
        logger.warning("no reference risk (%s@%s not loadable: %s)", model_name, alias, exc)
        return reference, None
    out = reference.copy()
    out["probability"] = model.predict_proba(out)
    logger.info("scored %d reference rows with %s v%s", len(out), model_name, info.version)
    threshold = (model.metadata or {}).get("threshold")
    return out, None if threshold is None else float(threshold)


def training_label_horizons(dictionary: Mapping[str, Any] | None, config: Any) -> Any:
    """Label horizon per care setting the model was trained with (the feature dictionary's),
    else ``monitor.performance.label_horizon_hours``."""
    horizon = ((dictionary or {}).get("label") or {}).get("horizon_hours")
    if isinstance(horizon, Mapping) and horizon:
        return {str(k): float(v) for k, v in horizon.items()}
    if isinstance(horizon, int | float):
        return {"*": float(horizon)}
    return dict(config.performance.label_horizon_hours)


def ingest_outcomes(path: str, log: Path | str, horizon_hours: Mapping[str, float] | float) -> int:
    """Join an outcome file to logged predictions and append to the ``outcomes`` table."""
    from monitoring import outcomes as oc
    from monitoring import prediction_log as plog

    if not plog.log_exists(log):
        raise UserError(f"{log}: prediction log not found; outcomes need logged predictions")
    try:
        raw = oc.read_outcome_file(path)
        if "request_id" in raw.columns:
            preds = plog.read_predictions_for(
                log, request_ids=raw["request_id"].astype(str).tolist()
            )
        else:
            preds = plog.read_predictions_for(
                log, patient_ids=raw["patient_id"].astype(str).tolist()
            )
        rows = oc.outcome_rows(raw, preds, horizon_hours)
    except oc.OutcomeFileError as exc:
        msg = str(exc)
        raise UserError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    n = plog.write_outcomes(log, rows)
    logger.info("outcomes: %d file rows -> %d labelled predictions in %s", len(raw), n, log)
    return n


def write_outputs(result: Any, out: Path) -> dict[str, str]:
    """``summary.json`` and the HTML pages built from it: verdict and reasons first."""
    from monitoring import evidently_reports as er
    from monitoring import html

    out.mkdir(parents=True, exist_ok=True)
    files = {"html": str(out / "report.html"), "json": str(out / "summary.json")}
    header = html.verdict_header(result.summary)
    if result.snapshots.get("drift") is None:  # too little data: our page, no widgets
        Path(files["html"]).write_text(html.standalone(header, "vitalrisk monitoring"))
    else:
        er.save_html(result.snapshots["drift"], files["html"], header=header)
    if "performance" in result.snapshots:
        files["performance_html"] = str(out / "performance.html")
        perf = html.performance_header(result.summary["performance"])
        er.save_html(result.snapshots["performance"], files["performance_html"], header=perf)
    else:
        (out / "performance.html").unlink(missing_ok=True)
    result.summary["files"] = files
    Path(files["json"]).write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    return files


def retrain(
    repo: Path, new_data: str | None, data_dir: str, dry_run: bool
) -> subprocess.CompletedProcess:
    """Copy newly labelled raw files into the data directory, re-record it, ``dvc repro``.

    The register stage's promotion gate then decides whether the retrained model becomes
    the champion; nothing here touches the registry.
    """
    dvc = [sys.executable, "-m", "dvc"]
    if new_data:
        src = Path(new_data)
        if not src.is_dir():
            raise UserError(f"{src}: --new-data must be a directory of raw files")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = repo / data_dir / "feedback" / stamp
        if dry_run:
            logger.info("would copy %s -> %s", src, dest)
        else:
            shutil.copytree(src, dest)
            logger.info("added new data %s -> %s", src, dest)
            if (repo / f"{data_dir}.dvc").is_file():
                subprocess.run([*dvc, "add", data_dir], cwd=repo, check=True)
    cmd = [*dvc, "repro", *(["--dry"] if dry_run else [])]
    logger.info("running %s in %s", " ".join(cmd[2:]), repo)
    proc = subprocess.run(cmd, cwd=repo, text=True, capture_output=True)
    sys.stderr.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise UserError(f"dvc repro failed in {repo} (exit {proc.returncode})")
    return proc


def _no_data(out: Path, reason: str) -> int:
    """Summary for a run with nothing to monitor: verdict ok, status no_data, stale files gone."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", "performance.html"):
        (out / name).unlink(missing_ok=True)
    summary = {
        "verdict": "ok",
        "status": "no_data",
        "exit_code": 0,
        "reasons": [f"[info] {reason}"],
        "created_at": datetime.now(UTC).isoformat(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"monitor: {reason}; wrote {out / 'summary.json'}")
    return 0


# --------------------------------------------------------------------------- drift demo
def simulated_features(
    params: str | Path,
    drift: str,
    n_patients: int,
    seed: int,
    raw_dir: Path,
    purpose: str = "care",
    simulate: Mapping[str, Any] | None = None,
    first_id: int = 0,
) -> Any:
    """Feature matrix of a simulated cohort, through the pipeline's own functions.

    The simulator's raw files (written to ``raw_dir``, replaced if present),
    ``ingest.ingestion.ingest`` and ``features.build.build_feature_matrix``, with the
    ``simulate``/``ingest``/``features`` params of ``params`` (``drift``, ``n_patients``,
    ``seed`` and the consent ``purpose`` overridden, plus any other ``simulate`` keys, e.g.
    ``{"hr_offset_bpm": 5}``). The drift demo, the monitor's tests and its benchmark all draw
    their cohorts here. ``first_id``: number the raw source ids from ``MRN-<first_id + 1>``,
    so that a cohort of other people never reuses the training cohort's ids (which would
    give them the training patients' pseudonyms).
    """
    from core.vocabulary import load_vocabulary
    from features.build import build_feature_matrix
    from features.config import FeaturesConfig
    from governance.pseudonym import get_key
    from ingest.config import IngestConfig
    from ingest.ingestion import ingest
    from simulate.cohort import simulate_cohort, write_cohort
    from simulate.config import SimulateConfig

    raw = read_params(params)
    sim = SimulateConfig.model_validate(
        {
            **(raw.get("simulate") or {}),
            **dict(simulate or {}),
            "drift": drift,
            "n_patients": n_patients,
            "seed": seed,
        }
    )
    ing = IngestConfig.model_validate({**(raw.get("ingest") or {}), "purpose": purpose})
    fcfg = load_section(FeaturesConfig, "features", params)
    vocab = load_vocabulary()
    raw_dir = Path(raw_dir)
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    write_cohort(renumber(simulate_cohort(sim), first_id), raw_dir, sim)
    result = ingest([raw_dir], ing, vocab, get_key())
    return build_feature_matrix(result.observations, result.patients, result.outcomes, fcfg, vocab)


#: the drift demo's patients are other people: source ids from MRN-900001 (the simulator's
#: cohorts are at most 100,000 patients, numbered from MRN-000001)
DEMO_FIRST_ID = 900_000


def renumber(cohort: Any, first_id: int) -> Any:
    """The cohort with source ids ``MRN-000123`` moved to ``MRN-<first_id + 123>``."""
    if not first_id:
        return cohort
    from dataclasses import replace

    def moved(frame: Any) -> Any:
        if "patient_id" not in frame.columns:
            return frame
        number = frame["patient_id"].str.removeprefix("MRN-").astype(int) + first_id
        return frame.assign(patient_id="MRN-" + number.map("{:06d}".format))

    return replace(
        cohort,
        patients=moved(cohort.patients),
        outcomes=moved(cohort.outcomes),
        observations=moved(cohort.observations),
        snapshot=moved(cohort.snapshot),
    )


def drift_demo(args: argparse.Namespace) -> Path:
    """Simulate ``--drift-demo KIND``, ingest, build features, score with the champion, log.

    Everything runs through the functions the pipeline and the service use (see
    ``simulated_features``) and the registered pyfunc. The simulated outcomes are fed back as
    labels, so the demo report has a performance section too. Returns the demo prediction log.
    """
    import tempfile

    import numpy as np
    import pandas as pd

    from models import tracking
    from monitoring import prediction_log as plog
    from serving.runtime import label_horizons

    raw = read_params(args.params)
    seed = int((raw.get("simulate") or {}).get("seed", 42)) + 1000  # new patients
    base = Path(args.demo_out) / args.drift_demo
    try:
        info, model = tracking.load_by_alias(_model_name(args.params), "champion")
    except LookupError as exc:
        raise UserError(f"--drift-demo needs a champion model: {exc} (run dvc repro)") from None
    shutil.rmtree(base / "raw", ignore_errors=True)  # raw ids of an older demo
    # the raw files carry source ids: only in a temporary directory, never under reports/;
    # serving scores for care: the care consent applies, not the training one
    with tempfile.TemporaryDirectory(prefix="vitalrisk-drift-demo-") as tmp:
        feats = simulated_features(
            args.params,
            args.drift_demo,
            args.demo_patients,
            seed,
            Path(tmp) / "raw",
            purpose="care",
            first_id=DEMO_FIRST_ID,
        )
    proba = np.asarray(model.predict_proba(feats), dtype=float)
    horizons = label_horizons(model)
    setting = feats["setting"].astype(str)
    log = base / "predictions.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(log) + suffix).unlink(missing_ok=True)
    feature_cols = [c for c in feats.columns if c not in {"patient_id", "time", "label"}]
    n = len(feats)
    request_ids = [f"demo-{args.drift_demo}-{i}" for i in range(n)]
    plog.write_predictions(
        log,
        pd.DataFrame(
            {
                "request_id": request_ids,
                "scored_at": pd.to_datetime(feats["time"], utc=True),
                "patient_id": feats["patient_id"].astype(str).to_numpy(),
                "model_name": info.name,
                "model_version": info.version,
                "role": "champion",
                "probability": proba,
                "news2_total": feats.get("news2_total"),
                "features": feats[feature_cols].to_dict(orient="records"),
                "setting": setting.to_numpy(),
                "horizon_hours": setting.map(lambda s: horizons.get(s, horizons.get("*"))),
            }
        ),
    )
    plog.write_outcomes(
        log,
        pd.DataFrame(
            {
                "request_id": request_ids,
                "patient_id": feats["patient_id"].astype(str).to_numpy(),
                "label": feats["label"].to_numpy(dtype=int),
            }
        ),
    )
    logger.info(
        "drift demo %s: %d patients, %d scored prediction times -> %s",
        args.drift_demo,
        args.demo_patients,
        n,
        log,
    )
    return log


# --------------------------------------------------------------------------- entry point
def run(args: argparse.Namespace) -> int:
    from core.vocabulary import load_vocabulary
    from monitoring import evidently_reports as er
    from monitoring import monitor as mon
    from monitoring.prediction_log import log_exists

    config = _load_config(args.params)
    log: Path | str = _log_path(args)
    if args.drift_demo:
        log = drift_demo(args)
        args.out = str(Path(args.demo_out) / args.drift_demo)
        args.window_end = None
        config = config.model_copy(update={"window_days": 3650.0})  # the whole simulated span
    if log_exists(log):  # first, read-only: a damaged log is one line, and is never written to
        from monitoring.log_check import check_log

        check_log(log)
    dictionary = _read_dictionary(args.dictionary)
    if args.outcomes:
        ingest_outcomes(args.outcomes, log, training_label_horizons(dictionary, config))
    if not log_exists(log):
        if args.retrain and args.force:
            retrain(Path(args.repo), args.new_data, args.data_dir, args.dry_run)
            return 0
        if args.if_no_log == "skip":
            return _no_data(Path(args.out), f"{log}: no prediction log yet (nothing served)")
        raise UserError(f"{log}: prediction log not found (serve the model or set --log)")

    features = _read_features(args.features)
    reference = mon.sample_reference(features, config)
    reference, threshold = score_reference(
        reference, _model_name(args.params), args.reference_model
    )
    threshold = threshold if threshold is not None else config.performance.alert_threshold
    window_end = None
    if args.window_end:
        try:
            window_end = datetime.fromisoformat(args.window_end)
        except ValueError:
            raise UserError(
                f"--window-end {args.window_end!r}: expected an ISO-8601 time"
            ) from None
    tags = [f"drift-demo:{args.drift_demo}"] if args.drift_demo else []
    try:
        result = mon.monitor_log(
            reference,
            str(log),
            config,
            load_vocabulary(),
            dictionary,
            window_end,
            tags=tags,
            alert_threshold=threshold,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    files = write_outputs(result, Path(args.out))
    project = config.demo_project if args.drift_demo else config.project
    experiment = os.environ.get("DVC_EXP_NAME")
    ws_note = None
    if experiment and not args.drift_demo:  # an experiment's features are not production's
        ws_note = f"not added to the workspace: inside DVC experiment {experiment}"
    elif not args.no_workspace:
        ws = _workspace(args)
        snaps = [v for v in result.snapshots.values() if v is not None]
        runs = er.add_to_workspace(ws, project, snaps)
        result.summary["workspace"] = {"path": str(ws), "project": project, **runs}
        ws_note = f"workspace: {ws} project {project} (make monitor-ui)"
        Path(files["json"]).write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    s = result.summary
    print(f"verdict: {s['verdict']} (exit code {s['exit_code']})")
    for reason in s["reasons"]:
        print(f"  {reason}")
    print(f"report: {files['html']}  summary: {files['json']}")
    if ws_note:
        print(ws_note)
    if args.retrain and (args.force or result.verdict == "retrain"):
        retrain(Path(args.repo), args.new_data, args.data_dir, args.dry_run)
    elif args.retrain:
        print(f"retrain: skipped (verdict {result.verdict}; --force to retrain anyway)")
    return 0 if args.exit_zero else result.exit_code
