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
  ``fcntl`` lock on the log, read the last entry, append their lines and ``fsync`` before
  releasing, so the chain stays linear. POSIX only; NFS locking is not relied upon.
* **Group commit**: :meth:`AuditLog.append_many` writes a batch of entries with one ``write``
  and one ``fsync``; the service answers a request only after the batch holding its entry
  returned (``serving/auditq.py``).
* **Canonical lines**: every line is exactly ``canonical_json(entry)``. ``verify`` re-serialises
  each line and refuses any that differs (duplicate keys, whose first value a parser would
  silently drop, re-ordered or re-formatted fields), so the bytes on disk are the bytes hashed.
* **Torn tail**: a crash in the middle of a ``write`` can leave an incomplete last line. Its
  entries were never fsynced, so no answer depended on them; :meth:`AuditLog.prepare` (run
  when the service starts) moves the fragment to ``<log>.torn-<time>`` and records an
  ``audit_recovered`` entry naming its size and SHA-256. Complete lines are never changed.

Other backends (a PostgreSQL chain for team deployments) implement :class:`AuditStore`:
``prepare``, ``append_many``, ``check_writable``, ``verify`` and ``close``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

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
    """The one serialisation that is hashed and written: sorted keys, no whitespace, UTF-8
    text, finite numbers only (``NaN`` is not JSON and would not read back the same)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(entry: dict[str, Any], key: bytes | None) -> str:
    """Hash of an entry without its own ``hash`` field; HMAC when a key is given."""
    body = canonical_json({k: v for k, v in entry.items() if k != "hash"}).encode("utf-8")
    if key:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


class _NotCanonical(ValueError):
    """A line that parses but is not the canonical form of what it parses to."""


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise _NotCanonical(f"duplicate key {dup!r} (a parser keeps only one of the values)")
    return out


def _no_constants(name: str) -> Any:
    raise _NotCanonical(f"{name} is not JSON")


_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_without_duplicates, parse_constant=_no_constants
)


def parse_canonical_line(raw: bytes) -> dict[str, Any]:
    """One log line (with its newline) -> the entry, refusing anything but canonical JSON.

    Raises ``ValueError`` with the reason: not JSON, not an object, a duplicate key, ``NaN``,
    or bytes that differ from ``canonical_json`` of the parsed entry (re-ordered keys, added
    whitespace, escaped characters): the line must be exactly what the writer produced.
    """
    if not raw.endswith(b"\n"):
        raise _NotCanonical("incomplete line (no newline: torn write or edit)")
    try:
        text = raw[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise _NotCanonical("not UTF-8 text") from None
    try:
        entry = _STRICT_DECODER.decode(text)
    except _NotCanonical:
        raise
    except ValueError:
        raise ValueError("not valid JSON (edited or torn write)") from None
    if not isinstance(entry, dict):
        raise _NotCanonical("not a JSON object")
    if canonical_json(entry) != text:
        raise _NotCanonical("not canonical JSON (re-ordered or re-formatted fields)")
    return entry


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


@dataclass(frozen=True)
class AuditRecord:
    """What one entry says, before the chain adds ``seq``, ``ts``, ``alg`` and the hashes."""

    actor: str
    action: str
    resource: str
    patients: list[str] | None = None
    model_version: str | None = None
    details: dict[str, Any] | None = None


class AuditStore(Protocol):
    """A hash-chained audit trail: the file :class:`AuditLog` here, a database chain later.

    ``append_many`` must be durable when it returns (the service answers requests on it),
    keep the records' order and return the stored entries; ``check_writable`` raises
    ``AuditLogError`` when an append would fail (readiness probes call it); ``prepare`` makes
    a store that a crash interrupted appendable again without touching complete entries;
    ``close`` writes what a store keeps back for speed (the file log's head sidecar).
    """

    def prepare(self) -> None: ...

    def append_many(self, records: Sequence[AuditRecord]) -> list[dict[str, Any]]: ...

    def check_writable(self) -> None: ...

    def verify(
        self, anchor: tuple[int, str] | None = None, allow_unkeyed: bool = False
    ) -> VerifyResult: ...

    def close(self) -> None: ...


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


def _check_record(rec: AuditRecord) -> list[str] | None:
    if not rec.actor or not rec.action:
        raise ValueError("audit entries need an actor and an action")
    return _check_patients(rec.patients)


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


def _ends_with_newline(fh: Any) -> bool:
    fh.seek(0, os.SEEK_END)
    if fh.tell() == 0:
        return True
    fh.seek(-1, os.SEEK_END)
    return bool(fh.read(1) == b"\n")


def _fsync_dir(path: Path) -> None:
    """Make a file's creation or rename durable (its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_entry(
    rec: AuditRecord, patients: list[str] | None, seq: int, prev: str, key: bytes | None
) -> dict[str, Any]:
    """The entry every store writes for ``rec`` at ``seq`` after ``prev`` (hash included)."""
    entry: dict[str, Any] = {
        "seq": seq,
        "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
        "actor": str(rec.actor),
        "action": str(rec.action),
        "resource": str(rec.resource),
        "patients": patients,
        "model_version": None if rec.model_version is None else str(rec.model_version),
        "details": rec.details or {},
        "alg": ALG_HMAC if key else ALG_PLAIN,
        "prev_hash": prev,
    }
    # round-trip so the hashed form is exactly what a reader will parse back
    try:
        entry = json.loads(json.dumps(entry, default=str, allow_nan=False))
    except ValueError:
        raise ValueError("audit details must not contain NaN or Infinity") from None
    entry["hash"] = entry_hash(entry, key)
    return entry


def check_link(
    entry: dict[str, Any], expected: int, prev_hash: str, key: bytes | None, allow_unkeyed: bool
) -> str:
    """Why ``entry`` does not continue the chain at ``expected`` (empty when it does)."""
    seq = entry.get("seq")
    if seq != expected:
        return f"seq {seq} where {expected} was expected (entry removed, inserted or reordered)"
    if entry.get("prev_hash") != prev_hash:
        return (
            f"prev_hash does not match the hash of entry {expected - 1} "
            "(entry removed, inserted or reordered)"
        )
    alg = entry.get("alg", ALG_PLAIN)
    if alg == ALG_HMAC and not key:
        return f"entry is keyed (hmac-sha256): set {KEY_ENV}"
    if alg == ALG_PLAIN and key and not allow_unkeyed:
        return f"unkeyed entry in a log verified with {KEY_ENV} (downgrade or forgery)"
    if alg not in (ALG_PLAIN, ALG_HMAC):
        return f"unknown hash algorithm {alg!r}"
    want = entry_hash(entry, key if alg == ALG_HMAC else None)
    if not hmac.compare_digest(str(entry.get("hash", "")), want):
        return "hash mismatch (entry edited)"
    return ""


def walk_chain(
    lines: Iterable[tuple[str, bytes]],
    key: bytes | None,
    allow_unkeyed: bool,
    res: VerifyResult,
) -> tuple[dict[int, str], tuple[int, str] | None]:
    """Check ``(place, canonical line with its newline)`` pairs in chain order: the one walk
    of every store's ``verify``. Returns the hash of each seq, and ``(seq, reason)`` of the
    first bad entry (None when the chain is intact); ``res`` gets the count and the head."""
    hashes: dict[int, str] = {}
    prev_hash, expected = GENESIS_HASH, 1
    for place, raw in lines:
        if not raw.strip():
            return hashes, (expected, f"{place}: empty line inside the log")
        try:
            entry = parse_canonical_line(raw)
        except ValueError as exc:
            return hashes, (expected, f"{place}: {exc}")
        problem = check_link(entry, expected, prev_hash, key, allow_unkeyed)
        if problem:
            return hashes, (expected, f"{place}: {problem}")
        hashes[expected] = prev_hash = str(entry["hash"])
        expected += 1
        res.entries += 1
    res.head_seq, res.head_hash = expected - 1, prev_hash
    return hashes, None


def check_point(
    seq: int, digest: str, hashes: dict[int, str], last: int, what: str
) -> tuple[int, str] | None:
    """A recorded ``(seq, hash)`` (head, anchor) against the chain just walked."""
    if seq > last:
        return (
            last + 1,
            f"{what} records seq {seq} but the log ends at seq {last} (tail truncated)",
        )
    if seq > 0 and hashes.get(seq) != digest:
        return seq, f"{what} hash for seq {seq} does not match the log (entry replaced)"
    return None


class AuditLog:
    """One append-only, hash-chained JSON Lines file shared by every writer.

    Writers: serving (API data access), models (promotions, rollbacks), export. Readers:
    ``vitalrisk audit verify`` / ``show``. Implements :class:`AuditStore`.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        key: bytes | str | None = None,
        head_interval: float = 0.0,
        keep_open: bool = False,
    ) -> None:
        self.path = Path(path) if path is not None else default_audit_path()
        #: rewrite the ``.head`` sidecar at most this often (a rename costs ~1-2 ms here);
        #: the head may then lag the log by that much after a crash, which ``verify`` reports
        #: as a warning. ``close`` writes the latest head. 0: after every append.
        self.head_interval = float(head_interval)
        self._head_pending: tuple[int, str] | None = None
        self._head_at = float("-inf")
        #: ``keep_open``: one descriptor kept between appends (reopened when the path is
        #: replaced or removed), and the tail this process wrote remembered, so a long-lived
        #: writer does not reopen the file and re-read its tail for every group
        self.keep_open = bool(keep_open)
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._fd_id: tuple[int, int] = (0, 0)
        self._known: tuple[int, int, str] | None = None  # (file size, seq, hash) we wrote last
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
        created = not self.path.exists()
        # 0o640: the log names pseudonyms and actors; not world-readable
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a+b") as fh:
            if created:
                _fsync_dir(self.path.parent)
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
        rec = AuditRecord(actor, action, resource, patients, model_version, details)
        return self.append_many([rec])[0]

    def append_many(self, records: Sequence[AuditRecord]) -> list[dict[str, Any]]:
        """Append ``records`` in order with one write and one ``fsync``; durable on return.

        All or nothing for the checks (a bad record fails the call before anything is
        written); raises ``AuditLogError`` when the log's tail is not a valid entry.
        """
        pats = [_check_record(r) for r in records]
        if not records:
            return []
        if self.keep_open:
            return self._append_kept_open(records, pats)
        with self._locked() as fh:
            seq, prev = self._tail(fh)
            entries, data = self._lines(records, pats, seq, prev)
            fh.seek(0, os.SEEK_END)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            self._write_head(entries[-1]["seq"], entries[-1]["hash"])
        return entries

    def _lines(
        self, records: Sequence[AuditRecord], pats: list[list[str] | None], seq: int, prev: str
    ) -> tuple[list[dict[str, Any]], bytes]:
        entries: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for rec, patients in zip(records, pats, strict=True):
            seq += 1
            entry = self._entry(rec, patients, seq, prev)
            prev = entry["hash"]
            entries.append(entry)
            lines.append((canonical_json(entry) + "\n").encode("utf-8"))
        return entries, b"".join(lines)

    def _kept_fd(self) -> int:
        """The kept descriptor; a new one when the path now names another file (or none)."""
        try:
            st = os.stat(self.path)
            now: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            now = None
        if self._fd is not None and now != self._fd_id:
            os.close(self._fd)
            self._fd, self._known = None, None
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            if now is None:
                _fsync_dir(self.path.parent)
            st = os.fstat(fd)
            self._fd, self._fd_id, self._known = fd, (st.st_dev, st.st_ino), None
        return self._fd

    def _append_kept_open(
        self, records: Sequence[AuditRecord], pats: list[list[str] | None]
    ) -> list[dict[str, Any]]:
        with self._mutex:  # flock does not exclude threads that share one descriptor
            fd = self._kept_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if self._known is not None and self._known[0] == size:
                    seq, prev = self._known[1], self._known[2]
                else:  # first append, or another process appended since
                    with os.fdopen(os.dup(fd), "rb") as fh:
                        seq, prev = self._tail(fh)
                entries, data = self._lines(records, pats, seq, prev)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                self._known = (size + len(data), entries[-1]["seq"], entries[-1]["hash"])
                self._write_head(entries[-1]["seq"], entries[-1]["hash"])
            except BaseException:
                self._known = None
                raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return entries

    def _entry(
        self, rec: AuditRecord, patients: list[str] | None, seq: int, prev: str
    ) -> dict[str, Any]:
        return make_entry(rec, patients, seq, prev, self.key)

    def _tail(self, fh: Any) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry under the lock; refuses a torn or foreign tail."""
        if not _ends_with_newline(fh):
            raise AuditLogError(
                f"{self.path}: last line is incomplete (torn write or edit); "
                "run `vitalrisk audit verify` before appending"
            )
        last_raw = _read_last_line(fh)
        if not last_raw:
            return 0, GENESIS_HASH
        try:
            last = json.loads(last_raw)
            return int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditLogError(
                f"{self.path}: last line is not a valid audit entry ({exc}); "
                "run `vitalrisk audit verify` before appending"
            ) from None

    def check_writable(self) -> None:
        """Raise ``AuditLogError`` unless an append would find a writable log and a valid tail."""
        try:
            with self._locked() as fh:
                self._tail(fh)
        except OSError as exc:
            raise AuditLogError(
                f"{self.path}: cannot open for appending ({exc.strerror})"
            ) from None

    def prepare(self) -> None:
        """Make a log that a crash interrupted appendable again (see "Torn tail" above).

        Only an incomplete last line (no newline) is moved aside; a complete but invalid last
        line is left alone and appends keep failing until someone looks at it.
        """
        with self._locked() as fh:
            if _ends_with_newline(fh):
                return
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_CHUNK * 16))
            data = fh.read()
            cut = size - len(data) + data.rfind(b"\n") + 1 if b"\n" in data else 0
            fh.seek(cut)
            torn = fh.read()
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            aside = self.path.with_name(f"{self.path.name}.torn-{stamp}")
            with aside.open("wb") as out:
                out.write(torn)
                out.flush()
                os.fsync(out.fileno())
            os.truncate(fh.fileno(), cut)
            os.fsync(fh.fileno())
        details = {
            "torn_bytes": len(torn),
            "torn_sha256": hashlib.sha256(torn).hexdigest(),
            "saved_as": aside.name,
        }
        logger.warning(
            "%s: moved an incomplete last line (%d bytes, never acknowledged) to %s",
            self.path,
            len(torn),
            aside.name,
        )
        self.append("vitalrisk", "audit_recovered", self.path.name, details=details)

    def _write_head(self, seq: int, digest: str) -> None:
        """Atomic replace, without fsync: after a crash the head may lag the (fsynced) log,
        which ``verify`` reports as a warning; a head AHEAD of the log is an error. Called
        under the log's lock, so heads of several writers never go backwards."""
        now = time.monotonic()
        if now - self._head_at < self.head_interval:
            self._head_pending = (seq, digest)
            return
        self._head_pending, self._head_at = None, now
        tmp = self.head_path.with_name(self.head_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(canonical_json({"seq": seq, "hash": digest}) + "\n", encoding="utf-8")
        os.replace(tmp, self.head_path)

    def close(self) -> None:
        """Write the head held back by ``head_interval`` (if another writer has not moved the
        log on since; its head is then newer) and release a kept descriptor."""
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd, self._known = None, None
        if self._head_pending is None:
            return
        with contextlib.suppress(OSError, AuditLogError), self._locked() as fh:
            seq, digest = self._tail(fh)
            if (seq, digest) == self._head_pending:
                self._head_at = float("-inf")
                self._write_head(seq, digest)
        self._head_pending = None

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
        with self.path.open("rb") as fh:
            lines = ((f"line {n}", raw) for n, raw in enumerate(fh, start=1))
            hashes, bad = walk_chain(lines, self.key, allow_unkeyed, res)
        if bad is not None:
            return fail(*bad)
        err = self._check_anchors(res, hashes, anchor)
        return fail(*err) if err else res

    def _check_link(
        self, entry: dict[str, Any], expected: int, prev_hash: str, allow_unkeyed: bool
    ) -> str:
        return check_link(entry, expected, prev_hash, self.key, allow_unkeyed)

    def _check_anchors(
        self, res: VerifyResult, hashes: dict[int, str], anchor: tuple[int, str] | None
    ) -> tuple[int | None, str] | None:
        """The head sidecar and an external anchor against the chain just walked."""
        if self.head_path.exists():
            try:
                head = json.loads(self.head_path.read_text(encoding="utf-8"))
                h_seq, h_hash = int(head["seq"]), str(head["hash"])
            except (ValueError, KeyError, TypeError):
                return None, f"{self.head_path}: unreadable head file"
            err = self._check_point(h_seq, h_hash, hashes, res.head_seq, "head file")
            if err:
                return err
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
            return self._check_point(anchor[0], anchor[1], hashes, res.head_seq, "anchor")
        return None

    _check_point = staticmethod(check_point)


#: the chain in PostgreSQL: one row per entry (its canonical line, exactly as hashed) and one
#: head row, locked by every append, so appends of all replicas queue up in one order
AUDIT_PG_DDL = f"""
CREATE TABLE IF NOT EXISTS audit_entries (
    seq BIGINT PRIMARY KEY,
    line TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}') ON CONFLICT (id) DO NOTHING
"""
AUDIT_PG_LOCK = 0x7669_7461_6C02


class PgAuditStore:
    """The hash chain in PostgreSQL, shared by every serving replica and CLI (team mode).

    Each ``append_many`` is one transaction: ``SELECT ... FOR UPDATE`` on the head row (every
    other writer waits there), the entries chained after the head, the head moved on, commit.
    So the chain stays linear across processes and hosts, and a batch is either wholly in
    the chain or not at all (a killed writer leaves nothing torn: ``prepare`` has nothing
    to recover). Entries are the same canonical JSON lines as the file log's, hashed the same
    way, and ``verify`` walks them with the same code (:func:`walk_chain`); the head row plays
    the ``.head`` sidecar's part (tail truncation), ``--anchor`` works as for the file.
    """

    def __init__(self, location: str, key: bytes | str | None = None) -> None:
        from core.pg import redact

        self.location = location
        self.name = redact(location)
        if isinstance(key, str):
            key = key.encode("utf-8")
        self.key: bytes | None = key if key is not None else key_from_env()
        self._mutex = threading.Lock()
        self._conn: Any = None
        if self.key is None and production_mode():
            logger.warning("%s not set in production mode: audit hashes are plain SHA-256", KEY_ENV)

    def _connection(self) -> Any:
        from core.pg import connect, ensure_table

        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                conn = connect(self.location, autocommit=True)
                ensure_table(conn, AUDIT_PG_DDL, AUDIT_PG_LOCK)
            except ConnectionError as exc:
                raise AuditLogError(str(exc)) from None
            self._conn = conn
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._mutex:
            conn = self._connection()  # AuditLogError when it cannot connect
            import psycopg

            try:
                with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise AuditLogError(f"{self.name}: {type(exc).__name__} {reason}") from None

    def prepare(self) -> None:
        """Nothing is ever torn in a transaction: only make sure the tables exist."""
        with self._transaction():
            pass

    def check_writable(self) -> None:
        with self._transaction() as conn:
            row = conn.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
            if row is None:
                raise AuditLogError(f"{self.name}: audit_head row missing; run `audit verify`")

    def append(
        self,
        actor: str,
        action: str,
        resource: str,
        patients: list[str] | None = None,
        model_version: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        rec = AuditRecord(actor, action, resource, patients, model_version, details)
        return self.append_many([rec])[0]

    def append_many(self, records: Sequence[AuditRecord]) -> list[dict[str, Any]]:
        """Append ``records`` in order in one transaction; committed (durable) on return."""
        pats = [_check_record(r) for r in records]
        if not records:
            return []
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
            ).fetchone()
            if row is None:
                raise AuditLogError(f"{self.name}: audit_head row missing; run `audit verify`")
            seq, prev = int(row[0]), str(row[1])
            entries: list[dict[str, Any]] = []
            for rec, patients in zip(records, pats, strict=True):
                seq += 1
                entry = make_entry(rec, patients, seq, prev, self.key)
                prev = entry["hash"]
                entries.append(entry)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO audit_entries (seq, line) VALUES (%s, %s)",
                    [(e["seq"], canonical_json(e)) for e in entries],
                )
            conn.execute(
                "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
                (entries[-1]["seq"], entries[-1]["hash"]),
            )
        return entries

    def _lines(self, conn: Any) -> Iterator[tuple[int, str]]:
        with conn.cursor(name="audit_walk") as cur:  # server-side: not all in memory
            cur.itersize = 5_000
            cur.execute("SELECT seq, line FROM audit_entries ORDER BY seq")
            yield from cur

    def entries(self) -> Iterator[dict[str, Any]]:
        """Parsed entries in chain order (read in one transaction, then yielded: a caller
        that stops early or raises holds no lock)."""
        with self._transaction() as conn:
            lines = [line for _, line in self._lines(conn)]
        for line in lines:
            yield json.loads(line)

    def head(self) -> tuple[int, str]:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT seq, line FROM audit_entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return 0, GENESIS_HASH
        return int(row[0]), str(json.loads(row[1])["hash"])

    def verify(
        self, anchor: tuple[int, str] | None = None, allow_unkeyed: bool = False
    ) -> VerifyResult:
        """The file log's checks on the database chain (same walk, same canonical JSON)."""
        res = VerifyResult(ok=True, entries=0)

        def fail(seq: int | None, reason: str) -> VerifyResult:
            res.ok, res.first_bad_seq, res.reason = False, seq, reason
            return res

        with self._transaction() as conn:
            lines = (
                (f"seq {seq}", (line + "\n").encode("utf-8")) for seq, line in self._lines(conn)
            )
            hashes, bad = walk_chain(lines, self.key, allow_unkeyed, res)
            head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        if bad is not None:
            return fail(*bad)
        if head is None:
            if res.entries:
                res.warnings.append(
                    "audit_head row missing: tail truncation is only detectable with --anchor"
                )
        else:
            err = check_point(int(head[0]), str(head[1]), hashes, res.head_seq, "head row")
            if err:
                return fail(*err)
        if anchor is not None:
            err = check_point(anchor[0], anchor[1], hashes, res.head_seq, "anchor")
            if err:
                return fail(*err)
        if not res.entries:
            res.warnings.append(f"{self.name}: no audit entries yet")
        return res

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def open_audit_store(
    location: str | Path | None = None, **file_options: Any
) -> AuditLog | PgAuditStore:
    """The file log, or the database chain for a ``postgresql://`` location."""
    from core.pg import is_pg_url

    if is_pg_url(location):
        return PgAuditStore(str(location))
    return AuditLog(location, **file_options)


def default_audit_store() -> AuditLog | PgAuditStore:
    """The chain the service writes: the database chain when ``VITALRISK_SERVE_DB_URL`` is set
    (team mode), else the file (``VITALRISK_AUDIT_LOG`` or ``logs/audit.jsonl``). Promotions,
    rollbacks and exports go to the same chain as the replicas' data access."""
    from core.pg import DATABASE_URL_ENV

    return open_audit_store(os.environ.get(DATABASE_URL_ENV, "").strip() or None)
