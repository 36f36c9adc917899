"""Typed ``serve`` section of ``params.yaml`` (data sufficiency, limits, batching, paths).

Risk bands and the alert threshold are not here: they are fitted with the model and read
from the served model (``models.thresholds``).

Environment variables override the paths so a deployment can relocate logs without editing
params; secrets (API keys, pseudonym key) come only from the environment.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.pg import DATABASE_URL_ENV as DATABASE_URL_ENV  # team mode; re-exported

PARAMS_ENV = "VITALRISK_PARAMS"
MODEL_NAME_ENV = "VITALRISK_MODEL_NAME"
PREDICTION_LOG_ENV = "VITALRISK_PREDICTION_LOG"
AUDIT_LOG_ENV = "VITALRISK_AUDIT_LOG"
LANDING_ENV = "VITALRISK_LANDING_DIR"
FEATURE_DICTIONARY_ENV = "VITALRISK_FEATURE_DICTIONARY"
#: team mode: replicas share the prediction log and the audit chain in PostgreSQL
#: (``DATABASE_URL_ENV``, core/pg.py), and the rate limits in Redis (README, "Team mode")
REDIS_URL_ENV = "VITALRISK_REDIS_URL"
REDIS_PREFIX_ENV = "VITALRISK_REDIS_PREFIX"
IDENTITY_MAP_ENV = "VITALRISK_IDENTITY_MAP"
DEFAULT_MODEL_NAME = "vitalrisk-deterioration"


#: vital signs the sufficiency rule counts by default (NEWS2's measured parameters)
CORE_VITALS = ("resp_rate", "spo2", "sbp", "heart_rate", "body_temp")


class DataSufficiency(BaseModel):
    """When there is enough recent data for the model to answer (``serving.safety``).

    A vital counts when its newest observation is at most ``recency_hours[setting][vital]``
    old at the prediction time; fewer than ``min_recent_vitals`` such vitals: the answer is
    ``status: insufficient_data``, without a probability or a band.
    """

    model_config = ConfigDict(extra="forbid")
    min_recent_vitals: int = Field(default=3, ge=1, le=20)
    recency_hours: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "ward": dict.fromkeys(CORE_VITALS, 12.0),
            "home": dict.fromkeys(CORE_VITALS, 48.0),
        }
    )

    @model_validator(mode="after")
    def _windows(self) -> DataSufficiency:
        for setting, windows in self.recency_hours.items():
            if not windows:
                raise ValueError(f"data_sufficiency.recency_hours.{setting}: no vitals listed")
            if self.min_recent_vitals > len(windows):
                raise ValueError(
                    f"data_sufficiency.min_recent_vitals ({self.min_recent_vitals}) exceeds the "
                    f"{len(windows)} vitals listed for {setting}"
                )
            for vital, hours in windows.items():
                if not 0 < hours <= 24 * 365:
                    raise ValueError(
                        f"data_sufficiency.recency_hours.{setting}.{vital}: expected 0 < hours <= 8760"
                    )
        return self

    def windows(self, setting: str | None) -> dict[str, float]:
        """Recency windows of a setting (``ward``'s when the setting is unknown)."""
        return self.recency_hours.get(setting or "ward") or next(iter(self.recency_hours.values()))


class Feedback(BaseModel):
    """The clinician pages and the cohort view (``serving.worklist``, ``serving.feedback``)."""

    model_config = ConfigDict(extra="forbid")
    #: cohort cells with fewer than k patients (or alerts, events) are shown as "<k"
    k_anonymity: int = Field(default=5, ge=2, le=1000)
    #: age bands of the cohort view (edges, years)
    age_bands: list[float] = Field(default_factory=lambda: [0.0, 50.0, 65.0, 80.0, 130.0])
    #: a worklist session cookie lasts this long
    session_minutes: float = Field(default=30.0, gt=0, le=24 * 60)
    #: the worklist shows patients scored within this many hours, the sparkline this span
    worklist_hours: float = Field(default=72.0, gt=0, le=24 * 90)
    #: the cohort view covers this many ISO weeks back from today (``?weeks=`` overrides)
    cohort_weeks: int = Field(default=12, ge=1, le=520)
    #: where the caller-id map lives (pseudonym -> caller id, sealed per API key)
    identity_map: str = "logs/identities.sqlite"

    @model_validator(mode="after")
    def _bands(self) -> Feedback:
        if len(self.age_bands) < 2 or sorted(self.age_bands) != self.age_bands:
            raise ValueError("feedback.age_bands must be at least two increasing edges")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=16)
    #: BentoML's per-request access log line (the audit log records every request anyway)
    access_log: bool = False
    #: OpenTelemetry spans per request (~0.35 ms CPU each): on only with an exporter configured
    tracing: bool = False
    #: enough recent data for an answer (else ``status: insufficient_data``)
    data_sufficiency: DataSufficiency = Field(default_factory=lambda: DataSufficiency())
    feedback: Feedback = Field(default_factory=lambda: Feedback())
    top_features: int = Field(5, ge=0, le=50)
    shadow_challenger: bool = True
    #: seconds between looks at the registry's champion/challenger aliases; the service swaps
    #: to the version they name (promote, rollback, a change in the MLflow UI). 0 = never
    model_watch_seconds: float = Field(10.0, ge=0, le=3600)
    # limits: everything above them is a 4xx answer, never a crash
    max_body_bytes: int = Field(2_000_000, ge=1_000)
    max_patients: int = Field(100, ge=1)
    #: patients scored together when raw-observation requests queue up (serving/batching.py)
    score_batch_patients: int = Field(64, ge=1)
    #: batches with more observations are scored on a thread, not on the event loop
    inline_observations: int = Field(20_000, ge=0)
    max_observations_per_patient: int = Field(5_000, ge=1)
    max_feature_rows: int = Field(5_000, ge=1)
    max_collect_observations: int = Field(50_000, ge=1)
    future_tolerance_minutes: float = Field(5.0, ge=0)
    rate_limit_per_second: float = Field(200.0, gt=0)
    rate_limit_burst: int = Field(400, ge=1)
    # adaptive batching of /v1/score/features (false: each request scored on its own)
    adaptive_batching: bool = True
    max_batch_size: int = Field(5_000, ge=1)
    #: BentoML latency budget: a request queued longer is answered 503 (not a fixed wait)
    max_latency_ms: int = Field(1_000, ge=10)
    #: a data request waits at most this long for its audit entry to be durable (then 503)
    audit_timeout_seconds: float = Field(5.0, gt=0, le=60)
    # connections (uvicorn, per worker process; serving/connections.py). The defaults fit the
    # common 1,024 open-file limit; `vitalrisk serve` raises the soft limit when it can and
    # refuses to start when the cap cannot fit
    #: open connections per worker; more are closed at once (and requests answered 503)
    max_connections: int = Field(500, ge=8, le=100_000)
    #: open connections per client address (0 = no per-address cap; behind a proxy every
    #: client has the proxy's address)
    max_connections_per_client: int = Field(100, ge=0, le=100_000)
    #: requests on one keep-alive connection; the last answer says ``Connection: close``
    max_requests_per_connection: int = Field(1_000, ge=1)
    #: a request's line and headers must arrive within this time (else 408 and closed)
    header_timeout_seconds: float = Field(10.0, gt=0, le=300)
    #: request line and headers larger than this: 431 and closed
    max_header_bytes: int = Field(32_768, ge=1_024, le=1_048_576)
    #: the whole body must arrive within this time after the headers (else 408 and closed)
    body_timeout_seconds: float = Field(30.0, gt=0, le=600)
    #: idle keep-alive connections are closed after this many seconds
    keep_alive_seconds: int = Field(5, ge=1, le=300)
    #: after a 413, up to this many further body bytes are read and discarded, so that a
    #: client still sending sees the answer instead of a reset connection
    discard_body_bytes: int = Field(16_000_000, ge=0)
    #: SIGTERM: in-flight requests get this long to finish before the workers are killed
    shutdown_timeout_seconds: int = Field(20, ge=1, le=600)
    #: a worker that crashes is restarted; more crashes than this within a minute stop serving
    max_worker_restarts_per_minute: int = Field(5, ge=0, le=100)
    # failed authentication, per client address (token bucket): beyond it, 429 before any
    # key is compared, until the bucket refills
    auth_failures_per_minute: float = Field(30.0, gt=0)
    auth_failure_burst: int = Field(20, ge=1)
    # where things go (env overrides)
    prediction_log: str = "logs/predictions.sqlite"
    #: SQLite ``synchronous`` of the prediction log: FULL (durable on power loss) or NORMAL
    prediction_log_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    audit_log: str = "logs/audit.jsonl"
    landing_dir: str = "landing"
    #: team mode: ``postgresql://HOST:PORT/DB?schema=NAME`` holds the prediction log AND the
    #: audit chain of every replica (``prediction_log`` and ``audit_log`` are then unused);
    #: empty: the files above. Env ``VITALRISK_SERVE_DB_URL`` wins. No password here (PGPASSWORD)
    database_url: str = ""
    #: team mode: ``redis://HOST:PORT/DB`` holds one rate-limit bucket per key (and the failed
    #: authentication buckets) for every replica; empty: buckets in the process (or, with
    #: several workers, a SQLite file beside the prediction log). Env ``VITALRISK_REDIS_URL``
    redis_url: str = ""
    #: prefix of every Redis key (several deployments may share one Redis)
    redis_prefix: str = "vitalrisk:"
    #: the monitor's ``summary.json``: its verdict is exposed on /metrics (read on scrape;
    #: env ``VITALRISK_MONITOR_SUMMARY`` wins)
    monitor_summary: str = "reports/monitoring/summary.json"
    feature_dictionary: str = "artifacts/features/feature_dictionary.json"

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        from urllib.parse import urlsplit

        from core.pg import is_pg_url

        if self.database_url and not is_pg_url(self.database_url):
            raise ValueError("database_url must be a postgresql:// URL (or empty for files)")
        for name in ("database_url", "redis_url"):
            if urlsplit(getattr(self, name)).password:
                raise ValueError(
                    f"{name} contains a password: secrets come from the environment only "
                    "(PGPASSWORD, VITALRISK_REDIS_PASSWORD)"
                )
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must be a redis:// or rediss:// URL (or empty)")
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(
                f"max_connections_per_client ({self.max_connections_per_client}) must not "
                f"exceed max_connections ({self.max_connections})"
            )
        return self

    def prediction_log_path(self) -> Path:
        return Path(os.environ.get(PREDICTION_LOG_ENV) or self.prediction_log)

    def audit_log_path(self) -> Path:
        return Path(os.environ.get(AUDIT_LOG_ENV) or self.audit_log)

    def database_location(self) -> str:
        """The PostgreSQL location of the shared stores, or "" (files)."""
        return (os.environ.get(DATABASE_URL_ENV) or self.database_url).strip()

    def redis_location(self) -> str:
        return (os.environ.get(REDIS_URL_ENV) or self.redis_url).strip()

    def redis_key_prefix(self) -> str:
        return os.environ.get(REDIS_PREFIX_ENV) or self.redis_prefix

    def landing_path(self) -> Path | str:
        """The landing area: a local folder, or an fsspec URL (``s3://bucket/landing``) that
        every replica writes to and reads from (``core.storage``)."""
        from core import storage

        where = os.environ.get(LANDING_ENV) or self.landing_dir
        return where if storage.is_url(where) else Path(where)

    def identity_map_path(self) -> Path:
        return Path(os.environ.get(IDENTITY_MAP_ENV) or self.feedback.identity_map)

    def feature_dictionary_path(self) -> Path:
        return Path(os.environ.get(FEATURE_DICTIONARY_ENV) or self.feature_dictionary)


def params_path() -> Path:
    return Path(os.environ.get(PARAMS_ENV) or "params.yaml")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of stage sections at the top level")
    return raw


def load_serve_config(path: str | Path | None = None) -> ServeConfig:
    """``serve`` section of params (defaults when the file or section is absent).

    Raises ``ValueError`` naming ``serve.<key>`` for an unknown or invalid key.
    """
    p = Path(path) if path is not None else params_path()
    section = _read(p).get("serve") or {}
    try:
        return ServeConfig.model_validate(section)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(x) for x in ("serve", *err["loc"]))
            msg = "unknown key (misspelt?)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{p}: {key}: {msg}")
        raise ValueError("; ".join(lines)) from None


def ingest_preliminary(path: str | Path | None = None) -> Literal["accept", "reject"]:
    """``ingest.preliminary`` of the project's params: FHIR ``preliminary``/``unknown``
    Observations are accepted or refused by the service exactly as ingest does. Read once
    per params file (the service reads it at start-up, so a bad value stops the start)."""
    p = Path(path) if path is not None else params_path()
    return _preliminary_of(str(p.resolve()))


@functools.lru_cache(maxsize=4)
def _preliminary_of(path: str) -> Literal["accept", "reject"]:
    from core.params import validate_section
    from ingest.config import IngestConfig

    section = _read(Path(path)).get("ingest") or {}
    return validate_section(IngestConfig, "ingest", section, source=path).preliminary


def model_name(path: str | Path | None = None) -> str:
    """Registered model name: ``VITALRISK_MODEL_NAME`` or ``register.model_name`` in params."""
    env = os.environ.get(MODEL_NAME_ENV)
    if env:
        return env
    p = Path(path) if path is not None else params_path()
    name = (_read(p).get("register") or {}).get("model_name")
    return str(name) if name else DEFAULT_MODEL_NAME


#: production secrets: length and variety below which a key is refused as guessable
MIN_PRODUCTION_KEY_CHARS = 32
MIN_PRODUCTION_KEY_DISTINCT = 10


def check_secrets(environ: dict[str, str] | None = None) -> None:
    """Production mode (``VITALRISK_MODE=production``) refuses to start without its keys.

    ``VITALRISK_PSEUDONYM_KEY`` (otherwise the public demo key would pseudonymise real
    patients, or every request would fail) and ``VITALRISK_AUDIT_KEY`` (otherwise anyone who
    can write the log can rewrite it with fresh SHA-256 hashes) must be set, differ, and each
    be at least 32 characters with 10 different ones. Raises ``ValueError``, one line naming
    the variable; outside production mode, nothing is required.
    """
    from governance.audit import KEY_ENV as AUDIT_KEY_ENV
    from governance.pseudonym import DEMO_KEY, KEY_ENV, production_mode

    env = os.environ if environ is None else environ
    if not production_mode():
        return
    values = {name: env.get(name, "") for name in (KEY_ENV, AUDIT_KEY_ENV)}
    for name, value in values.items():
        if not value:
            raise ValueError(
                f"VITALRISK_MODE=production: {name} is not set (see README, Governance); "
                "the service does not start without it"
            )
        if (
            value == DEMO_KEY
            or len(value) < MIN_PRODUCTION_KEY_CHARS
            or len(set(value)) < MIN_PRODUCTION_KEY_DISTINCT
        ):
            raise ValueError(
                f"VITALRISK_MODE=production: {name} is weak: use at least "
                f"{MIN_PRODUCTION_KEY_CHARS} characters of a random secret "
                "(e.g. `openssl rand -hex 32`)"
            )
    if values[KEY_ENV] == values[AUDIT_KEY_ENV]:
        raise ValueError(
            f"VITALRISK_MODE=production: {KEY_ENV} and {AUDIT_KEY_ENV} must be different secrets"
        )
