"""API keys, scopes and per-key rate limits.

Key specs (``VITALRISK_API_KEYS``, comma-separated, or one per line in the file named by
``VITALRISK_API_KEYS_FILE``; ``#`` starts a comment)::

    NAME:SCOPES:SECRET           e.g.  ward-app:score+read:s3cret-value
    NAME:SCOPES:sha256:HEXDIGEST e.g.  device-hub:ingest:sha256:9f86d0...   (preferred in files)

``SCOPES`` is ``+``-separated from ``score``, ``ingest``, ``read`` or ``*`` (all), optionally
with ``rate=N`` to give this key its own limit of N requests per second (burst 2N) instead of
``serve.rate_limit_per_second``. Only the
SHA-256 digest of each secret is kept in memory, and a presented key is compared with every
stored digest using ``hmac.compare_digest`` so timing does not reveal which prefix matched.
The key *name* (never the key) is what audit entries record.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KEYS_ENV = "VITALRISK_API_KEYS"
KEYS_FILE_ENV = "VITALRISK_API_KEYS_FILE"
SCOPES = frozenset({"score", "ingest", "read"})


class AuthConfigError(ValueError):
    """The key configuration is unusable (the service refuses to start)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: bytes  # sha256 of the secret
    rate: float | None = None  # requests per second; None = the service default

    def allows(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a secret, for ``NAME:SCOPES:sha256:HEX`` key files."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_key_spec(spec: str, where: str = KEYS_ENV) -> ApiKey:
    parts = spec.strip().split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise AuthConfigError(
            f"{where}: key entry must be NAME:SCOPES:SECRET or NAME:SCOPES:sha256:HEX "
            f"(got an entry with {len(parts)} field(s))"
        )
    name, scopes_text, secret = parts
    tokens = [s.strip() for s in scopes_text.split("+") if s.strip()]
    rate: float | None = None
    for tok in [t for t in tokens if t.startswith("rate=")]:
        tokens.remove(tok)
        try:
            rate = float(tok.removeprefix("rate="))
        except ValueError:
            rate = -1.0
        if not rate > 0:
            raise AuthConfigError(
                f"{where}: key {name!r}: {tok!r} must be rate=<requests per second>"
            )
    scopes = frozenset(tokens)
    unknown = scopes - SCOPES - {"*"}
    if unknown or not scopes:
        raise AuthConfigError(
            f"{where}: key {name!r} has scope(s) {sorted(unknown) or '(none)'}; "
            f"expected '+'-separated from {sorted(SCOPES)} or '*'"
        )
    if secret.startswith("sha256:"):
        hexd = secret.removeprefix("sha256:").strip().lower()
        if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise AuthConfigError(f"{where}: key {name!r}: sha256 digest must be 64 hex chars")
        digest = bytes.fromhex(hexd)
    else:
        if len(secret) < 8:
            raise AuthConfigError(f"{where}: key {name!r}: secret must be at least 8 characters")
        digest = hashlib.sha256(secret.encode("utf-8")).digest()
    return ApiKey(name=name.strip(), scopes=scopes, digest=digest, rate=rate)


@dataclass
class KeyStore:
    keys: list[ApiKey] = field(default_factory=list)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KeyStore:
        env = os.environ if environ is None else environ
        keys: list[ApiKey] = []
        for item in (env.get(KEYS_ENV) or "").split(","):
            if item.strip():
                keys.append(parse_key_spec(item, KEYS_ENV))
        file = env.get(KEYS_FILE_ENV)
        if file:
            path = Path(file)
            if not path.is_file():
                raise AuthConfigError(f"{KEYS_FILE_ENV}={file}: file not found")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                text = line.split("#", 1)[0].strip()
                if text:
                    keys.append(parse_key_spec(text, f"{file} line {n}"))
        names = [k.name for k in keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AuthConfigError(f"API key names must be unique; repeated: {dupes}")
        return cls(keys)

    def authenticate(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: ApiKey | None = None
        for key in self.keys:  # no early exit: same work whichever key matches
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _take(tokens: float, last: float, t: float, rate: float, burst: float) -> tuple[float, float]:
    """Token bucket step: (tokens left, seconds to wait; 0.0 when this request may pass)."""
    tokens = min(burst, tokens + max(0.0, t - last) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate


class RateLimiter:
    """Token bucket per key name: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _limits(self, rate: float | None) -> tuple[float, float]:
        r = self.rate if rate is None else float(rate)
        return r, (self.burst if rate is None else max(1.0, 2.0 * r))

    def acquire(self, name: str, now: float | None = None, rate: float | None = None) -> float:
        """0.0 when allowed, else the seconds to wait before the next token."""
        t = time.monotonic() if now is None else now
        r, burst = self._limits(rate)
        with self._lock:
            tokens, last = self._buckets.get(name, (burst, t))
            tokens, wait = _take(tokens, last, t, r, burst)
            self._buckets[name] = (tokens, t)
            return wait

    def close(self) -> None:
        """Nothing to release in memory (the shared limiter closes its database)."""


class SharedRateLimiter(RateLimiter):
    """The same buckets in a small SQLite file, so every worker process draws from one limit.

    With several BentoML workers an in-memory bucket per process would multiply each key's
    limit by the number of workers. One short ``BEGIN IMMEDIATE`` transaction per request
    (no fsync: losing the buckets in a power cut only refills them) keeps one limit per key.
    ``time.monotonic`` is the system-wide monotonic clock on Linux, shared by the workers.
    """

    def __init__(self, rate: float, burst: int, path: str | Path) -> None:
        import sqlite3

        super().__init__(rate, burst)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=5.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, tokens REAL, last REAL)"
        )

    def acquire(self, name: str, now: float | None = None, rate: float | None = None) -> float:
        t = time.monotonic() if now is None else now
        r, burst = self._limits(rate)
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute(
                    "SELECT tokens, last FROM buckets WHERE name = ?", (name,)
                ).fetchone()
                tokens, last = row if row is not None else (burst, t)
                tokens, wait = _take(float(tokens), float(last), t, r, burst)
                cur.execute(
                    "INSERT OR REPLACE INTO buckets (name, tokens, last) VALUES (?, ?, ?)",
                    (name, tokens, t),
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return wait

    def close(self) -> None:
        with self._lock:
            self._conn.close()
