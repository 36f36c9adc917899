"""Tamper-evident audit log: append-only JSON Lines, each entry hash-chained to the previous one.

Who touched which patients' data, which model was promoted or rolled back, what was exported:
regulators expect this record to be complete and unaltered. Each entry carries ``prev_hash``
(the previous entry's ``hash``) and ``hash`` = SHA-256 over the canonical JSON of the entry
(sorted keys, no whitespace) including ``prev_hash``. Editing, removing, reordering or inserting
an entry breaks the chain and ``verify`` names the first bad ``seq``.

Trade-offs, documented here because they decide what the log can prove:

* **Plain SHA-256** (no key) detects accidental corruption and naive edits, but someone with
  write access can recompute every hash after an edit. Set ``VITALRISK_AUDIT_KEY`` to make each
  ``hash`` an HMAC-SHA256: without the key nobody can forge a valid chain, and verifying then
  needs the key too (keep it in the secret store, not beside the log). A log written with a key
  fails verification without it, and a verifier with a key refuses unkeyed entries (no
  downgrade).
* **Tail truncation** cannot be seen from the chain alone (a prefix of a valid chain is
  valid). Every append also rewrites a sidecar ``<log>.head`` with the last ``seq`` and
  ``hash``; ``verify`` reports a log that ends before the head. An attacker who can delete both
  can still truncate: copy ``vitalrisk audit head`` to somewhere they cannot write (a ticket,
  a WORM bucket, a daily e-mail) and pass it back as ``verify --anchor SEQ:HASH``.
* **Audit key rotation**: entries do not name their key, so a log is verified with one key.
  Rotate by starting a new log file (new ``VITALRISK_AUDIT_LOG``) whose first entry
  (action ``log_rotated``) records the old log's path and ``vitalrisk audit head``; keep the
  old key to verify the old file.
* **Concurrency**: writers from several processes (BentoML workers, a CLI) take an exclusive
  ``fcntl`` lock on the log, read the last entry, append one line and ``fsync`` before
  releasing, so the chain stays linear. POSIX only; NFS locking is not relied upon.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from governance.pseudonym import is_pseudonym, production_mode

logger = logging.getLogger(__name__)

PATH_ENV = "VITALRISK_AUDIT_LOG"
KEY_ENV = "VITALRISK_AUDIT_KEY"
DEFAULT_PATH = Path("logs") / "audit.jsonl"
GENESIS_HASH = "0" * 64
ALG_PLAIN = "sha256"
ALG_HMAC = "hmac-sha256"
_TAIL_CHUNK = 65536


class AuditLogError(RuntimeError):
    """The log cannot be appended to safely (corrupt tail, unreadable file)."""


def default_audit_path() -> Path:
    """``VITALRISK_AUDIT_LOG`` if set, else ``logs/audit.jsonl`` (relative to the cwd)."""
    env = os.environ.get(PATH_ENV, "").strip()
    return Path(env) if env else DEFAULT_PATH


def key_from_env() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode("utf-8") if key else None


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, UTF-8 text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(entry: dict[str, Any], key: bytes | None) -> str:
    """Hash of an entry without its own ``hash`` field; HMAC when a key is given."""
    body = canonical_json({k: v for k, v in entry.items() if k != "hash"}).encode("utf-8")
    if key:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


@dataclass
class VerifyResult:
    """Outcome of :meth:`AuditLog.verify`; truthy when the log is intact."""

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    reason: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def _check_patients(patients: list[str] | None) -> list[str] | None:
    if patients is None:
        return None
    if isinstance(patients, str):
        raise ValueError("patients must be a list of pseudonyms, not a single string")
    out = [str(p) for p in patients]
    bad = [p for p in out if not is_pseudonym(p)]
    if bad:
        # never echo the raw value: it may be a real identifier
        raise ValueError(
            f"audit entries take pseudonyms only (p_ + 20 hex): {len(bad)} of {len(out)} "
            "patient ids are not pseudonyms"
        )
    return out


def _read_last_line(fh: Any) -> bytes:
    """Last non-empty line of a binary file handle (reads backwards in chunks)."""
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end == 0:
        return b""
    buf = b""
    pos = end
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return buf.rstrip(b"\n")


class AuditLog:
    """One append-only, hash-chained JSON Lines file shared by every writer.

    Writers: serving (API data access), models (promotions, rollbacks), export. Readers:
    ``vitalrisk audit verify`` / ``show``.
    """

    def __init__(self, path: str | Path | None = None, key: bytes | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_audit_path()
        if isinstance(key, str):
            key = key.encode("utf-8")
        self.key: bytes | None = key if key is not None else key_from_env()
        if self.key is None and production_mode():
            logger.warning(
                "%s not set in production mode: audit hashes are plain SHA-256, so anyone "
                "with write access to %s can rewrite history undetected",
                KEY_ENV,
                self.path,
            )

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0o640: the log names pseudonyms and actors; not world-readable
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def append(
        self,
        actor: str,
        action: str,
        resource: str,
        patients: list[str] | None = None,
        model_version: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one entry and return it (with ``seq``, ``ts``, ``prev_hash``, ``hash``).

        ``patients`` must be pseudonyms (``ValueError`` otherwise): the audit log is itself an
        artifact that leaves the secure enclave. ``details`` must be JSON-serialisable (other
        values are stored as their ``str``).
        """
        if not actor or not action:
            raise ValueError("audit entries need an actor and an action")
        pats = _check_patients(patients)
        with self._locked() as fh:
            last_raw = _read_last_line(fh)
            if last_raw:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    raise AuditLogError(
                        f"{self.path}: last line is incomplete (torn write or edit); "
                        "run `vitalrisk audit verify` before appending"
                    )
                try:
                    last = json.loads(last_raw)
                    seq, prev = int(last["seq"]) + 1, str(last["hash"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise AuditLogError(
                        f"{self.path}: last line is not a valid audit entry ({exc}); "
                        "run `vitalrisk audit verify` before appending"
                    ) from None
            else:
                seq, prev = 1, GENESIS_HASH
            entry: dict[str, Any] = {
                "seq": seq,
                "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                "actor": str(actor),
                "action": str(action),
                "resource": str(resource),
                "patients": pats,
                "model_version": None if model_version is None else str(model_version),
                "details": details or {},
                "alg": ALG_HMAC if self.key else ALG_PLAIN,
                "prev_hash": prev,
            }
            # round-trip so the hashed form is exactly what a reader will parse back
            entry = json.loads(json.dumps(entry, default=str))
            entry["hash"] = entry_hash(entry, self.key)
            line = (canonical_json(entry) + "\n").encode("utf-8")
            fh.seek(0, os.SEEK_END)
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
            self._write_head(seq, entry["hash"])
        return entry

    def _write_head(self, seq: int, digest: str) -> None:
        """Atomic replace, without fsync: after a crash the head may lag the (fsynced) log by
        an entry, which ``verify`` reports as a warning; a head AHEAD of the log is an error."""
        tmp = self.head_path.with_name(self.head_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(canonical_json({"seq": seq, "hash": digest}) + "\n", encoding="utf-8")
        os.replace(tmp, self.head_path)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Parsed entries in file order (raises ``AuditLogError`` on an unparsable line)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    yield json.loads(raw)
                except ValueError:
                    raise AuditLogError(f"{self.path}:{lineno}: not valid JSON") from None

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry in the file (``(0, GENESIS_HASH)`` when empty)."""
        if not self.path.exists():
            return 0, GENESIS_HASH
        with self.path.open("rb") as fh:
            raw = _read_last_line(fh)
        if not raw:
            return 0, GENESIS_HASH
        last = json.loads(raw)
        return int(last["seq"]), str(last["hash"])

    def verify(
        self, anchor: tuple[int, str] | None = None, allow_unkeyed: bool = False
    ) -> VerifyResult:
        """Walk the chain and report the first entry that is edited, missing, moved or forged.

        ``anchor`` is an externally kept ``(seq, hash)``: the log must contain that exact
        entry (catches tail truncation even when the ``.head`` sidecar was removed too).
        """
        res = VerifyResult(ok=True, entries=0)

        def fail(seq: int | None, reason: str) -> VerifyResult:
            res.ok, res.first_bad_seq, res.reason = False, seq, reason
            return res

        if not self.path.exists():
            if self.head_path.exists() or anchor:
                return fail(1, f"{self.path}: log file is missing but a head/anchor exists")
            res.warnings.append(f"{self.path}: no audit log yet")
            return res
        hashes: dict[int, str] = {}
        prev_hash, expected = GENESIS_HASH, 1
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    return fail(expected, f"line {lineno}: empty line inside the log")
                try:
                    entry = json.loads(raw)
                except ValueError:
                    return fail(expected, f"line {lineno}: not valid JSON (edited or torn write)")
                if not isinstance(entry, dict):
                    return fail(expected, f"line {lineno}: not a JSON object")
                seq = entry.get("seq")
                if seq != expected:
                    return fail(
                        expected,
                        f"line {lineno}: seq {seq} where {expected} was expected "
                        "(entry removed, inserted or reordered)",
                    )
                if entry.get("prev_hash") != prev_hash:
                    return fail(
                        seq,
                        f"line {lineno}: prev_hash does not match the hash of entry {seq - 1} "
                        "(entry removed, inserted or reordered)",
                    )
                alg = entry.get("alg", ALG_PLAIN)
                if alg == ALG_HMAC and not self.key:
                    return fail(seq, f"line {lineno}: entry is keyed (hmac-sha256): set {KEY_ENV}")
                if alg == ALG_PLAIN and self.key and not allow_unkeyed:
                    return fail(
                        seq,
                        f"line {lineno}: unkeyed entry in a log verified with {KEY_ENV} "
                        "(downgrade or forgery)",
                    )
                if alg not in (ALG_PLAIN, ALG_HMAC):
                    return fail(seq, f"line {lineno}: unknown hash algorithm {alg!r}")
                want = entry_hash(entry, self.key if alg == ALG_HMAC else None)
                if not hmac.compare_digest(str(entry.get("hash", "")), want):
                    return fail(seq, f"line {lineno}: hash mismatch (entry edited)")
                hashes[seq] = want
                prev_hash, expected = want, expected + 1
                res.entries += 1
        res.head_seq, res.head_hash = expected - 1, prev_hash

        if self.head_path.exists():
            try:
                head = json.loads(self.head_path.read_text(encoding="utf-8"))
                h_seq, h_hash = int(head["seq"]), str(head["hash"])
            except (ValueError, KeyError, TypeError):
                return fail(None, f"{self.head_path}: unreadable head file")
            err = self._check_point(h_seq, h_hash, hashes, res.head_seq, "head file")
            if err:
                return fail(*err)
            if h_seq < res.head_seq:
                res.warnings.append(
                    f"head file is {res.head_seq - h_seq} entries behind the log "
                    "(crash between append and head update?)"
                )
        elif res.entries:
            res.warnings.append(
                f"{self.head_path} missing: tail truncation is only detectable with --anchor"
            )
        if anchor is not None:
            err = self._check_point(anchor[0], anchor[1], hashes, res.head_seq, "anchor")
            if err:
                return fail(*err)
        return res

    @staticmethod
    def _check_point(
        seq: int, digest: str, hashes: dict[int, str], last: int, what: str
    ) -> tuple[int, str] | None:
        if seq > last:
            return (
                last + 1,
                f"{what} records seq {seq} but the log ends at seq {last} (tail truncated)",
            )
        if seq > 0 and hashes.get(seq) != digest:
            return seq, f"{what} hash for seq {seq} does not match the log (entry replaced)"
        return None
