"""``vitalrisk ingest``: raw files -> canonical observations, patients, outcomes + quarantine.

DVC stage ``ingest``; also usable on any files or directories (format detected from the
extension and header). Prints read / accepted / quarantined per file and code.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError

HELP = "read raw observation files (CSV, wide CSV, Parquet, FHIR, HL7 v2, PSV), normalise, pseudonymise, quarantine bad rows"


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
            title="ingest: records per file and code (read = accepted + quarantined + consent-excluded + duplicates + unmapped)"
        )
        for col in (
            "file",
            "code",
            "read",
            "accepted",
            "quarantined",
            "consent_excl",
            "duplicates",
            "unmapped",
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
                f"{r.unmapped:,}",
            )
        console.print(table)
    t = report["totals"]
    console.print(
        f"total: read {t['read']:,} = accepted {t['accepted']:,} + quarantined {t['quarantined']:,} "
        f"+ consent-excluded {t['consent_excluded']:,} + duplicates {t['duplicates']:,}"
        f" + unmapped {t['unmapped']:,} ({'balanced' if report['balanced'] else 'NOT BALANCED'})"
    )
    if report["unmapped"]:
        top = list(report["unmapped"].items())[:5]
        console.print(
            "unmapped (not read; map them in ingest.wide_columns/psv_columns or the vocabulary), "
            "largest: " + ", ".join(f"{k} {v:,}" for k, v in top)
        )
    console.print(consent_line(report["consent"]))
    if report["quarantine_reasons"]:
        console.print(
            "quarantine reasons: "
            + ", ".join(f"{k} {v}" for k, v in report["quarantine_reasons"].items())
        )
    if report["skipped_files"]:
        shown = "; ".join(f"{x['path']}: {x['reason']}" for x in report["skipped_files"][:10])
        more = len(report["skipped_files"]) - 10
        console.print(f"skipped files: {shown}" + (f" (+{more} more)" if more > 0 else ""))


def consent_line(c: dict) -> str:
    """Patients and records counted the same way as the table above."""
    return (
        f"consent ({c['purpose']}): {c['patients_excluded']:,} of {c['patients_seen']:,} patients "
        f"excluded ({c['patients_refused']:,} refused, {c['patients_without_consent_record']:,} "
        f"without a consent record, policy missing_consent: {c['missing_consent']}); "
        f"{c['records_excluded']:,} records excluded"
    )


def check_not_empty(report: dict) -> None:
    """Stop (exit 2) rather than write an empty stage output, saying why and what to do."""
    o, t, c = report["outputs"], report["totals"], report["consent"]
    if o["observations"] or o["cohort"]:
        return
    if t["read"] == 0:
        raise UserError("ingest: no records in the inputs (nothing recognised to read)")
    if c["records_excluded"] and c["patients_excluded"] == c["patients_seen"]:
        how = (
            "supply a patients table with consent_"
            + c["purpose"]
            + "=true for the patients who agreed, or, for a de-identified dataset whose use is "
            "covered otherwise, set ingest.missing_consent: include"
        )
        raise UserError(
            f"ingest: 0 observations written: all {c['records_excluded']:,} records of "
            f"{c['patients_seen']:,} patients were excluded for want of consent ({c['purpose']}); {how}"
        )
    raise UserError(
        f"ingest: 0 observations written: {t['read']:,} records read, {t['quarantined']:,} "
        f"quarantined, {t['unmapped']:,} unmapped, {t['duplicates']:,} duplicates (see the report)"
    )


def stage_inputs(inputs: list[str], tmp: Path) -> tuple[list[str], dict[str, str]]:
    """Inputs at URLs (``s3://bucket/raw``) copied to ``tmp`` for the raw-format readers;
    (inputs to read, local copy -> URL) so that the report names the URLs."""
    from core import storage

    local: list[str] = []
    copies: dict[str, str] = {}
    for i, inp in enumerate(inputs):
        if not storage.is_url(inp):
            local.append(inp)
            continue
        try:
            dest = storage.download(inp, tmp / f"input{i}" / storage.name(inp))
        except FileNotFoundError:
            raise UserError(f"{inp}: input not found") from None
        local.append(str(dest))
        copies[str(dest)] = str(inp).rstrip("/")
    return local, copies


def relabel(copies: dict[str, str]) -> Callable[[str], str]:
    """Local copy paths (in file names and messages) back to the URLs they came from."""

    def fix(text: str) -> str:
        for loc, url in copies.items():
            text = text.replace(loc, url)
        return text

    return fix


def relabel_result(result, fix: Callable[[str], str]) -> None:  # type: ignore[no-untyped-def]
    """Every place ingest names a file: the report, the per-file counts, the quarantine."""
    report = result.report
    report["files"] = {fix(k): v for k, v in report["files"].items()}
    for item in report["skipped_files"]:
        item["path"] = fix(item["path"])
    result.counts["file"] = _fixed(result.counts["file"], fix)
    if "file" in result.quarantine.columns:
        result.quarantine["file"] = _fixed(result.quarantine["file"], fix)


def _fixed(col, fix: Callable[[str], str]):  # type: ignore[no-untyped-def]
    """``col`` with ``fix`` applied to its values, same dtype (categories renamed)."""
    import pandas as pd

    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.rename_categories(lambda c: fix(str(c)))
    return col.map(lambda v: fix(v) if isinstance(v, str) else v).astype(col.dtype)


def run(args: argparse.Namespace) -> int:
    import tempfile

    import pandas as pd

    from core import storage
    from core.params import load_section, validate_section
    from core.storage import StorageConfig
    from core.vocabulary import load_vocabulary
    from governance.pseudonym import PseudonymKeyError, get_key
    from ingest.config import IngestConfig
    from ingest.ingestion import ingest
    from ingest.raw import StructuralError

    params = Path(args.params)
    cfg = (
        load_section(IngestConfig, "ingest", params)
        if params.is_file()
        else validate_section(IngestConfig, "ingest", {}, str(params))
    )
    layout = (
        load_section(StorageConfig, "storage", params)
        if params.is_file()
        else validate_section(StorageConfig, "storage", {}, str(params))
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
    with tempfile.TemporaryDirectory(prefix="vitalrisk-ingest-") as tmp:
        inputs, copies = stage_inputs(args.inputs, Path(tmp))
        try:
            result = ingest(inputs, cfg, vocab, key)
        except StructuralError as exc:
            raise UserError(relabel(copies)(str(exc))) from None
    if copies:
        relabel_result(result, relabel(copies))
    _print_table(result.counts, result.report, args.quiet)
    check_not_empty(result.report)
    out = args.out
    qdir = args.quarantine or out
    report_path = args.report or storage.join(out, "ingest.json")
    for d in (out, qdir, storage.parent(report_path)):
        storage.makedirs(d)
    obs_path = storage.join(out, "observations.parquet")
    if layout.observations_layout == "partitioned":
        storage.write_bucketed(result.observations, obs_path, layout.patient_buckets)
    else:
        storage.remove(obs_path)  # a partitioned dataset of an earlier run
        storage.write_parquet(result.observations, obs_path)
    storage.write_parquet(result.patients, storage.join(out, "patients.parquet"))
    storage.write_parquet(result.outcomes, storage.join(out, "outcomes.parquet"))
    # always written (empty without a cohort input) so the train stage can depend on it
    cohort = (
        result.cohort
        if result.cohort is not None
        else pd.DataFrame({"patient_id": pd.Series(dtype=str)})
    )
    storage.write_parquet(cohort, storage.join(out, "cohort.parquet"))
    storage.write_parquet(result.quarantine, storage.join(qdir, "quarantine.parquet"))
    result.report["seconds"] = round(time.perf_counter() - t0, 2)
    storage.write_text(report_path, json.dumps(result.report, indent=2, sort_keys=False) + "\n")
    o = result.report["outputs"]
    print(
        f"wrote {o['observations']:,} observations, {o['patients']} patients, {o['outcomes']} outcomes"
        + (f", {o['cohort']} cohort rows" if result.cohort is not None else "")
        + f" to {out}; {o['quarantine']:,} quarantined to {storage.join(qdir, 'quarantine.parquet')}; report {report_path}"
        + f" ({result.report['seconds']}s)"
    )
    return 0
