"""``vitalrisk ingest``: raw files -> canonical observations, patients, outcomes + quarantine.

DVC stage ``ingest``; also usable on any files or directories (format detected from the
extension and header). Prints read / accepted / quarantined per file and code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.errors import UserError

HELP = "read raw observation files (CSV, wide CSV, Parquet, FHIR, PSV), normalise, pseudonymise, quarantine bad rows"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files or directories (a directory = every recognised file inside)",
    )
    parser.add_argument(
        "--out", required=True, help="directory for observations/patients/outcomes(/cohort).parquet"
    )
    parser.add_argument(
        "--quarantine", default=None, help="directory for quarantine.parquet (default: --out)"
    )
    parser.add_argument(
        "--report", default=None, help="JSON report path (default: OUT/ingest.json)"
    )
    parser.add_argument(
        "--params",
        default="params.yaml",
        help="params file (section ingest); missing file -> defaults",
    )
    parser.add_argument(
        "--vocabulary", default=None, help="vocabulary YAML (default: config/vocabulary.yaml)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print totals only, not the per-code table"
    )


def _print_table(counts, report: dict, quiet: bool) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    if not quiet:
        table = Table(
            title="ingest: records per file and code (read = accepted + quarantined + consent-excluded + duplicates)"
        )
        for col in (
            "file",
            "code",
            "read",
            "accepted",
            "quarantined",
            "consent_excl",
            "duplicates",
        ):
            table.add_column(col, justify="left" if col in ("file", "code") else "right")
        for r in counts.itertuples(index=False):
            table.add_row(
                str(r.file),
                str(r.code),
                f"{r.read:,}",
                f"{r.accepted:,}",
                f"{r.quarantined:,}",
                f"{r.consent_excluded:,}",
                f"{r.duplicates:,}",
            )
        console.print(table)
    t = report["totals"]
    console.print(
        f"total: read {t['read']:,} = accepted {t['accepted']:,} + quarantined {t['quarantined']:,} "
        f"+ consent-excluded {t['consent_excluded']:,} + duplicates {t['duplicates']:,}"
        f" ({'balanced' if report['balanced'] else 'NOT BALANCED'})"
    )
    c = report["consent"]
    console.print(
        f"consent ({c['purpose']}): {c['patients_excluded']} of {c['patients_in_tables']} patients excluded, "
        f"{c['patients_without_consent_record']} without a consent record (policy: {c['missing_consent']})"
    )
    if report["quarantine_reasons"]:
        console.print(
            "quarantine reasons: "
            + ", ".join(f"{k} {v}" for k, v in report["quarantine_reasons"].items())
        )
    if report["skipped_files"]:
        console.print(f"skipped unrecognised files: {report['skipped_files']}")


def run(args: argparse.Namespace) -> int:
    from core.params import load_section, validate_section
    from core.vocabulary import load_vocabulary
    from governance.pseudonym import PseudonymKeyError, get_key
    from ingest.config import IngestConfig
    from ingest.ingestion import ingest
    from ingest.readers import StructuralError

    params = Path(args.params)
    cfg = (
        load_section(IngestConfig, "ingest", params)
        if params.is_file()
        else validate_section(IngestConfig, "ingest", {}, str(params))
    )
    try:
        vocab = load_vocabulary(args.vocabulary)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{args.vocabulary or 'config/vocabulary.yaml'}: cannot load vocabulary: {str(exc).splitlines()[0]}"
        ) from None
    try:
        key = get_key()
    except PseudonymKeyError as exc:
        raise UserError(str(exc)) from None
    t0 = time.perf_counter()
    try:
        result = ingest(args.inputs, cfg, vocab, key)
    except StructuralError as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out)
    qdir = Path(args.quarantine) if args.quarantine else out
    report_path = Path(args.report) if args.report else out / "ingest.json"
    for d in (out, qdir, report_path.parent):
        d.mkdir(parents=True, exist_ok=True)
    result.observations.to_parquet(out / "observations.parquet", index=False)
    result.patients.to_parquet(out / "patients.parquet", index=False)
    result.outcomes.to_parquet(out / "outcomes.parquet", index=False)
    if result.cohort is not None:
        result.cohort.to_parquet(out / "cohort.parquet", index=False)
    result.quarantine.to_parquet(qdir / "quarantine.parquet", index=False)
    result.report["seconds"] = round(time.perf_counter() - t0, 2)
    report_path.write_text(
        json.dumps(result.report, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    _print_table(result.counts, result.report, args.quiet)
    o = result.report["outputs"]
    print(
        f"wrote {o['observations']:,} observations, {o['patients']} patients, {o['outcomes']} outcomes"
        + (f", {o['cohort']} cohort rows" if result.cohort is not None else "")
        + f" to {out}; {o['quarantine']:,} quarantined to {qdir / 'quarantine.parquet'}; report {report_path}"
        + f" ({result.report['seconds']}s)"
    )
    return 0
