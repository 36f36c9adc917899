"""One real server for the serving tests: a tiny champion + challenger in a temporary MLflow
registry, ``vitalrisk serve`` on a free port, torn down at the end of the session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

KEYS = {
    "admin": "admin-secret-0001",
    "reader": "reader-secret-0001",
    "device": "device-secret-0001",
    "slow": "slow-secret-00001",
}
KEY_SPECS = (
    f"admin:*:{KEYS['admin']},reader:read:{KEYS['reader']},"
    f"device:ingest:{KEYS['device']},slow:score+rate=1:{KEYS['slow']}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vitalrisk_exe() -> str:
    return str(Path(sys.executable).with_name("vitalrisk"))


@dataclass
class Server:
    url: str
    root: Path
    env: dict[str, str]
    models: dict[str, Any]
    proc: subprocess.Popen[bytes]

    def client(self, key: str | None = "admin") -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    @property
    def prediction_log(self) -> Path:
        return Path(self.env["VITALRISK_PREDICTION_LOG"])

    @property
    def audit_log(self) -> Path:
        return Path(self.env["VITALRISK_AUDIT_LOG"])

    @property
    def landing(self) -> Path:
        return Path(self.env["VITALRISK_LANDING_DIR"])


def server_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns.db",
            "VITALRISK_API_KEYS": KEY_SPECS,
            "VITALRISK_PREDICTION_LOG": str(root / "logs" / "predictions.sqlite"),
            "VITALRISK_AUDIT_LOG": str(root / "logs" / "audit.jsonl"),
            "VITALRISK_LANDING_DIR": str(root / "landing"),
            "VITALRISK_FEATURE_DICTIONARY": str(root / "no-dictionary.json"),
            "BENTOML_HOME": str(root / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("VITALRISK_API_KEYS_FILE", None)
    return env


PARAMS = """
register:
  model_name: vitalrisk-deterioration
serve:
  max_body_bytes: 300000
  max_patients: 5
  max_feature_rows: 1500
  rate_limit_per_second: 1000
  rate_limit_burst: 2000
"""


def start_server(
    root: Path, env: dict[str, str], port: int, timeout: float = 120.0, workers: int = 1
) -> subprocess.Popen[bytes]:
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            vitalrisk_exe(),
            "serve",
            "--port",
            str(port),
            "--params",
            str(root / "params.yaml"),
            "--workers",
            str(workers),
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited {proc.returncode}: {(root / 'server.log').read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(
        f"server not ready in {timeout}s: {(root / 'server.log').read_text()[-3000:]}"
    )


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """A temporary MLflow registry with champion (v1) and challenger (v2)."""
    from tests.serving.factory import register_models

    root = tmp_path_factory.mktemp("serving")
    env = server_env(root)
    (root / "params.yaml").write_text(PARAMS)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        models = register_models(root / "work")
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return root, env, models


@pytest.fixture(scope="session")
def server(registry: tuple[Path, dict[str, str], dict[str, Any]]) -> Any:
    root, env, models = registry
    port = free_port()
    proc = start_server(root, env, port)
    try:
        yield Server(f"http://127.0.0.1:{port}", root, env, models, proc)
    finally:
        stop_server(proc)


LIMITED_PARAMS = """
register:
  model_name: vitalrisk-deterioration
serve:
  max_body_bytes: 300000
  rate_limit_per_second: 1000
  rate_limit_burst: 2000
  max_connections: 64
  max_connections_per_client: 16
  max_requests_per_connection: 5
  header_timeout_seconds: 2
  body_timeout_seconds: 3
  max_header_bytes: 4096
  auth_failures_per_minute: 6
  auth_failure_burst: 5
  shutdown_timeout_seconds: 5
"""


def server_on(
    registry: tuple[Path, dict[str, str], dict[str, Any]],
    root: Path,
    params: str = PARAMS,
    workers: int = 1,
    **env_extra: str,
) -> Server:
    """Another real server on the session's registry, with its own params, logs and port."""
    _, reg_env, models = registry
    root.mkdir(parents=True, exist_ok=True)
    env = server_env(root)
    env["MLFLOW_TRACKING_URI"] = reg_env["MLFLOW_TRACKING_URI"]
    env.update(env_extra)
    (root / "params.yaml").write_text(params)
    port = free_port()
    proc = start_server(root, env, port, workers=workers)
    return Server(f"http://127.0.0.1:{port}", root, env, models, proc)


@pytest.fixture(scope="session")
def limited_server(
    registry: tuple[Path, dict[str, str], dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """A server with tight connection limits (short deadlines, small caps) for resource tests."""
    srv = server_on(registry, tmp_path_factory.mktemp("limited"), LIMITED_PARAMS)
    try:
        yield srv
    finally:
        stop_server(srv.proc)
