"""Typed ``serve`` section of ``params.yaml`` (risk bands, limits, batching, paths).

Environment variables override the paths so a deployment can relocate logs without editing
params; secrets (API keys, pseudonym key) come only from the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_ENV = "VITALRISK_PARAMS"
MODEL_NAME_ENV = "VITALRISK_MODEL_NAME"
PREDICTION_LOG_ENV = "VITALRISK_PREDICTION_LOG"
AUDIT_LOG_ENV = "VITALRISK_AUDIT_LOG"
LANDING_ENV = "VITALRISK_LANDING_DIR"
FEATURE_DICTIONARY_ENV = "VITALRISK_FEATURE_DICTIONARY"
DEFAULT_MODEL_NAME = "vitalrisk-deterioration"


class RiskBands(BaseModel):
    """Probability thresholds: ``p < low`` is low, ``p < high`` is medium, else high."""

    model_config = ConfigDict(extra="forbid")
    low: float = Field(default=0.05, gt=0, lt=1)
    high: float = Field(default=0.20, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> RiskBands:
        if not self.low < self.high:
            raise ValueError(f"risk_bands: low ({self.low}) must be below high ({self.high})")
        return self

    def band(self, p: float) -> str:
        if p < self.low:
            return "low"
        if p < self.high:
            return "medium"
        return "high"


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=16)
    #: BentoML's per-request access log line (the audit log records every request anyway)
    access_log: bool = False
    #: OpenTelemetry spans per request (~0.35 ms CPU each): on only with an exporter configured
    tracing: bool = False
    risk_bands: RiskBands = Field(default_factory=lambda: RiskBands())
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
    #: audit entries are coalesced per key/route/model version over this many seconds
    #: (0 = one entry per request, written synchronously)
    audit_flush_seconds: float = Field(0.25, ge=0, le=10)
    # where things go (env overrides)
    prediction_log: str = "logs/predictions.sqlite"
    #: SQLite ``synchronous`` of the prediction log: FULL (durable on power loss) or NORMAL
    prediction_log_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    audit_log: str = "logs/audit.jsonl"
    landing_dir: str = "landing"
    feature_dictionary: str = "artifacts/features/feature_dictionary.json"

    def prediction_log_path(self) -> Path:
        return Path(os.environ.get(PREDICTION_LOG_ENV) or self.prediction_log)

    def audit_log_path(self) -> Path:
        return Path(os.environ.get(AUDIT_LOG_ENV) or self.audit_log)

    def landing_path(self) -> Path:
        return Path(os.environ.get(LANDING_ENV) or self.landing_dir)

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


def model_name(path: str | Path | None = None) -> str:
    """Registered model name: ``VITALRISK_MODEL_NAME`` or ``register.model_name`` in params."""
    env = os.environ.get(MODEL_NAME_ENV)
    if env:
        return env
    p = Path(path) if path is not None else params_path()
    name = (_read(p).get("register") or {}).get("model_name")
    return str(name) if name else DEFAULT_MODEL_NAME
