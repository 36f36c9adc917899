"""``vitalrisk bento``: ``bentoml build`` pins the registry's champion and installs only the
runtime dependencies; the Bento then serves its own copy of the model without a registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving.conftest import KEYS, free_port, server_env, vitalrisk_exe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CODE = ["serving", "features", "models", "governance", "ingest", "core", "config"]
FILES = ["bentofile.yaml", "requirements.serve.txt"]
TOOLS = ("pytest", "ruff", "mypy", "hypothesis", "schemathesis", "dvc", "evidently", "optuna")


def _pins(text: str) -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
    return dict(ln.lower().split("==", 1) for ln in lines if "==" in ln)


def test_serve_requirements_are_the_locked_runtime_packages():
    serve = _pins((ROOT / "requirements.serve.txt").read_text())
    lock = _pins((ROOT / "requirements.lock").read_text())
    assert {k: lock.get(k) for k in serve} == serve, "requirements.serve.txt drifted from the lock"
    assert not [k for k in serve if k.startswith(TOOLS)]


def test_bento_pins_the_champion_and_serves_it_without_the_registry(tmp_path):
    from tests.serving.factory import register_models

    proj = tmp_path / "proj"
    proj.mkdir()
    for name in CODE:
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in FILES:
        shutil.copy2(ROOT / name, proj / name)
    (proj / "params.yaml").write_text("register:\n  model_name: vitalrisk-deterioration\n")
    env = server_env(tmp_path)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        models = register_models(tmp_path / "work")
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    champion = models["champion"][0]
    built = subprocess.run(
        [vitalrisk_exe(), "bento", "--params", "params.yaml"],
        cwd=proj, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"vitalrisk-deterioration:v{champion}" in built.stdout

    bentoml = [sys.executable, "-m", "bentoml"]
    info = subprocess.run(
        [*bentoml, "get", "vitalrisk:latest", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert info.returncode == 0, info.stderr[-2000:]
    bento = json.loads(info.stdout)
    assert [m["tag"] for m in bento["models"]] == [f"vitalrisk-deterioration:v{champion}"]
    path = Path(env["BENTOML_HOME"]) / "bentos" / "vitalrisk" / bento["version"]
    found = sorted((path / "env").rglob("requirements*.txt"))
    assert found, sorted(str(p.relative_to(path)) for p in path.rglob("*") if "src" not in p.parts)
    reqs = _pins(found[0].read_text())
    assert reqs == _pins((ROOT / "requirements.serve.txt").read_text())
    bento_yaml = yaml.safe_load((Path(path) / "bento.yaml").read_text())
    assert {e["name"]: e["value"] for e in bento_yaml["envs"]}["VITALRISK_BENTO_MODEL"]
    assert not (Path(path) / "src" / "tests").exists()
    # every project module the service imports is inside the Bento (subpackages included)
    import serving.service  # noqa: F401

    ours = {
        Path(m.__file__).resolve().relative_to(ROOT)
        for m in list(sys.modules.values())
        if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(ROOT)
        and Path(m.__file__).resolve().relative_to(ROOT).parts[0] in CODE
    }  # fmt: skip
    missing = sorted(str(f) for f in ours if not (Path(path) / "src" / f).is_file())
    assert not missing, f"the Bento lacks modules the service imports: {missing}"

    # the Bento's model, not the registry: no MLflow store reachable, another alias set
    run_env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    run_env["VITALRISK_BENTO_MODEL"] = "vitalrisk-deterioration:latest"  # as the image sets it
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [*bentoml, "serve", "vitalrisk:latest", "--port", str(port), "--host", "127.0.0.1"],
        cwd=cwd, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (
                server.stderr.read().decode()[-3000:] if server.stderr else ""
            )
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        info = httpx.get(f"{url}/v1/model", headers=headers, timeout=30).json()
        assert (info["version"], info["shadow"]) == (champion, None)
        row = models["frame"].drop(columns=["patient_id", "time", "setting", "label"]).iloc[0]
        feats = {k: (None if v != v else float(v)) for k, v in row.items()}
        r = httpx.post(
            f"{url}/v1/score/features", json={"rows": [{"features": feats}]}, headers=headers
        )
        assert r.status_code == 200 and r.json()[0]["model_version"] == champion
        expected = models["champion"][1].predict_proba(row.to_frame().T.astype(float))[0]
        assert r.json()[0]["probability"] == pytest.approx(expected, rel=1e-9)
        assert not (cwd / "mlflow.db").exists(), "the Bento must not open an MLflow store"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
