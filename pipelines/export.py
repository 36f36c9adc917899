"""``vitalrisk export``: a minimised research dataset (consent, date shift, age bands, k-anonymity).

Refuses (exit 2, nothing written) when the cohort is not k-anonymous over its quasi-identifiers;
every export and every refusal is recorded in the audit log.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from core.errors import UserError

HELP = "write a minimised research dataset (research consent, date shift, age bands, k-anonymity)"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--observations",
        required=True,
        help="ingest output folder with observations/patients/outcomes.parquet",
    )
    parser.add_argument("--out", required=True, help="folder to write the research dataset into")
    parser.add_argument("--params", default="params.yaml", help="params file (section export)")
    parser.add_argument("--k", type=int, default=None, help="override export.k")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--audit-log",
        default=None,
        help="audit log (default: $VITALRISK_AUDIT_LOG or logs/audit.jsonl)",
    )


def actor() -> str:
    return os.environ.get("VITALRISK_ACTOR") or getpass.getuser()


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from core.params import load_section, validate_section
    from governance.audit import default_audit_store, open_audit_store
    from governance.export import ExportConfig, ExportRefused, build_export
    from governance.pseudonym import PseudonymKeyError, get_key

    config = load_section(ExportConfig, "export", args.params)
    if args.k is not None:
        config = validate_section(
            ExportConfig, "export", {**config.model_dump(), "k": args.k}, source="--k"
        )
    src, out = Path(args.observations), Path(args.out)
    paths = {n: src / f"{n}.parquet" for n in ("observations", "patients", "outcomes")}
    for name in ("observations", "patients"):
        if not paths[name].is_file():
            raise UserError(f"{paths[name]}: not found (run `vitalrisk ingest` first)")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out}: folder exists and is not empty (use --overwrite)")
    try:
        key = get_key()
    except PseudonymKeyError as exc:
        raise UserError(str(exc)) from None

    obs = pd.read_parquet(paths["observations"])
    patients = pd.read_parquet(paths["patients"])
    outcomes = pd.read_parquet(paths["outcomes"]) if paths["outcomes"].is_file() else None
    audit = open_audit_store(args.audit_log) if args.audit_log else default_audit_store()
    try:
        result = build_export(obs, patients, outcomes, config, key)
    except ExportRefused as exc:
        audit.append(
            actor(),
            "export_refused",
            str(out),
            details={"reason": str(exc), "k": config.k, "source": str(src)},
        )
        raise UserError(f"export refused: {exc}") from None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result.patients.to_parquet(tmp / "patients.parquet", index=False)
        result.observations.to_parquet(tmp / "observations.parquet", index=False)
        if result.outcomes is not None:
            result.outcomes.to_parquet(tmp / "outcomes.parquet", index=False)
        (tmp / "manifest.json").write_text(
            json.dumps(result.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = audit.append(
        actor(),
        "export",
        str(out),
        patients=result.exported_pseudonyms,
        details={k: result.manifest[k] for k in ("patients", "observations", "k", "k_achieved")}
        | {"quasi_identifiers": config.quasi_identifiers, "source": str(src)},
    )
    print(
        f"exported {result.manifest['patients']} patients "
        f"({result.manifest['consent']['patients_excluded']} without research consent excluded), "
        f"{result.manifest['observations']} observations to {out}; "
        f"k-anonymity {result.manifest['k_achieved']} >= {config.k}; audit seq {entry['seq']}"
    )
    return 0
