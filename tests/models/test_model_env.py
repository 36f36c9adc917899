"""The logged model is self-contained: in a clean virtualenv with only the model's own
requirements (no vitalrisk, no --system-site-packages), ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` give the same probabilities as in the project.

Slow (one fresh virtualenv, its packages from PyPI or pip's cache): one test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from models import tracking
from models.config import TrainConfig
from models.train import train_model

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(venv: Path) -> dict[str, str]:
    """An activated venv and nothing else: no PYTHONPATH, no project, no tracking server."""
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR")
    # pip's own settings (index, wheelhouse, certificates) say where packages come from
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PIP_")}
    env.update(
        {
            "PATH": f"{venv / 'bin'}:/usr/bin:/bin",  # `mlflow models serve` runs uvicorn
            "VIRTUAL_ENV": str(venv),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


def test_logged_model_loads_and_serves_in_a_clean_virtualenv(frame, mlflow_env, tmp_path):
    model = train_model(frame, TrainConfig(cv_folds=0, n_estimators=60)).model
    with tracking.start_run(run_name="portable"):
        uri = tracking.log_risk_model(model, frame.head(5), tmp_path / "work")
    model_dir = tracking.download_model(uri, tmp_path / "exported")
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert not any(
        r.startswith(("vitalrisk", "dvc", "bentoml", "evidently", "pytest")) for r in reqs
    )
    assert (model_dir / "code" / "models" / "pyfunc.py").is_file()
    X = frame.head(40)[model.feature_names]
    expected = model.predict_proba(X)
    (tmp_path / "input.json").write_text(X.to_json(orient="split", index=False))

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    env = _clean_env(venv)
    started = time.monotonic()
    pip = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
         str(model_dir / "requirements.txt")],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    install_s = time.monotonic() - started
    # nothing of ours in the venv: ``models`` can only come from the model's code/
    probe = subprocess.run(
        [py, "-c", "import importlib.util as u; print(u.find_spec('models'), u.find_spec('vitalrisk'))"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.stdout.split() == ["None", "None"], probe.stdout

    load = (
        "import json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "X = pd.read_json(sys.argv[2], orient='split').astype(float)  # JSON 2.0 reads as int\n"
        "print(json.dumps([float(p) for p in m.predict(X)]))\n"
        "import models.pyfunc; print(models.pyfunc.__file__, file=sys.stderr)\n"
    )
    out = subprocess.run(
        [py, "-c", load, str(model_dir), str(tmp_path / "input.json")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(json.loads(out.stdout.splitlines()[-1]), expected, rtol=1e-9)
    assert str(model_dir / "code") in out.stderr  # the shipped copy, not the project

    port = _free_port()
    server = subprocess.Popen(
        [str(venv / "bin" / "mlflow"), "models", "serve", "-m", str(model_dir),
         "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (server.stderr.read() if server.stderr else b"")[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        body = {"dataframe_split": json.loads((tmp_path / "input.json").read_text())}
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text[:2000]
        np.testing.assert_allclose(r.json()["predictions"], expected, rtol=1e-9)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    print(f"clean venv: pip install of the model's requirements took {install_s:.0f}s")
