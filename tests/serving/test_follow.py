"""The service follows the registry: a real ``vitalrisk serve`` under load from a thread,
``vitalrisk promote`` then ``vitalrisk rollback`` then an alias moved in MLflow directly (what
the UI's pencil and the REST API do) while it runs: no failed request, and every answer, its
prediction-log rows and its audit entry name the version that produced it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.conftest import (
    KEYS,
    free_port,
    server_env,
    start_server,
    stop_server,
    vitalrisk_exe,
)

pytestmark = pytest.mark.slow

MODEL = "vitalrisk-deterioration"
PARAMS = f"""
register:
  model_name: {MODEL}
serve:
  model_watch_seconds: 1
  rate_limit_per_second: 10000
  rate_limit_burst: 20000
"""
HORIZONS = {"ward": 24.0, "home": 168.0}


def _register(root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Champion v1 and v2 (not aliased): two fits of the same features, a label horizon each."""
    import os

    from models import tracking
    from tests.serving.factory import feature_frame, fit_risk_model

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        frame = feature_frame(seed=0)
        for seed, rounds in ((0, 40), (1, 15)):
            model = fit_risk_model(frame, seed=seed, rounds=rounds)
            model.metadata = {
                **model.metadata,  # the fitted thresholds (factory.fit_risk_model)
                "label": {"horizon_hours": HORIZONS},
                "threshold": 0.2,
            }
            with tracking.start_run(run_name=f"follow-{seed}"):
                uri = tracking.log_risk_model(model, frame.head(5), root / f"w{seed}")
            tracking.register_version(uri, MODEL)
        tracking.set_alias(MODEL, "champion", "1", actor="tests", reason="fixture")
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    row = frame.drop(columns=["patient_id", "time", "setting", "label"]).iloc[0].to_dict()
    return {k: (None if v != v else float(v)) for k, v in row.items()}


class Load:
    """Feature-row requests from a thread, as fast as the server answers."""

    def __init__(self, url: str, row: dict[str, Any]) -> None:
        self.url, self.row = url, row
        self.results: list[tuple[int, str | None, str]] = []  # (status, version, request id)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        body = {"rows": [{"patient_id": "LOAD-1", "features": {**self.row, "setting": "ward"}}]}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as c:
            while not self._stop.is_set():
                try:
                    r = c.post("/v1/score/features", json=body)
                except httpx.HTTPError as exc:  # a dropped connection is a failed request
                    self.errors.append(repr(exc))
                    continue
                version = r.json()[0]["model_version"] if r.status_code == 200 else None
                self.results.append((r.status_code, version, r.headers.get("x-request-id", "")))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for(self, version: str, timeout: float = 60.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.results and self.results[-1][1] == version:
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"the service did not switch to version {version} in {timeout}s")


def _cli(env: dict[str, str], root: Path, *args: str) -> str:
    proc = subprocess.run(
        [vitalrisk_exe(), *args, "--params", str(root / "params.yaml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_service_follows_promote_rollback_and_external_alias_changes(tmp_path: Path) -> None:
    root = tmp_path
    env = server_env(root)
    env["VITALRISK_ACTOR"] = "dr-who"
    (root / "params.yaml").write_text(PARAMS)
    row = _register(root, env)
    port = free_port()
    proc = start_server(root, env, port)
    url = f"http://127.0.0.1:{port}"
    switches: dict[str, float] = {}
    try:
        with Load(url, row) as load:
            load.wait_for("1")
            _cli(env, root, "promote", "--version", "2", "--reason", "better on ward 3")
            switches["promote"] = load.wait_for("2")
            assert (
                httpx.get(
                    f"{url}/v1/model", headers={"Authorization": f"Bearer {KEYS['admin']}"}
                ).json()["version"]
                == "2"
            )
            _cli(env, root, "rollback", "--reason", "alert storm")
            switches["rollback"] = load.wait_for("1")
            # someone moves the alias in the MLflow UI (its REST API underneath)
            from mlflow import MlflowClient

            uri = env["MLFLOW_TRACKING_URI"]
            MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
                MODEL, "champion", "2"
            )
            switches["external"] = load.wait_for("2")
            time.sleep(1.5)  # a few more answers from version 2
    finally:
        stop_server(proc)

    assert load.errors == [], load.errors[:5]
    statuses = {s for s, _, _ in load.results}
    assert statuses == {200}, f"failed requests: {statuses}"
    versions = [v for _, v, _ in load.results]
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes == ["1", "2", "1", "2"], changes  # each switch once, no flapping
    assert len(load.results) > 50
    # each switch took at most the watch interval plus the load of the other version
    assert max(switches.values()) < 30, switches

    # the prediction log and the audit log name the version that answered each request
    answered = {rid: v for _, v, rid in load.results}
    con = sqlite3.connect(root / "logs" / "predictions.sqlite")
    logged = {
        rid: (version, setting, horizon)
        for rid, version, setting, horizon in con.execute(
            "SELECT request_id, model_version, setting, horizon_hours FROM predictions "
            "WHERE role = 'champion'"
        )
    }
    con.close()
    assert {rid: v for rid, (v, _, _) in logged.items() if rid in answered} == answered
    assert {(s, h) for _, s, h in logged.values()} == {("ward", 24.0)}
    entries = [
        json.loads(line) for line in (root / "logs" / "audit.jsonl").read_text().splitlines()
    ]
    audited = {
        rid: e["model_version"]
        for e in entries
        if e["action"] == "predict"
        for rid in e["details"].get("request_ids", [])
    }
    assert {rid: audited.get(rid) for rid in answered} == answered
    swaps = [
        (e["model_version"], e["details"]["previous_version"])
        for e in entries
        if e["action"] == "model_swap"
    ]
    assert swaps == [("2", "1"), ("1", "2"), ("2", "1")]
    external = [e for e in entries if e["action"] == "alias_changed_outside"]
    assert [(e["model_version"], e["details"]["noticed_by"].split(" (")[0]) for e in external] == [
        ("2", "vitalrisk-serve")
    ]
    people = {(e["action"], e["actor"], e["model_version"]) for e in entries}
    assert {("promote", "dr-who", "2"), ("rollback", "dr-who", "1")} <= people
