"""Where a serving process keeps what it shares: files (the default) or team services.

``serve.database_url`` (``VITALRISK_SERVE_DB_URL``) puts the prediction log and the audit
chain in PostgreSQL, so several ``vitalrisk serve`` replicas behind a load balancer write one
log and one linear chain; ``serve.redis_url`` (``VITALRISK_REDIS_URL``) puts the per-key rate
limit and the failed-authentication throttle in Redis, so N replicas enforce one budget per
key instead of N. Unset, everything stays in local files and process memory.
"""

from __future__ import annotations

import logging
import os

from core.pg import redact
from governance.audit import AuditLog, AuditStore, PgAuditStore
from serving.auth import (
    AuthThrottle,
    RateLimiter,
    RedisAuthThrottle,
    RedisRateLimiter,
    SharedRateLimiter,
)
from serving.config import ServeConfig
from serving.predlog import PgPredictionLog, PredictionLog, open_prediction_log

logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A configured team service cannot be used: the service must not start."""


def audit_store(config: ServeConfig) -> AuditStore:
    location = config.database_location()
    if location:
        return PgAuditStore(location)
    return AuditLog(config.audit_log_path(), head_interval=0.5, keep_open=True)


def prediction_log(config: ServeConfig) -> PredictionLog | PgPredictionLog:
    location = config.database_location()
    try:
        return open_prediction_log(
            location or config.prediction_log_path(), config.prediction_log_synchronous
        )
    except (ConnectionError, ValueError) as exc:
        raise StoreError(f"prediction log unusable: {exc}") from None
    except Exception as exc:  # psycopg errors while creating the tables
        raise StoreError(
            f"prediction log unusable: {redact(location)}: {type(exc).__name__}: {exc}"
        ) from None


def rate_limiter(config: ServeConfig) -> RateLimiter:
    """Redis when configured, else one bucket per key in memory (or a SQLite file shared
    by the workers of this one process)."""
    url = config.redis_location()
    if url:
        try:
            limiter = RedisRateLimiter(
                config.rate_limit_per_second,
                config.rate_limit_burst,
                url,
                config.redis_key_prefix(),
            )
            limiter.buckets.ping()
        except (ConnectionError, ValueError) as exc:
            raise StoreError(f"rate-limit store unusable: {exc}") from None
        return limiter
    workers = int(os.environ.get("VITALRISK_SERVE_WORKERS", config.workers))
    if workers > 1:  # one limit per key across the worker processes
        return SharedRateLimiter(
            config.rate_limit_per_second,
            config.rate_limit_burst,
            config.prediction_log_path().parent / "rate_limits.sqlite",
        )
    return RateLimiter(config.rate_limit_per_second, config.rate_limit_burst)


def auth_throttle(config: ServeConfig) -> AuthThrottle:
    url = config.redis_location()
    if url:
        return RedisAuthThrottle(
            config.auth_failures_per_minute,
            config.auth_failure_burst,
            url,
            config.redis_key_prefix(),
        )
    return AuthThrottle(config.auth_failures_per_minute, config.auth_failure_burst)
