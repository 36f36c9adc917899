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

The service refuses to start, with one line naming the entry, on: a malformed entry, an
unknown scope, a name outside ``[A-Za-z0-9_.@-]`` (names go into logs and the audit trail), a
repeated name, one secret listed for two entries (whose scopes would then depend on which
entry matched), and a weak secret: fewer than 16 characters or fewer than 8 different ones,
and in production mode (``VITALRISK_MODE=production``) a placeholder such as ``change-me``.

Failed authentication is throttled per client address (:class:`AuthThrottle`): a token bucket
that every 401 draws from; an empty bucket answers 429 before any key is compared.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

KEYS_ENV = "VITALRISK_API_KEYS"
KEYS_FILE_ENV = "VITALRISK_API_KEYS_FILE"
SCOPES = frozenset({"score", "ingest", "read"})
MIN_SECRET_CHARS = 16
MIN_DISTINCT_CHARS = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
#: secrets copied from documentation or templates (refused in production mode)
_PLACEHOLDERS = ("change-me", "changeme", "password", "example", "replace-me", "your-key")


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


def _check_secret(name: str, secret: str, where: str) -> None:
    from governance.pseudonym import production_mode

    if len(secret) < MIN_SECRET_CHARS or len(set(secret)) < MIN_DISTINCT_CHARS:
        raise AuthConfigError(
            f"{where}: key {name!r}: secret is weak: use at least {MIN_SECRET_CHARS} "
            f"characters, {MIN_DISTINCT_CHARS} of them different (e.g. `openssl rand -hex 24`)"
        )
    lowered = secret.lower()
    if production_mode() and any(p in lowered for p in _PLACEHOLDERS):
        raise AuthConfigError(
            f"{where}: key {name!r}: secret looks like a placeholder; production mode needs "
            "a random secret"
        )


def _parse_scopes(name: str, text: str, where: str) -> tuple[frozenset[str], float | None]:
    tokens = [s.strip() for s in text.split("+") if s.strip()]
    rate: float | None = None
    for tok in [t for t in tokens if t.startswith("rate=")]:
        tokens.remove(tok)
        try:
            rate = float(tok.removeprefix("rate="))
        except ValueError:
            rate = -1.0
        if not 0 < rate < float("inf"):
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
    return scopes, rate


def parse_key_spec(spec: str, where: str = KEYS_ENV) -> ApiKey:
    parts = spec.strip().split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise AuthConfigError(
            f"{where}: key entry must be NAME:SCOPES:SECRET or NAME:SCOPES:sha256:HEX "
            f"(got an entry with {len(parts)} field(s))"
        )
    name, scopes_text, secret = (p.strip() for p in parts)
    if not _NAME.match(name):
        raise AuthConfigError(
            f"{where}: key name must be 1-64 of A-Z a-z 0-9 _ . @ - (it goes into logs and "
            "the audit trail)"
        )
    scopes, rate = _parse_scopes(name, scopes_text, where)
    if secret.startswith("sha256:"):
        hexd = secret.removeprefix("sha256:").strip().lower()
        if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise AuthConfigError(f"{where}: key {name!r}: sha256 digest must be 64 hex chars")
        digest = bytes.fromhex(hexd)
    else:
        _check_secret(name, secret, where)
        digest = hashlib.sha256(secret.encode("utf-8")).digest()
    return ApiKey(name=name, scopes=scopes, digest=digest, rate=rate)


def _entries(env: dict[str, str] | os._Environ[str]) -> list[tuple[str, str]]:
    """``(where, spec)`` of every configured key, ``where`` naming the entry for messages."""
    out = [
        (f"{KEYS_ENV} entry {i}", item)
        for i, item in enumerate((env.get(KEYS_ENV) or "").split(","), 1)
        if item.strip()
    ]
    file = env.get(KEYS_FILE_ENV)
    if file:
        path = Path(file)
        if not path.is_file():
            raise AuthConfigError(f"{KEYS_FILE_ENV}={file}: file not found")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if text:
                out.append((f"{file} line {n}", text))
    return out


@dataclass
class KeyStore:
    keys: list[ApiKey] = field(default_factory=list)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KeyStore:
        env = os.environ if environ is None else environ
        keys: list[ApiKey] = []
        where_of: dict[str, str] = {}
        by_digest: dict[bytes, ApiKey] = {}
        for where, spec in _entries(env):
            key = parse_key_spec(spec, where)
            if key.name in where_of:
                raise AuthConfigError(
                    f"{where}: API key names must be unique; {key.name!r} is also "
                    f"{where_of[key.name]}"
                )
            other = by_digest.get(key.digest)
            if other is not None:
                raise AuthConfigError(
                    f"{where}: key {key.name!r} has the same secret as key {other.name!r} "
                    f"({where_of[other.name]}); every key needs its own secret"
                )
            where_of[key.name] = where
            by_digest[key.digest] = key
            keys.append(key)
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


class AuthThrottle:
    """Failed authentications per client address: a token bucket each 401 draws from.

    ``blocked(addr)`` is checked before any key is compared: while an address's bucket is
    empty its requests are answered 429 (brute force then runs at ``per_minute``, not at the
    speed of the network). Addresses are kept in a bounded LRU (``max_clients``); forgetting
    an old address only refills its bucket. One throttle per worker process.
    """

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = float(per_minute) / 60.0
        self.burst = float(burst)
        self.max_clients = int(max_clients)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _level(self, addr: str, t: float) -> float:
        tokens, last = self._buckets.get(addr, (self.burst, t))
        return min(self.burst, tokens + max(0.0, t - last) * self.rate)

    def blocked(self, addr: str, now: float | None = None) -> float:
        """Seconds until ``addr`` may try a key again (0.0: it may now)."""
        t = time.monotonic() if now is None else now
        with self._lock:
            if addr not in self._buckets:
                return 0.0
            tokens = self._level(addr, t)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def failed(self, addr: str, now: float | None = None) -> bool:
        """Record a failed authentication; True when this one emptied the bucket."""
        t = time.monotonic() if now is None else now
        with self._lock:
            tokens = max(0.0, self._level(addr, t) - 1.0)
            self._buckets[addr] = (tokens, t)
            self._buckets.move_to_end(addr)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return tokens < 1.0


#: token bucket in Redis, atomic (one script run per request); the clock is the Redis
#: server's, so replicas on several hosts share one time base. KEYS[1] bucket;
#: ARGV rate, burst, ttl ms, take (1: draw a token, 0: only look). Returns the wait in
#: microseconds (0: allowed).
_BUCKET_LUA = """
local now_s, now_us = unpack(redis.call('TIME'))
local t = tonumber(now_s) + tonumber(now_us) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local tokens, last = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, last = burst, t end
tokens = math.min(burst, tokens + math.max(0, t - last) * rate)
local wait = 0
if tokens >= 1 then
  if ARGV[4] == '1' then tokens = tokens - 1 end
else
  wait = (1 - tokens) / rate
end
if ARGV[4] == '1' or b[1] then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'last', tostring(t))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return math.floor(wait * 1e6)
"""
REDIS_PASSWORD_ENV = "VITALRISK_REDIS_PASSWORD"


class RedisBuckets:
    """Token buckets in Redis, one per name, shared by every replica that uses the prefix.

    When Redis cannot be reached the caller's local bucket decides instead (each replica then
    limits on its own, logged once per outage): scoring stays available, the limit is only
    less exact for the duration.
    """

    def __init__(self, url: str, prefix: str, timeout: float = 0.5) -> None:
        try:
            import redis
        except ImportError:
            raise ValueError(
                "serve.redis_url is set but the redis client is not installed "
                "(pip install redis, part of the team extra)"
            ) from None

        self.url = url
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            url,
            password=os.environ.get(REDIS_PASSWORD_ENV) or None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._script = self._client.register_script(_BUCKET_LUA)
        self._down = False

    def ping(self) -> None:
        """Raise ``ConnectionError`` naming the server when Redis does not answer."""
        import redis

        try:
            self._client.ping()
        except redis.RedisError as exc:
            host = self._client.connection_pool.connection_kwargs.get("host", "?")
            port = self._client.connection_pool.connection_kwargs.get("port", "?")
            raise ConnectionError(f"redis://{host}:{port}: {exc}") from None

    def take(self, name: str, rate: float, burst: float, take: bool = True) -> float | None:
        """Seconds to wait (0.0: allowed); None when Redis did not answer."""
        import redis

        ttl_ms = max(1_000, int(1000 * burst / rate) + 1_000)  # a full bucket needs no key
        try:
            us = self._script(
                keys=[self.prefix + name], args=[rate, burst, ttl_ms, "1" if take else "0"]
            )
        except redis.RedisError as exc:
            if not self._down:
                logger.error(
                    "redis rate-limit store unreachable (%s): limiting per replica until it is back",
                    type(exc).__name__,
                )
            self._down = True
            return None
        if self._down:
            logger.warning("redis rate-limit store reachable again: shared limits resume")
            self._down = False
        return int(us) / 1e6

    def close(self) -> None:
        self._client.close()


class RedisRateLimiter(RateLimiter):
    """One bucket per key across every replica (``serve.redis_url``); see :class:`RedisBuckets`."""

    def __init__(self, rate: float, burst: int, url: str, prefix: str) -> None:
        super().__init__(rate, burst)
        self.buckets = RedisBuckets(url, prefix + "rate:")

    def acquire(self, name: str, now: float | None = None, rate: float | None = None) -> float:
        r, burst = self._limits(rate)
        wait = self.buckets.take(name, r, burst)
        return super().acquire(name, now, rate) if wait is None else wait

    def close(self) -> None:
        self.buckets.close()


class RedisAuthThrottle(AuthThrottle):
    """Failed authentications per client address counted across replicas (Redis)."""

    def __init__(self, per_minute: float, burst: int, url: str, prefix: str) -> None:
        super().__init__(per_minute, burst)
        self.buckets = RedisBuckets(url, prefix + "authfail:")

    def blocked(self, addr: str, now: float | None = None) -> float:
        wait = self.buckets.take(addr, self.rate, self.burst, take=False)
        return super().blocked(addr, now) if wait is None else wait

    def failed(self, addr: str, now: float | None = None) -> bool:
        wait = self.buckets.take(addr, self.rate, self.burst)
        if wait is None:
            return super().failed(addr, now)
        # the bucket is empty when the next attempt would have to wait
        return self.buckets.take(addr, self.rate, self.burst, take=False) not in (None, 0.0)

    def close(self) -> None:
        self.buckets.close()
