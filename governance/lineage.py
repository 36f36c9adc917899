"""Lineage record of a trained model: code, data, params, features and consent that produced it.

The training stage builds the record with :func:`collect_lineage`, logs :func:`lineage_tags`
as MLflow run tags and the full record as the run artifact ``lineage.json`` (plus
``feature_dictionary.json``). ``vitalrisk lineage MODEL_VERSION`` reads them back. The names are
defined here, once, so writer and reader cannot drift apart. No MLflow import: this module only
builds and formats plain dicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

LINEAGE_ARTIFACT = "lineage.json"
FEATURE_DICTIONARY_ARTIFACT = "feature_dictionary.json"

#: MLflow run tag names (the contract with ``models``/``pipelines.train``)
TAG_GIT_COMMIT = "git_commit"
TAG_GIT_DIRTY = "git_dirty"
TAG_DATA_DVC_MD5 = "data_dvc_md5"
TAG_PARAMS_HASH = "params_hash"
TAG_FEATURE_DICTIONARY_HASH = "feature_dictionary_hash"
TAG_CONSENT_PURPOSE = "consent_purpose"
TAG_CONSENT_EXCLUDED = "consent_patients_excluded"
TAG_KEY_FINGERPRINT = "pseudonym_key_fingerprint"
#: md5 of the feature matrix file the run trained on (written by ``models.lineage``)
TAG_FEATURES_MD5 = "features_md5"
#: MLflow's own tag, set automatically when a run starts inside a git checkout
MLFLOW_GIT_TAG = "mlflow.source.git.commit"


def canonical_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys): equal configs, equal hashes."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: files DVC itself rewrites while it runs the pipeline: a change there is not a change of code,
#: params or data (``dvc repro`` records each finished stage in dvc.lock before the next runs)
DVC_BOOKKEEPING = frozenset({"dvc.lock"})


def dirty_files(porcelain: str) -> list[str]:
    """Changed tracked files from ``git status --porcelain`` output, without DVC's bookkeeping."""
    out = []
    for line in porcelain.splitlines():
        path = line[3:].split(" -> ")[-1].strip().strip('"')
        if path and Path(path).name not in DVC_BOOKKEEPING:
            out.append(path)
    return out


def git_commit(repo: str | Path = ".") -> tuple[str | None, bool | None]:
    """``(HEAD commit, working tree dirty?)``; ``(None, None)`` outside a git checkout.

    Dirty means a tracked file differs from HEAD, except ``dvc.lock`` (see DVC_BOOKKEEPING).
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=30,
        )
        dirty = bool(dirty_files(status.stdout)) if status.returncode == 0 else None
        return head.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def dvc_file_hash(path: str | Path = "data.dvc") -> dict[str, Any] | None:
    """Hash, size and file count recorded by ``dvc add`` in a ``.dvc`` file (None if absent)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        out = (doc.get("outs") or [{}])[0]
    except (yaml.YAMLError, AttributeError, IndexError):
        logger.warning("%s: not a readable .dvc file", p)
        return None
    return {
        "file": str(p),
        "md5": out.get("md5"),
        "hash": out.get("hash"),
        "size": out.get("size"),
        "nfiles": out.get("nfiles"),
        "path": out.get("path"),
    }


def file_sha256(path: str | Path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def collect_lineage(
    *,
    params: Mapping[str, Any],
    feature_dictionary: Mapping[str, Any] | None = None,
    consent: Mapping[str, Any] | None = None,
    repo: str | Path = ".",
    data_dvc: str | Path = "data.dvc",
    key_fingerprint: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to say what produced a model.

    ``params``: the params sections the training used (e.g. ``{"features": ..., "train": ...}``);
    ``consent``: the consent filter applied to the training data, e.g.
    :meth:`governance.consent.ConsentFilterResult.as_dict` (purpose and excluded counts);
    ``key_fingerprint``: :func:`governance.pseudonym.key_fingerprint` of the pseudonym key;
    ``extra``: more fields, e.g. ``{"ingest_consent": report["consent"]}`` from
    ``reports/ingest.json`` when ingestion already filtered by consent (then shown too).
    """
    commit, dirty = git_commit(repo)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "data": dvc_file_hash(
            Path(repo) / data_dvc if not Path(data_dvc).is_absolute() else data_dvc
        ),
        "params": dict(params),
        "params_hash": canonical_hash(dict(params)),
        "feature_dictionary_hash": None
        if feature_dictionary is None
        else canonical_hash(dict(feature_dictionary)),
        "consent": dict(consent) if consent else None,
        "pseudonym_key_fingerprint": key_fingerprint,
        **dict(extra or {}),
    }


def lineage_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """Flat MLflow run tags from a lineage record (searchable; the artifact has the detail)."""
    data = record.get("data") or {}
    consent = record.get("consent") or {}
    tags = {
        TAG_GIT_COMMIT: record.get("git_commit"),
        TAG_GIT_DIRTY: record.get("git_dirty"),
        TAG_DATA_DVC_MD5: data.get("md5") or data.get("hash"),
        TAG_PARAMS_HASH: record.get("params_hash"),
        TAG_FEATURE_DICTIONARY_HASH: record.get("feature_dictionary_hash"),
        TAG_CONSENT_PURPOSE: consent.get("purpose"),
        TAG_CONSENT_EXCLUDED: consent.get("patients_excluded"),
        TAG_KEY_FINGERPRINT: record.get("pseudonym_key_fingerprint"),
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def format_lineage(info: Mapping[str, Any]) -> str:
    """Human-readable report for the CLI (``info`` as assembled by ``pipelines.lineage``)."""
    lines: list[str] = []
    missing: list[str] = []

    def show(label: str, value: Any) -> None:
        if value is None or value == "" or value == {}:
            missing.append(label)
            value = "(not recorded)"
        lines.append(f"  {label:<26} {value}")

    lines.append(f"model {info.get('name')} version {info.get('version')}")
    show("aliases", ", ".join(info.get("aliases") or []) or None)
    show("run", info.get("run_id"))
    show("created", info.get("created"))
    lines.append("code")
    show("git commit", info.get("git_commit"))
    if info.get("git_dirty") is not None:
        show("uncommitted changes", info.get("git_dirty"))
    lines.append("data")
    show("data.dvc md5", info.get("data_dvc_md5"))
    data = info.get("data") or {}
    if data:
        show("data.dvc size / files", f"{data.get('size')} bytes / {data.get('nfiles')} files")
    if info.get("features_md5"):
        show("feature matrix md5", info.get("features_md5"))
    show("pseudonym key", info.get("pseudonym_key_fingerprint"))
    lines.append("consent filter")
    consent = info.get("consent") or {}
    show("purpose", consent.get("purpose") or info.get("consent_purpose"))
    show(
        "patients kept / excluded",
        None
        if not consent
        else f"{consent.get('patients_kept')} / {consent.get('patients_excluded')}",
    )
    ingest = info.get("ingest_consent") or {}
    if ingest:
        lines.append(
            f"  {'at ingestion':<26} purpose {ingest.get('purpose')}: "
            f"{ingest.get('patients_excluded')} patients excluded"
        )
    lines.append("params")
    show("params hash", info.get("params_hash"))
    params = info.get("params") or {}
    if params:
        for line in yaml.safe_dump(params, sort_keys=True, default_flow_style=False).splitlines():
            lines.append(f"    {line}")
    lines.append("features")
    show("feature dictionary hash", info.get("feature_dictionary_hash"))
    fd = info.get("feature_dictionary") or {}
    feats = fd.get("features") or []
    if feats:
        lines.append(f"    {len(feats)} features:")
        for f in feats:
            extra = ", ".join(str(f[k]) for k in ("window", "unit") if f.get(k))
            lines.append(f"    - {f.get('name')}" + (f" ({extra})" if extra else ""))
    else:
        missing.append("feature dictionary")
    promotions = info.get("promotions") or []
    if promotions:
        lines.append("registry and audit")
        for p in promotions:
            lines.append(f"    {p}")
    if missing:
        lines.append(f"missing: {', '.join(missing)}")
    return "\n".join(lines)
