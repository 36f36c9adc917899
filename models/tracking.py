"""The one MLflow wrapper of vitalrisk: tracking, datasets, model logging, registry, loading.

Why one module: MLflow's API moves quickly (3.x renamed ``artifact_path`` to ``name`` and
replaced registry stages by aliases); an upgrade should touch this file only.

Where the store is (``tracking_uri``):

* ``MLFLOW_TRACKING_URI`` if set (a server, or a SQLite file elsewhere);
* else MLflow's own default, ``mlflow.db`` in the project root, so that a plain
  ``MlflowClient()`` or ``mlflow ui`` started in the project finds the runs. The project root
  is ``DVC_ROOT`` when DVC runs the stage: DVC points it at the original repository even for
  ``dvc exp run --temp`` and queued experiments, whose working copy is a throw-away directory
  under ``.dvc/tmp/exps``; otherwise the working directory.

Artifacts: in the project's own store, experiments get the *relative* artifact location
``mlartifacts/<experiment id>``, which MLflow resolves against the working directory (the
project root for every vitalrisk command, DVC stage and ``make mlflow-ui``): a copied or moved
project keeps writing into its own ``mlartifacts/``. A DVC experiment's temporary copy gets a
link ``mlartifacts -> <project>/mlartifacts`` so its runs land in the project too. For a store
named by ``MLFLOW_TRACKING_URI`` new experiments put artifacts in ``mlartifacts/`` beside a
SQLite file (absolute; a server decides itself); ``VITALRISK_MLFLOW_ARTIFACTS`` overrides both.

Registry: ``champion`` / ``challenger`` aliases (not stages); every alias change also sets
model-version tags recording who, when and why (``models.registry`` keeps them honest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from models.pyfunc import BOOSTER_ARTIFACT, RiskModel

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"  # MLflow 3's default store: sqlite:///mlflow.db in the working dir
ARTIFACTS_DIR = "mlartifacts"
OLD_STORE_FILE = "mlruns.db"  # vitalrisk before 0.2
DEFAULT_EXPERIMENT = "vitalrisk"
DEFAULT_MODEL_NAME = "vitalrisk-deterioration"
MODEL_NAME_IN_RUN = "model"
CHAMPION = "champion"
CHALLENGER = "challenger"
#: packages the logged model needs at inference (pinned to the installed versions)
MODEL_REQUIREMENTS = ("mlflow", "lightgbm", "scikit-learn", "pandas", "numpy", "cloudpickle")
#: our modules the pickled ``RiskModel`` needs, shipped inside the model (``code_paths``)
MODEL_CODE = ("models/__init__.py", "models/pyfunc.py", "models/compiled.py")


class StoreMismatchError(LookupError):
    """A run, logged model or version named by a stage file is not in the tracking store."""


# -- where the store is ------------------------------------------------------------------------


def project_root() -> Path:
    """The project whose store we use: the original DVC repository, else the working directory."""
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else Path.cwd().resolve()


def project_store_uri() -> str:
    return f"sqlite:///{project_root() / STORE_FILE}"


def uses_project_store() -> bool:
    """True for the project's own ``mlflow.db``: no ``MLFLOW_TRACKING_URI``, or the one we set
    (``mlflow.set_tracking_uri`` exports it for subprocesses)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return not env or env == project_store_uri()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or project_store_uri()


def sqlite_path(uri: str | None = None) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for servers and other databases)."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def store_exists(uri: str | None = None) -> bool:
    """False for a SQLite store whose file does not exist yet (servers: assumed to exist)."""
    path = sqlite_path(uri)
    return path is None or path.is_file()


def describe_store(uri: str | None = None) -> str:
    """The store for messages: the file of the project store, else the URI."""
    uri = uri or tracking_uri()
    path = sqlite_path(uri)
    return str(path) if path is not None else uri


def _artifact_location(uri: str) -> str | None:
    """Absolute artifact location for a new experiment, or None for the relative default."""
    env = os.environ.get("VITALRISK_MLFLOW_ARTIFACTS")
    if env:
        return Path(env).resolve().as_uri()
    if uses_project_store():
        return None
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / ARTIFACTS_DIR).as_uri()


def _link_executor_artifacts() -> None:
    """In a DVC experiment's temporary copy, point ``./mlartifacts`` at the project's.

    MLflow resolves the relative artifact locations of the project store against the working
    directory; a ``--temp`` or queued experiment runs in a copy under ``.dvc/tmp/exps`` that
    DVC deletes afterwards (and the link with it, never its target).
    """
    if not uses_project_store() or os.environ.get("VITALRISK_MLFLOW_ARTIFACTS"):
        return
    root, here = project_root(), Path.cwd().resolve()
    if root == here:
        return
    target = root / ARTIFACTS_DIR
    link = here / ARTIFACTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    if not link.exists() and not link.is_symlink():
        link.symlink_to(target, target_is_directory=True)
        log.info("linked %s -> %s (DVC experiment copy)", link, target)


def configure() -> str:
    """Point MLflow at the configured tracking/registry URI (call from entry points/functions)."""
    import mlflow

    uri = tracking_uri()
    if uses_project_store():
        old = project_root() / OLD_STORE_FILE
        if old.is_file() and not (project_root() / STORE_FILE).is_file():
            log.warning(
                "%s is the store of an older vitalrisk; MLflow's default (and ours) is %s: "
                "`mv %s %s` to keep its runs and registry",
                old,
                STORE_FILE,
                OLD_STORE_FILE,
                STORE_FILE,
            )
        _link_executor_artifacts()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client() -> Any:
    from mlflow import MlflowClient

    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _make_relative(exp_id: str, uri: str) -> None:
    """Store ``mlartifacts/<id>`` as the experiment's artifact location (MLflow's API always
    makes a local location absolute, so a copied project would write into the original)."""
    db = sqlite_path(uri)
    if db is None:
        return
    with contextlib.closing(sqlite3.connect(str(db))) as con, con:
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
            (f"{ARTIFACTS_DIR}/{exp_id}", int(exp_id)),
        )


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Create the experiment with our artifact location if needed; make it active."""
    import mlflow

    uri = configure()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = _artifact_location(uri)
        exp_id = str(mlflow.create_experiment(name, artifact_location=location))
        if location is None:
            _make_relative(exp_id, uri)
    else:
        exp_id = str(exp.experiment_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# -- runs ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_run(
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """A run; ``system_metrics`` samples CPU, memory and disk every second while it is open."""
    import mlflow

    if not nested:
        ensure_experiment(experiment)
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    with mlflow.start_run(
        run_name=run_name,
        nested=nested,
        tags=dict(tags or {}),
        description=description,
        log_system_metrics=system_metrics or None,
    ) as run:
        yield run


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[Any]:
    """Reopen a finished run to add to it (evaluate adds its metrics to the train run)."""
    import mlflow

    configure()
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    if not store_exists():
        return False
    try:
        client().get_run(run_id)
    except MlflowException:
        return False
    return True


def check_model_in_store(run_id: str, model_uri: str, where: str) -> None:
    """Raise ``StoreMismatchError`` (one sentence) when ``where`` names a run or logged model
    the store does not have, e.g. DVC restored ``artifacts/model`` from its cache while the
    MLflow store was reset, or the store of another checkout is configured."""
    from mlflow.exceptions import MlflowException

    store = describe_store()
    hint = (
        f"the MLflow store {store} does not have it (store reset, or another project's store): "
        "retrain with `dvc repro --force train`, or set MLFLOW_TRACKING_URI to the store that "
        "has this run"
    )
    if not run_exists(run_id):
        raise StoreMismatchError(f"{where} refers to MLflow run {run_id}, but {hint}")
    if model_uri.startswith("models:/m-"):
        try:
            client().get_logged_model(model_uri.removeprefix("models:/"))
        except MlflowException:
            raise StoreMismatchError(
                f"{where} refers to logged model {model_uri}, but {hint}"
            ) from None


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

    mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})


def log_dataset(
    frame: pd.DataFrame,
    name: str,
    context: str,
    source: str,
    targets: str | None = "label",
    digest: str | None = None,
) -> str:
    """``mlflow.log_input`` of a frame (schema, row count and digest only, never the rows);
    returns the digest. ``source`` is the file the rows came from."""
    import warnings

    import mlflow

    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source class twice and says so for every path;
        # and it hints that the integer ``label`` cannot hold missing values (it never does)
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        ds = mlflow.data.from_pandas(  # type: ignore[attr-defined]
            frame,
            source=source,
            name=name,
            targets=targets if targets in frame.columns else None,
            digest=digest,
        )
        mlflow.log_input(ds, context=context)  # computes the schema (and its hint) again
    return str(ds.digest)


# -- models -------------------------------------------------------------------------------------


def model_requirements() -> list[str]:
    """Exact pins of what the logged model imports (no vitalrisk, no training tools)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in MODEL_REQUIREMENTS]


def _code_paths(workdir: Path) -> list[str]:
    """A copy of the modules the pickled model refers to, as a package ``models``.

    Only ``models/pyfunc.py`` and ``models/compiled.py``, which it imports (numpy at import
    time, tl2cgen only when compiled trees are asked for); on numpy, pandas, MLflow,
    LightGBM and scikit-learn the model then loads in a virtualenv with nothing but its
    requirements.
    """
    root = Path(__file__).resolve().parents[1]
    pkg = workdir / "code" / "models"
    pkg.mkdir(parents=True, exist_ok=True)
    for rel in MODEL_CODE:
        shutil.copy2(root / rel, pkg / Path(rel).name)
    return [str(pkg)]


def log_risk_model(
    model: RiskModel,
    input_example: pd.DataFrame,
    workdir: str | Path,
    name: str = MODEL_NAME_IN_RUN,
) -> str:
    """Log ``model`` as a self-contained pyfunc in the active run; return its ``models:/`` URI.

    The booster is written as LightGBM model text into ``workdir`` and attached as the
    ``booster`` artifact; ``models/pyfunc.py`` travels as code; the signature is inferred from
    the input example and the calibrated probabilities it produces.
    """
    import mlflow
    from mlflow.models import infer_signature

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    booster_path = workdir / "booster.txt"
    model.booster.save_model(str(booster_path))
    # every feature as double: a missing value at inference is NaN, which an integer
    # column of the signature could not hold (and MLflow warns about)
    example = model.prepare(input_example).astype("float64")
    signature = infer_signature(example, model.predict_proba(example))
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=model,
        artifacts={BOOSTER_ARTIFACT: str(booster_path)},
        signature=signature,
        input_example=example,
        pip_requirements=model_requirements(),
        code_paths=_code_paths(workdir),
    )
    return str(info.model_uri)


def run_model_uri(run_id: str, name: str = MODEL_NAME_IN_RUN) -> str:
    return f"runs:/{run_id}/{name}"


def download_model(uri: str, dst: str | Path) -> Path:
    """The model directory (MLmodel, requirements, code, artifacts) of ``uri`` under ``dst``."""
    import mlflow

    configure()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


# -- registry -----------------------------------------------------------------------------------


def register_version(
    model_uri: str,
    model_name: str = DEFAULT_MODEL_NAME,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Register ``model_uri`` as a new version of ``model_name``; return the version number."""
    import mlflow

    configure()
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    mv = mlflow.register_model(model_uri, model_name, await_registration_for=60, tags=str_tags)
    if description:
        client().update_model_version(model_name, mv.version, description=description)
    return str(mv.version)


def describe_model(model_name: str, description: str) -> None:
    """Set the registered model's description (shown on its page in the MLflow UI)."""
    client().update_registered_model(model_name, description=description)


def describe_version(model_name: str, version: str, description: str) -> None:
    client().update_model_version(model_name, str(version), description=description)


def set_version_tags(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name, str(version), k, str(v))


def delete_version_tags(model_name: str, version: str, keys: Sequence[str]) -> None:
    from mlflow.exceptions import MlflowException

    c = client()
    for k in keys:
        with contextlib.suppress(MlflowException):
            c.delete_model_version_tag(model_name, str(version), k)


def get_version(model_name: str, version: str) -> Any:
    return client().get_model_version(model_name, str(version))


def list_versions(model_name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    if not store_exists():
        return []
    try:
        found = client().search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return []
    return sorted(found, key=lambda mv: int(mv.version))


def get_alias(model_name: str, alias: str) -> Any | None:
    """The model version holding ``alias``, or None when unset / model not registered."""
    from mlflow.exceptions import MlflowException

    if not store_exists():
        return None
    try:
        return client().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def aliases(model_name: str) -> dict[str, str]:
    """The registry's actual aliases of ``model_name``: alias -> version ({} if unregistered)."""
    from mlflow.exceptions import MlflowException

    if not store_exists():
        return {}
    try:
        rm = client().get_registered_model(model_name)
    except MlflowException:
        return {}
    return {str(a): str(v) for a, v in (rm.aliases or {}).items()}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def set_alias(model_name: str, alias: str, version: str, actor: str, reason: str) -> dict[str, str]:
    """Tag ``version`` with who/when/why, then point ``alias`` at it.

    Tags first: a version holding an alias without these tags was moved there outside
    vitalrisk (``models.registry.reconcile``), so the tags must be visible no later than the
    alias.
    """
    c = client()
    record = {"alias": alias, "actor": actor, "at": now_iso(), "reason": reason}
    for k, v in record.items():
        c.set_model_version_tag(model_name, str(version), f"{alias}.{k}", v)
    c.set_registered_model_alias(model_name, alias, str(version))
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

    if not store_exists():
        return {}
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
    before = list(sys.path)
    py = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    # MLflow prepends the model's code folder (our ``MODEL_CODE``, a partial copy of
    # ``models``) to sys.path for good; this process already imported the project's package,
    # but processes it spawns later (Dask workers, multiprocessing) inherit sys.path and would
    # import the copy, without the modules it does not ship (models.dask_store, ...)
    sys.path[:] = [p for p in sys.path if p in before]
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
