"""Suite-wide settings: no telemetry or network from MLflow, BentoML or Evidently in tests."""

import os

import pytest

for _var, _value in {
    "DO_NOT_TRACK": "1",
    "BENTOML_DO_NOT_TRACK": "True",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "EVIDENTLY_DISABLE_TELEMETRY": "1",
    "GIT_PYTHON_REFRESH": "quiet",
}.items():
    os.environ.setdefault(_var, _value)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Under ``pytest -n`` (xdist, ``--dist loadgroup``): the team-mode tests share one local
    stack on fixed ports, and LightGBM's distributed fits (team tests, tests/models/test_dask.py)
    open their own network rings, which two concurrent fits can deadlock: they all run on one
    worker, one after another. Every other module runs whole on one worker, in file order."""
    for item in items:
        node = item.nodeid.removeprefix("tests/")
        if node.startswith(("team/", "models/test_dask.py")):
            item.add_marker(pytest.mark.xdist_group("team"))
        else:  # a module's tests stay together, in order (some share a server and its logs)
            item.add_marker(pytest.mark.xdist_group(node.split("::", 1)[0]))
