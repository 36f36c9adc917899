"""``vitalrisk audit``: verify, show and anchor the tamper-evident audit log."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.errors import UserError

HELP = "verify the hash-chained audit log (exit 1 on tampering), show entries, print the head"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    for name, help_ in (
        ("verify", "check every entry's hash and link; name the first bad seq"),
        ("show", "print entries (JSON Lines), optionally filtered"),
        ("head", "print 'SEQ:HASH' of the last entry, to keep as an external anchor"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--log",
            default=None,
            help="audit log file, or a postgresql://HOST/DB?schema=NAME chain (default: "
            "$VITALRISK_SERVE_DB_URL when set, else $VITALRISK_AUDIT_LOG or logs/audit.jsonl)",
        )
        if name == "verify":
            p.add_argument(
                "--anchor",
                default=None,
                metavar="SEQ:HASH",
                help="externally kept head (from `vitalrisk audit head`): detects tail truncation",
            )
            p.add_argument(
                "--allow-unkeyed",
                action="store_true",
                help="accept plain SHA-256 entries written before VITALRISK_AUDIT_KEY was set",
            )
        if name == "show":
            p.add_argument("--action", default=None, help="only entries with this action")
            p.add_argument("--patient", default=None, help="only entries naming this pseudonym")
            p.add_argument(
                "--source-id",
                default=None,
                help="only entries naming this source identifier (pseudonymised with "
                "VITALRISK_PSEUDONYM_KEY, never printed): answers 'who used my data?'",
            )
            p.add_argument("--last", type=int, default=None, help="only the last N entries")


def _parse_anchor(text: str) -> tuple[int, str]:
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise UserError(
            f"--anchor {text!r}: expected SEQ:HASH as printed by `vitalrisk audit head`"
        )
    return int(seq), digest


def _store(args: argparse.Namespace) -> tuple[Any, str]:
    """The store ``--log`` names (a file or a database chain) and its name for messages."""
    import os

    from core.pg import is_pg_url, redact
    from governance.audit import PgAuditStore, open_audit_store
    from serving.config import DATABASE_URL_ENV

    location = args.log or os.environ.get(DATABASE_URL_ENV) or None
    try:
        store = open_audit_store(location)
    except ValueError as exc:
        raise UserError(f"--log: {exc}") from None
    if isinstance(store, PgAuditStore):
        return store, redact(str(location))
    assert not is_pg_url(location)
    return store, str(store.path)


def run(args: argparse.Namespace) -> int:
    from governance.audit import AuditLogError

    log, name = _store(args)
    try:
        return _run(args, log, name)
    except AuditLogError as exc:  # the database chain cannot be read
        raise UserError(str(exc)) from None
    finally:
        log.close()


def _run(args: argparse.Namespace, log: Any, name: str) -> int:
    from governance.audit import AuditLog

    if args.audit_command == "verify":
        anchor = _parse_anchor(args.anchor) if args.anchor else None
        res = log.verify(anchor=anchor, allow_unkeyed=args.allow_unkeyed)
        for w in res.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if res.ok:
            print(f"{name}: OK, {res.entries} entries, head {res.head_seq}:{res.head_hash}")
            return 0
        print(
            f"{name}: TAMPERED at seq {res.first_bad_seq}: {res.reason}",
            file=sys.stderr,
        )
        return 1
    if isinstance(log, AuditLog) and not log.path.exists():
        raise UserError(f"{log.path}: no audit log (set --log or VITALRISK_AUDIT_LOG)")
    try:
        if args.audit_command == "head":
            seq, digest = log.head()
            print(f"{seq}:{digest}")
            return 0
        rows = list(log.entries())
    except (ValueError, KeyError) as exc:
        raise UserError(f"{name}: {exc}; run `vitalrisk audit verify`") from None
    if args.action:
        rows = [r for r in rows if r.get("action") == args.action]
    wanted = args.patient
    if args.source_id:
        from governance.pseudonym import PseudonymKeyError, get_key, pseudonymise

        try:
            wanted = pseudonymise(args.source_id, get_key())
        except PseudonymKeyError as exc:
            raise UserError(str(exc)) from None
    if wanted:
        rows = [r for r in rows if wanted in (r.get("patients") or [])]
    if args.last is not None:
        rows = rows[-args.last :] if args.last > 0 else []
    for r in rows:
        print(json.dumps(r, sort_keys=True))
    return 0
