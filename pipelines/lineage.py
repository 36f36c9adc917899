"""``vitalrisk lineage MODEL_VERSION``: what produced a registered model version.

Reads the MLflow run behind the version: the ``lineage.json`` and ``feature_dictionary.json``
artifacts and the lineage tags (names in ``governance.lineage``), plus the version's alias
history and the audit-log entries that name it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import UserError

HELP = "print git commit, data.dvc hash, params, feature dictionary and consent filter of a model version"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_version", help="version number, or an alias such as champion")
    parser.add_argument(
        "--name", default=None, help="registered model (default: params register.model_name)"
    )
    parser.add_argument("--params", default="params.yaml", help="params file for the default name")
    parser.add_argument("--json", action="store_true", help="print the lineage as JSON")
    parser.add_argument(
        "--audit-log",
        default=None,
        help="audit log file or postgresql:// chain (default: $VITALRISK_SERVE_DB_URL, else "
        "$VITALRISK_AUDIT_LOG or logs/audit.jsonl)",
    )


def _default_name(params_path: str) -> str:
    from models.tracking import DEFAULT_MODEL_NAME

    try:
        from core.params import read_params

        section = read_params(params_path).get("register") or {}
        return str(section.get("model_name") or DEFAULT_MODEL_NAME)
    except UserError:
        return DEFAULT_MODEL_NAME


def _find_artifact(client: Any, run_id: str, basename: str, depth: int = 2) -> str | None:
    """Artifact path of the first file called ``basename`` (root first, then subfolders)."""
    queue: list[tuple[str | None, int]] = [(None, 0)]
    while queue:
        folder, d = queue.pop(0)
        try:
            items = client.list_artifacts(run_id, folder)
        except Exception:
            continue
        for it in items:
            if not it.is_dir and it.path.rsplit("/", 1)[-1] == basename:
                return str(it.path)
        queue.extend((it.path, d + 1) for it in items if it.is_dir and d + 1 <= depth)
    return None


def _load_json_artifact(client: Any, run_id: str, basename: str) -> dict[str, Any] | None:
    path = _find_artifact(client, run_id, basename)
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        try:
            data = json.loads(Path(local).read_text(encoding="utf-8"))
        except ValueError:
            logger.warning("run %s: artifact %s is not valid JSON", run_id, path)
            return None
    return data if isinstance(data, dict) else None


def model_lineage(name: str, version: str, audit_log: str | None = None) -> dict[str, Any]:
    """Assemble the lineage of ``name`` version (number or alias) from MLflow and the audit log."""
    from mlflow.exceptions import MlflowException

    from governance import lineage as L
    from governance.audit import AuditLogError, default_audit_store, open_audit_store
    from models import tracking

    # a read-only command must not create an empty store (MLflow would, for a new SQLite path)
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"{uri.removeprefix('sqlite:///')}: no MLflow store (set MLFLOW_TRACKING_URI or run "
            "`vitalrisk train` first)"
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = tracking.client()
    from models.registry import reconcile

    # alias changes made in the MLflow UI are noticed (and audited) before we report on them
    reconcile(name, noticed_by="vitalrisk lineage")
    ref = version.lstrip("@")
    try:
        mv = (
            client.get_model_version(name, ref)
            if ref.isdigit()
            else client.get_model_version_by_alias(name, ref)
        )
    except MlflowException:
        what = "version" if ref.isdigit() else "alias"
        raise UserError(
            f"registered model {name!r} has no {what} {ref!r} (tracking URI {tracking.tracking_uri()})"
        ) from None

    info: dict[str, Any] = {
        "name": name,
        "version": str(mv.version),
        # the registry's actual aliases, not tags that may describe an earlier state
        "aliases": sorted(a for a, v in tracking.aliases(name).items() if v == str(mv.version)),
        "run_id": mv.run_id,
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
            timespec="seconds"
        )
        if mv.creation_timestamp
        else None,
        "source": mv.source,
    }
    tags: dict[str, str] = {}
    run_params: dict[str, str] = {}
    record: dict[str, Any] | None = None
    if mv.run_id:
        run = client.get_run(mv.run_id)
        tags, run_params = dict(run.data.tags), dict(run.data.params)
        record = _load_json_artifact(client, mv.run_id, L.LINEAGE_ARTIFACT)
        info["feature_dictionary"] = _load_json_artifact(
            client, mv.run_id, L.FEATURE_DICTIONARY_ARTIFACT
        )
    # registration copies the run's lineage tags onto the version as ``lineage.<tag>``
    for k, v in (mv.tags or {}).items():
        if k.startswith("lineage."):
            tags.setdefault(k.removeprefix("lineage."), v)
    record = record or {}
    consent = record.get("consent") or {}
    if not consent and tags.get(L.TAG_CONSENT_PURPOSE):
        consent = {
            "purpose": tags.get(L.TAG_CONSENT_PURPOSE),
            "patients_excluded": tags.get(L.TAG_CONSENT_EXCLUDED),
        }
    data = record.get("data") or {}
    info.update(
        {
            "git_commit": record.get("git_commit")
            or tags.get(L.TAG_GIT_COMMIT)
            or tags.get(L.MLFLOW_GIT_TAG),
            "git_dirty": record.get("git_dirty", tags.get(L.TAG_GIT_DIRTY)),
            "data_dvc_md5": data.get("md5") or data.get("hash") or tags.get(L.TAG_DATA_DVC_MD5),
            "data": data,
            "params_hash": record.get("params_hash") or tags.get(L.TAG_PARAMS_HASH),
            "params": record.get("params") or run_params,
            "feature_dictionary_hash": record.get("feature_dictionary_hash")
            or tags.get(L.TAG_FEATURE_DICTIONARY_HASH)
            or (
                L.canonical_hash(info["feature_dictionary"])
                if info.get("feature_dictionary")
                else None
            ),
            "consent": consent,
            "ingest_consent": record.get("ingest_consent"),
            "pseudonym_key_fingerprint": record.get("pseudonym_key_fingerprint")
            or tags.get(L.TAG_KEY_FINGERPRINT),
            "features_md5": record.get("features_md5") or tags.get(L.TAG_FEATURES_MD5),
        }
    )
    promotions = [
        f"registry tag {k} = {v}"
        for k, v in sorted((mv.tags or {}).items())
        if k.split(".", 1)[0] in {"champion", "challenger"} or "rollback" in k
    ]
    # the database chain in team mode (VITALRISK_SERVE_DB_URL), else the file
    log = open_audit_store(audit_log) if audit_log else default_audit_store()
    try:
        for e in log.entries():
            if str(e.get("model_version")) == info["version"] and (
                name in str(e.get("resource", "")) or not e.get("resource")
            ):
                promotions.append(
                    f"audit seq {e.get('seq')} {e.get('ts')} {e.get('actor')} {e.get('action')}"
                    f" {e.get('resource')}"
                )
    except AuditLogError as exc:
        promotions.append(f"audit log unreadable: {exc}")
    finally:
        log.close()
    info["promotions"] = promotions
    return info


def run(args: argparse.Namespace) -> int:
    from governance.lineage import format_lineage

    name = args.name or _default_name(args.params)
    info = model_lineage(name, args.model_version, args.audit_log)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        print(format_lineage(info))
    return 0
