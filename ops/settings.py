"""Team-mode settings: every service URL in one file (``team.env``), secrets only from the env.

Why one file: the embedded defaults (SQLite MLflow, local files) stay the default for the demo;
team mode is the same code pointed at real services, so the only thing that changes between a
laptop stack and a hospital deployment is this file (or the environment, which wins over it).
A key the model does not know is an error naming it, like params sections.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = REPO_ROOT / "team.env"
ENV_FILE_VAR = "VITALRISK_TEAM_ENV"
#: credentials accepted by the local S3 stand-in (moto checks none); never used for real S3
STANDIN_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "vitalrisk-standin", "AWS_SECRET_ACCESS_KEY": "standin"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class TeamSettings(BaseSettings):
    """Where each team service lives. Env vars ``VITALRISK_<FIELD>`` override ``team.env``."""

    model_config = SettingsConfigDict(env_prefix="VITALRISK_", extra="forbid")

    #: state folder: pid files, logs, generated configs, an own PostgreSQL cluster if needed
    team_dir: Path = Path(".team")
    #: MLflow backend store (database created by ``team up`` if missing)
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/vitalrisk_mlflow"
    #: S3 API endpoint: the moto stand-in locally; S3, MinIO or GCS (interop) in production
    s3_endpoint_url: str = "http://127.0.0.1:9000"
    s3_bucket: str = "vitalrisk"
    s3_region: str = "us-east-1"
    mlflow_url: str = "http://127.0.0.1:5000"
    mlflow_workers: int = Field(default=1, ge=1)
    dask_scheduler: str = "tcp://127.0.0.1:8786"
    dask_workers: int = Field(default=2, ge=0)
    dask_worker_memory: str = "2GiB"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_topic: str = "vitalrisk/devices/+/observations"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: serving replicas: the shared prediction log and audit chain (core/pg.py location)
    serve_db_url: str = "postgresql://postgres@127.0.0.1:5432/vitalrisk_serve?schema=vitalrisk"

    @field_validator(
        "pg_url", "s3_endpoint_url", "mlflow_url", "mqtt_url", "redis_url", "serve_db_url"
    )
    @classmethod
    def _no_secret_in_url(cls, v: str) -> str:
        if urlsplit(v).password:
            raise ValueError(
                "contains a password: secrets come from the environment only "
                "(PGPASSWORD or ~/.pgpass, AWS_SECRET_ACCESS_KEY, ...), never from team.env"
            )
        return v

    # -- derived ------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.team_dir if self.team_dir.is_absolute() else REPO_ROOT / self.team_dir

    @property
    def mlflow_artifacts(self) -> str:
        return f"s3://{self.s3_bucket}/mlflow"

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{self.s3_bucket}/dvc"

    def is_local(self, url: str) -> bool:
        return (urlsplit(url).hostname or "") in LOCAL_HOSTS


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def load_settings(env_file: str | Path | None = None) -> TeamSettings:
    """Settings from ``env_file`` (default ``$VITALRISK_TEAM_ENV`` or ``team.env``) + the env."""
    path = Path(env_file or os.environ.get(ENV_FILE_VAR) or DEFAULT_ENV_FILE)
    if env_file is not None and not path.is_file():
        raise UserError(f"{path}: settings file not found (expected a team.env file)")
    try:
        return TeamSettings(_env_file=path if path.is_file() else None)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"{path}: {problems}") from None


def client_env(settings: TeamSettings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that point MLflow, DVC, boto3, Dask and the collector at the stack.

    Credentials are passed through from ``environ``; only when the object store is the local
    stand-in and none are set, the stand-in's fixed dummy credentials are filled in.
    """
    environ = dict(os.environ if environ is None else environ)
    env = {
        "MLFLOW_TRACKING_URI": settings.mlflow_url,
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_ENDPOINT_URL_S3": settings.s3_endpoint_url,
        "AWS_DEFAULT_REGION": environ.get("AWS_DEFAULT_REGION", settings.s3_region),
        "DASK_SCHEDULER_ADDRESS": settings.dask_scheduler,
        "VITALRISK_MQTT_URL": settings.mqtt_url,
        "VITALRISK_REDIS_URL": settings.redis_url,
        "VITALRISK_SERVE_DB_URL": settings.serve_db_url,
    }
    if settings.is_local(settings.s3_endpoint_url) and not environ.get("AWS_ACCESS_KEY_ID"):
        env.update(STANDIN_CREDENTIALS)
    return env
