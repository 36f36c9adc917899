"""The one MLflow wrapper of vitalrisk: tracking, model logging, registry aliases, loading.

Why one module: MLflow's API moves quickly (3.x renamed ``artifact_path`` to ``name`` and
replaced registry stages by aliases); an upgrade should touch this file only.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlruns.db``. With a local
SQLite store MLflow would put artifacts in ``./mlruns`` relative to the current directory;
we create experiments with an explicit artifact location ``mlartifacts/`` next to the
database file instead (env ``VITALRISK_MLFLOW_ARTIFACTS`` overrides it).
Registry: ``champion`` / ``challenger`` aliases (not stages); every alias change also sets
model-version tags recording who, when and why.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from models.pyfunc import BOOSTER_ARTIFACT, RiskModel

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_EXPERIMENT = "vitalrisk"
DEFAULT_MODEL_NAME = "vitalrisk-deterioration"
MODEL_NAME_IN_RUN = "model"
CHAMPION = "champion"
CHALLENGER = "challenger"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def artifact_root(uri: str | None = None) -> str | None:
    """Artifact location for new experiments: ``mlartifacts/`` beside a SQLite DB.

    Returns None for remote servers (the server decides).
    """
    env = os.environ.get("VITALRISK_MLFLOW_ARTIFACTS")
    if env:
        return Path(env).resolve().as_uri()
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return None
    return None


def configure() -> str:
    """Point MLflow at the configured tracking/registry URI (call from entry points/functions)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client() -> Any:
    from mlflow import MlflowClient

    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Create the experiment with an explicit artifact location if needed; make it active."""
    import mlflow

    configure()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        exp_id = mlflow.create_experiment(name, artifact_location=artifact_root())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return str(exp_id)


@contextlib.contextmanager
def start_run(
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    import mlflow

    if not nested:
        ensure_experiment(experiment)
    with mlflow.start_run(run_name=run_name, nested=nested, tags=dict(tags or {})) as run:
        yield run


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    flat = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
    mlflow.log_params(flat)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    import math

    import mlflow

    clean = {
        k.replace(">=", "ge").replace("@", "_at_"): float(v)
        for k, v in metrics.items()
        if v is not None and isinstance(v, int | float) and math.isfinite(float(v))
    }
    mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: Any, artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(obj, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["mlflow", "lightgbm", "scikit-learn", "pandas", "numpy", "cloudpickle"]
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:  # pragma: no cover - package metadata missing
            out.append(p)
    return out


def log_risk_model(
    model: RiskModel,
    input_example: pd.DataFrame,
    workdir: str | Path,
    name: str = MODEL_NAME_IN_RUN,
) -> str:
    """Log ``model`` as a pyfunc in the active run; return its ``models:/`` URI.

    The booster is written as LightGBM model text into ``workdir`` and attached as the
    ``booster`` artifact; the signature is inferred from the input example and the
    calibrated probabilities it produces.
    """
    import mlflow
    from mlflow.models import infer_signature

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    booster_path = workdir / "booster.txt"
    model.booster.save_model(str(booster_path))
    example = model.prepare(input_example)
    signature = infer_signature(example, model.predict_proba(example))
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=model,
        artifacts={BOOSTER_ARTIFACT: str(booster_path)},
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
    )
    return str(info.model_uri)


def run_model_uri(run_id: str, name: str = MODEL_NAME_IN_RUN) -> str:
    return f"runs:/{run_id}/{name}"


def register_version(
    model_uri: str, model_name: str = DEFAULT_MODEL_NAME, tags: Mapping[str, Any] | None = None
) -> str:
    """Register ``model_uri`` as a new version of ``model_name``; return the version number."""
    import mlflow

    configure()
    mv = mlflow.register_model(model_uri, model_name, await_registration_for=60)
    c = client()
    for k, v in (tags or {}).items():
        c.set_model_version_tag(model_name, mv.version, k, str(v))
    return str(mv.version)


def set_version_tags(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name, str(version), k, str(v))


def get_version(model_name: str, version: str) -> Any:
    return client().get_model_version(model_name, str(version))


def list_versions(model_name: str) -> list[Any]:
    c = client()
    try:
        found = c.search_model_versions(f"name='{model_name}'")
    except Exception:
        return []
    return sorted(found, key=lambda mv: int(mv.version))


def get_alias(model_name: str, alias: str) -> Any | None:
    """The model version holding ``alias``, or None when unset / model not registered."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def set_alias(model_name: str, alias: str, version: str, actor: str, reason: str) -> dict[str, str]:
    """Point ``alias`` at ``version`` and tag the version with who/when/why."""
    c = client()
    c.set_registered_model_alias(model_name, alias, str(version))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    record = {"alias": alias, "actor": actor, "at": when, "reason": reason}
    for k, v in record.items():
        c.set_model_version_tag(model_name, str(version), f"{alias}.{k}", v)
    log.info("%s@%s -> version %s by %s: %s", model_name, alias, version, actor, reason)
    return record


def delete_alias(model_name: str, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        client().delete_registered_model_alias(model_name, alias)


def set_registered_model_tag(model_name: str, key: str, value: str) -> None:
    client().set_registered_model_tag(model_name, key, value)


def get_registered_model_tags(model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client().get_registered_model(model_name).tags)
    except MlflowException:
        return {}


@dataclass(frozen=True)
class LoadedVersion:
    """What serving needs to know about the loaded model version."""

    name: str
    version: str
    alias: str | None
    run_id: str | None
    source: str
    tags: dict[str, str]


def load_model(uri: str) -> RiskModel:
    """Load a ``RiskModel`` from any MLflow model URI (``runs:/``, ``models:/``, path)."""
    import mlflow

    configure()
    py = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(py, RiskModel):
        raise TypeError(f"{uri} is not a vitalrisk RiskModel (got {type(py).__name__})")
    return py


def load_by_alias(
    model_name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION
) -> tuple[LoadedVersion, RiskModel]:
    """Load ``models:/<name>@<alias>``; raises LookupError when the alias is unset."""
    mv = get_alias(model_name, alias)
    if mv is None:
        raise LookupError(f"registered model {model_name!r} has no alias {alias!r}")
    return _load(model_name, mv, alias)


def load_version(model_name: str, version: str) -> tuple[LoadedVersion, RiskModel]:
    return _load(model_name, get_version(model_name, version), None)


def _load(model_name: str, mv: Any, alias: str | None) -> tuple[LoadedVersion, RiskModel]:
    model = load_model(f"models:/{model_name}/{mv.version}")
    info = LoadedVersion(
        name=model_name,
        version=str(mv.version),
        alias=alias,
        run_id=mv.run_id,
        source=str(mv.source),
        tags=dict(mv.tags or {}),
    )
    return info, model
