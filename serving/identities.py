"""Caller ids behind pseudonyms, sealed per API key: only the key that sent an id sees it again.

Every stored row (prediction log, answers, audit, landing) carries pseudonyms only. To show a
clinician the identifiers their own system sent, the service keeps, per API key *name*, each
pseudonym with the caller's id sealed by AES-GCM under a key derived for that API key name
(HKDF-SHA256 of ``VITALRISK_IDENTITY_KEY``, or of the pseudonym key when it is not set; the
associated data binds the row to its key name and pseudonym, so a row copied to another key
does not open). A key can only resolve the rows it wrote: the worklist, the summary and the
CDS cards of key A never show an id that key B sent. The file is ``serve.feedback.
identity_map`` (env ``VITALRISK_IDENTITY_MAP``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

logger = logging.getLogger(__name__)

KEY_ENV = "VITALRISK_IDENTITY_KEY"
_DDL = """
CREATE TABLE IF NOT EXISTS identities (
    key_name TEXT NOT NULL, pseudonym TEXT NOT NULL, sealed BLOB NOT NULL,
    PRIMARY KEY (key_name, pseudonym)
)"""
_PG_DDL = _DDL.replace("BLOB", "BYTEA")
#: first one wins; the same text on SQLite (3.24+ upsert syntax) and PostgreSQL
_INSERT = (
    "INSERT INTO identities (key_name, pseudonym, sealed) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
#: advisory-lock key under which the PostgreSQL table is created (core.pg.ensure_table)
_PG_LOCK = 0x7669_7461_6C03


def _master() -> bytes:
    secret = os.environ.get(KEY_ENV)
    if secret:
        return secret.encode("utf-8")
    from governance.pseudonym import get_key

    return b"identity-map:" + get_key()


@lru_cache(maxsize=256)
def _aead(key_name: str, master: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"vitalrisk identity map v1",
        info=key_name.encode("utf-8"),
    ).derive(master)
    return AESGCM(key)


def seal(key_name: str, pseudonym: str, caller_id: str, master: bytes | None = None) -> bytes:
    nonce = os.urandom(12)
    aad = f"{key_name}\x00{pseudonym}".encode()
    return nonce + _aead(key_name, master or _master()).encrypt(nonce, caller_id.encode(), aad)


def unseal(key_name: str, pseudonym: str, sealed: bytes, master: bytes | None = None) -> str | None:
    aad = f"{key_name}\x00{pseudonym}".encode()
    try:
        plain = _aead(key_name, master or _master()).decrypt(sealed[:12], sealed[12:], aad)
    except (InvalidTag, ValueError):
        return None
    return plain.decode("utf-8")


class IdentityMap:
    """The sealed caller-id rows of one service (thread-safe; one connection per process)."""

    def __init__(self, location: str | Path) -> None:
        from core.pg import QmarkConnection, ensure_table, is_pg_url

        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | QmarkConnection
        self.path: Path | None = None
        if is_pg_url(location):
            self._conn = QmarkConnection(str(location))
            ensure_table(self._conn.conn, _PG_DDL, _PG_LOCK)
        else:
            self.path = Path(location)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_DDL)
        self._known: set[tuple[str, str]] = set()
        self._master = _master()

    def remember(self, key_name: str, pairs: Iterable[tuple[str, str]]) -> int:
        """Store ``(pseudonym, caller id)`` pairs sent by ``key_name`` (first one wins)."""
        new = [(p, c) for p, c in pairs if (key_name, p) not in self._known and key_name]
        if not new:
            return 0
        rows = [(key_name, p, seal(key_name, p, c, self._master)) for p, c in new]
        with self._lock, self._conn:  # one transaction (SQLite and PostgreSQL alike)
            self._conn.executemany(_INSERT, rows)
            self._known.update((key_name, p) for p, _ in new)
        return len(rows)

    def resolve(self, key_name: str, pseudonyms: Sequence[str] | None = None) -> dict[str, str]:
        """pseudonym -> caller id, for the rows ``key_name`` wrote (all, or those asked for)."""
        with self._lock:
            if pseudonyms is None:
                rows = self._conn.execute(
                    "SELECT pseudonym, sealed FROM identities WHERE key_name = ?", (key_name,)
                ).fetchall()
            else:
                rows = []
                wanted = list(dict.fromkeys(pseudonyms))
                for i in range(0, len(wanted), 500):
                    chunk = wanted[i : i + 500]
                    rows += self._conn.execute(
                        "SELECT pseudonym, sealed FROM identities WHERE key_name = ? AND "
                        f"pseudonym IN ({', '.join('?' * len(chunk))})",
                        (key_name, *chunk),
                    ).fetchall()
        out = {}
        for pseudonym, sealed in rows:
            caller = unseal(key_name, pseudonym, bytes(sealed), self._master)
            if caller is None:
                logger.warning("identity map: a row of key %s does not open; skipped", key_name)
                continue
            out[str(pseudonym)] = caller
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()
