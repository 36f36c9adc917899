"""Everything the API needs after start-up, built once per worker process.

Kept apart from ``serving/service.py`` (the BentoML wrapper) so the logic is importable and
testable without a server, and so a BentoML upgrade touches one file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary, load_vocabulary
from features.build import FeatureArrays, input_codes
from governance.audit import AuditLog, AuditLogError
from serving.auditq import AuditWriter
from serving.auth import KeyStore, RateLimiter, SharedRateLimiter
from serving.batching import Job, ScoreQueue
from serving.config import (
    ServeConfig,
    check_secrets,
    load_serve_config,
    model_name,
    params_path,
)
from serving.predlog import PredictionLog, PredictionRecord, features_json
from serving.schemas import (
    FeatureRow,
    FeatureScore,
    ModelInfo,
    ModelRef,
    ObservationsRequest,
    ObservationsResponse,
    PatientIn,
    PatientScore,
    ScoreResponse,
)
from serving.scoring import (
    FeatureText,
    LoadedModel,
    PreparedPatient,
    explain,
    feature_inputs_for,
    load_feature_texts,
    missing_warnings,
    prepare_patients,
    pseudonym_of,
)

logger = logging.getLogger(__name__)

_RUNTIME: Runtime | None = None


class StartupError(RuntimeError):
    """The service cannot start (no champion, no API keys, bad params): the message says why."""


def current_runtime() -> Runtime | None:
    return _RUNTIME


def set_runtime(rt: Runtime | None) -> None:
    global _RUNTIME
    _RUNTIME = rt


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Runtime:
    config: ServeConfig
    keys: KeyStore
    vocab: Vocabulary
    champion: LoadedModel
    shadow: LoadedModel | None
    audit: AuditWriter
    predlog: PredictionLog
    feature_config: Any
    texts: dict[str, FeatureText]
    info: ModelInfo
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        workers = int(os.environ.get("VITALRISK_SERVE_WORKERS", self.config.workers))
        if workers > 1:  # one limit per key across the worker processes
            self.limiter = SharedRateLimiter(
                self.config.rate_limit_per_second,
                self.config.rate_limit_burst,
                self.config.prediction_log_path().parent / "rate_limits.sqlite",
            )
        else:
            self.limiter = RateLimiter(
                self.config.rate_limit_per_second, self.config.rate_limit_burst
            )
        self._known = set(self.champion.feature_names) | {"news2_total"}
        self._categorical = set(getattr(self.champion.model, "categories", None) or {})
        self._logged_cols = list(dict.fromkeys([*self.champion.feature_names, "news2_total"]))
        self._column_cache: dict[tuple[Any, ...], np.ndarray | None] = {}
        self._input_codes = input_codes(self.feature_config, self.vocab)
        #: raw-observation requests queue up and are scored in batches (serving/batching.py)
        self.queue: ScoreQueue[Sequence[PatientIn]] = ScoreQueue(
            self.score_jobs, self.config.score_batch_patients, self.config.inline_observations
        )

    # -- /v1/score/features ---------------------------------------------------------------
    def check_feature_rows(self, body: dict[str, Any]) -> tuple[int, str] | None:
        """Cheap checks before adaptive batching (a bad row must not fail a whole batch)."""
        rows = body.get("rows")
        if not isinstance(rows, list) or not rows:
            return 422, "rows: expected a non-empty list of {patient_id?, features: {name: value}}"
        if len(rows) > self.config.max_feature_rows:
            return (
                413,
                f"rows: {len(rows)} rows; at most {self.config.max_feature_rows} per request",
            )
        for i, row in enumerate(rows):
            feats = row.get("features") if isinstance(row, dict) else None
            if not isinstance(feats, dict):
                return 422, f"rows[{i}].features: expected an object of feature -> number or null"
            # set operations in C first: rows of hundreds of features, up to thousands of rows
            if str in set(map(type, feats.values())):
                bad = [
                    k for k, v in feats.items() if isinstance(v, str) and k not in self._categorical
                ]
                if bad:
                    return (
                        422,
                        f"rows[{i}].features: {bad[:5]} must be numbers or null (text only for categorical features)",
                    )
            if not feats.keys() <= self._known:
                unknown = [k for k in feats if k not in self._known]
                return 422, (
                    f"rows[{i}].features: unknown feature(s) {unknown[:5]}; "
                    f"GET /v1/model lists the {len(self.champion.feature_names)} features"
                )
        return None

    def score_rows(self, rows: list[FeatureRow]) -> list[FeatureScore]:
        """Score a (batched) list of rows; one prediction-log transaction for the batch."""
        feats = [r.features for r in rows]
        X = self.champion.matrix(feats)
        p = self.champion.predict_matrix(X)
        ids = [pseudonym_of(r.patient_id) if r.patient_id else None for r in rows]
        scored_at = _now_iso()
        rids = [r.request_id or uuid.uuid4().hex for r in rows]
        texts = [features_json(f) for f in feats]  # serialised once, shared with the shadow
        news2 = [_num(f.get("news2_total")) for f in feats]
        pids = [pid or "" for pid in ids]
        records = _records(self.champion, "champion", scored_at, rids, pids, p, news2, texts)
        if self.shadow is not None:
            ps = self.shadow.predict_matrix(self.shadow.matrix(feats))
            records += _records(self.shadow, "shadow", scored_at, rids, pids, ps, news2, texts)
        self.predlog.append(records)
        bands = self.config.risk_bands
        return [
            FeatureScore(
                patient_id=pid,
                probability=float(pi),
                risk_band=bands.band(float(pi)),
                model_version=self.champion.version,
                request_id=rid,
            )
            for pid, pi, rid in zip(ids, p, rids, strict=True)
        ]

    # -- /v1/score ------------------------------------------------------------------------
    def feature_arrays(self, prepared: list[PreparedPatient]) -> FeatureArrays:
        """The training feature code's output, rows in request order (patients are distinct)."""
        from features.build import features_from_arrays

        inputs = feature_inputs_for(prepared, self._input_codes)
        out = features_from_arrays(inputs, self.feature_config, self.vocab)
        row_of = {pid: i for i, pid in enumerate(out.patient_id.tolist())}
        rows = [row_of[p.pseudonym] for p in prepared]
        if rows != list(range(len(out.patient_id))):
            out = FeatureArrays(
                names=out.names,
                values=out.values[:, rows],
                patient_id=out.patient_id[rows],
                time_ns=out.time_ns[rows],
                setting=out.setting[rows],
            )
        return out

    def _columns(self, names: list[str], wanted: tuple[str, ...]) -> np.ndarray | None:
        """Positions of ``wanted`` in the feature arrays' ``names`` (cached), None if absent."""
        key = (tuple(names), wanted)
        try:
            return self._column_cache[key]
        except KeyError:
            pass
        pos = {n: i for i, n in enumerate(names)}
        cols = (
            np.array([pos[n] for n in wanted], dtype=np.intp)
            if all(n in pos for n in wanted)
            else None
        )
        if len(self._column_cache) > 16:  # names never change in practice; stay bounded
            self._column_cache.clear()
        self._column_cache[key] = cols
        return cols

    def _feature_matrix(self, arrays: FeatureArrays, model: LoadedModel) -> np.ndarray:
        """Model input straight from the feature arrays (numeric; categories as in training)."""
        cols = self._columns(arrays.names, tuple(model.feature_names))
        if cols is not None:  # every model feature is a float column of the arrays
            return np.ascontiguousarray(arrays.values[cols].T, dtype=np.float64)
        sub = arrays.frame().reindex(columns=model.feature_names)
        if all(pd.api.types.is_numeric_dtype(t) for t in sub.dtypes):
            return sub.to_numpy(dtype=float)
        return model.matrix(sub.astype(object).where(sub.notna(), None).to_dict("records"))

    def _logged_values(self, arrays: FeatureArrays, logged_cols: list[str]) -> np.ndarray:
        """(row, column) float64 values of ``logged_cols``; NaN for a column not computed."""
        cols = self._columns(arrays.names, tuple(logged_cols))
        if cols is not None:
            return np.asarray(arrays.values[cols].T, dtype=np.float64)
        return arrays.frame().reindex(columns=logged_cols).to_numpy(dtype=float)

    def prepare(self, patients: Sequence[PatientIn]) -> list[PreparedPatient]:
        """Validate and canonicalise one request's patients (``InputError`` lists problems)."""
        if len(patients) > self.config.max_patients:
            from serving.scoring import InputError

            raise InputError(
                [
                    (
                        "patients",
                        f"{len(patients)} patients; at most {self.config.max_patients} per request",
                    )
                ],
                status=413,
            )
        return prepare_patients(patients, self.vocab, self.config)

    async def score(
        self, patients: Sequence[PatientIn], request_id: str
    ) -> tuple[ScoreResponse, list[str]]:
        """Score one request's patients in the next batch (``serving/batching.py``)."""
        n_obs = sum(len(p.observations) for p in patients)
        result: tuple[ScoreResponse, list[str]] = await self.queue.submit(
            patients, request_id, len(patients), n_obs
        )
        return result

    def score_jobs(
        self, jobs: Sequence[Job[Sequence[PatientIn]]]
    ) -> list[tuple[ScoreResponse, list[str]] | Exception]:
        """Score a batch of requests together; a request's bad input fails only that request.

        Requests that share a patient go to separate sub-batches: the feature code computes
        one row per (patient, time), and each request must get its own patient's answer.
        """
        results: list[tuple[ScoreResponse, list[str]] | Exception] = [
            RuntimeError("not scored")
        ] * len(jobs)
        groups: list[list[tuple[int, list[PreparedPatient], str]]] = []
        used: list[set[str]] = []
        for i, job in enumerate(jobs):
            try:
                prepared = self.prepare(job.payload)
            except Exception as exc:  # InputError -> 4xx for this request only
                results[i] = exc
                continue
            ids = {pp.pseudonym for pp in prepared}
            for group, seen in zip(groups, used, strict=True):
                if not ids & seen:
                    group.append((i, prepared, job.request_id))
                    seen |= ids
                    break
            else:
                groups.append([(i, prepared, job.request_id)])
                used.append(set(ids))
        for group in groups:
            try:
                resps = self.score_prepared([(prep, rid) for _, prep, rid in group])
            except Exception as exc:
                logger.exception("scoring a batch of %d request(s) failed", len(group))
                for i, _, _ in group:
                    results[i] = exc
                continue
            for (i, prep, _), resp in zip(group, resps, strict=True):
                results[i] = (resp, [pp.pseudonym for pp in prep])
        return results

    def score_prepared(
        self, requests: Sequence[tuple[list[PreparedPatient], str]]
    ) -> list[ScoreResponse]:
        """Features, probabilities, reasons and one prediction-log commit for all requests.

        Every request has a patient, and patients are distinct across ``requests`` (see
        :meth:`score_jobs`); each request keeps its own request id in its answer and in the
        prediction log.
        """
        prepared = [pp for prep, _ in requests for pp in prep]
        rids = [rid for prep, rid in requests for _ in prep]
        pids = [pp.pseudonym for pp in prepared]
        names = self.champion.feature_names
        frame = self.feature_arrays(prepared)
        X = self._feature_matrix(frame, self.champion)
        p = self.champion.predict_matrix(X)
        contrib = self.champion.contributions_matrix(X)
        logged_cols = self._logged_cols
        values = self._logged_values(frame, logged_cols)
        news2 = [_num(v) for v in values[:, logged_cols.index("news2_total")]]
        scored_at = _now_iso()
        logged = [
            features_json(dict(zip(logged_cols, row.tolist(), strict=True))) for row in values
        ]
        records = _records(self.champion, "champion", scored_at, rids, pids, p, news2, logged)
        if self.shadow is not None:
            ps = self.shadow.predict_matrix(self._feature_matrix(frame, self.shadow))
            records += _records(self.shadow, "shadow", scored_at, rids, pids, ps, news2, logged)
        self.predlog.append(records)
        scores = []
        for i, pp in enumerate(prepared):
            warnings = pp.warnings + missing_warnings(self.vocab, pp)
            scores.append(
                PatientScore(
                    patient_id=pp.pseudonym,
                    as_of=pp.as_of.isoformat().replace("+00:00", "Z"),
                    probability=round(float(p[i]), 6),
                    risk_band=self.config.risk_bands.band(float(p[i])),  # type: ignore[arg-type]
                    news2_total=news2[i],
                    top_features=explain(
                        names, X[i], contrib[i], self.texts, self.config.top_features
                    ),
                    warnings=warnings,
                )
            )
        model = ModelRef(name=self.champion.name, version=self.champion.version)
        out = []
        start = 0
        for prep, rid in requests:
            out.append(
                ScoreResponse(
                    request_id=rid, model=model, results=scores[start : start + len(prep)]
                )
            )
            start += len(prep)
        return out

    # -- /v1/observations -----------------------------------------------------------------
    def collect(
        self, req: ObservationsRequest, request_id: str
    ) -> tuple[ObservationsResponse, list[str]]:
        from serving.landing import validate_items, write_landing

        if len(req.observations) > self.config.max_collect_observations:
            from serving.scoring import InputError

            raise InputError(
                [
                    (
                        "observations",
                        f"{len(req.observations)} items; at most {self.config.max_collect_observations} per request",
                    )
                ],
                status=413,
            )
        rows, rejected = validate_items(
            req.observations, self.vocab, pseudonym_of, self.config.future_tolerance_minutes
        )
        path = write_landing(rows, self.config.landing_path(), request_id) if rows else None
        pats = sorted({r["patient_id"] for r in rows})
        resp = ObservationsResponse(
            request_id=request_id,
            received=len(req.observations),
            accepted=len(rows),
            rejected=rejected,
            landing_file=path.name if path else None,
        )
        return resp, pats


def _records(
    model: LoadedModel,
    role: str,
    scored_at: str,
    request_ids: Sequence[str],
    patient_ids: Sequence[str],
    probabilities: np.ndarray | Sequence[float],
    news2: Sequence[float | None],
    features: Sequence[str],
) -> list[PredictionRecord]:
    """Prediction-log rows of one model (``champion`` or its ``shadow``) for scored rows."""
    return [
        PredictionRecord(rid, scored_at, pid, model.name, model.version, role, float(p), n2, f)
        for rid, pid, p, n2, f in zip(
            request_ids, patient_ids, probabilities, news2, features, strict=True
        )
    ]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def _load_features_config(run_dict: dict[str, Any] | None, dictionary: Path) -> Any:
    """Feature params the model was trained with: the run's dictionary ``params``, else the
    dictionary file's, else the ``features`` section of params.yaml."""
    from features.config import FeaturesConfig

    docs: list[Any] = [run_dict]
    if dictionary.is_file():
        try:
            docs.append(json.loads(dictionary.read_text(encoding="utf-8")))
        except ValueError as exc:
            logger.warning("%s: unreadable (%s)", dictionary, exc)
    for doc in docs:
        params = doc.get("params") if isinstance(doc, dict) else None
        if isinstance(params, dict):
            try:
                return FeaturesConfig.model_validate(params)
            except ValueError as exc:
                logger.warning("feature params in the dictionary unusable (%s)", exc)
    import yaml

    p = params_path()
    raw = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else {}
    return FeaturesConfig.model_validate((raw or {}).get("features") or {})


def _dictionary(path: Path, fconf: Any, vocab: Vocabulary, names: list[str]) -> dict[str, Any]:
    """The training feature dictionary if present, else the same document built in-process."""
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        except ValueError as exc:
            logger.warning("%s: unreadable (%s); rebuilding the dictionary", path, exc)
    from features.build import feature_dictionary

    static = [n for n in names if n in ("age", "sex_f") or n.startswith("cm_")]
    return feature_dictionary(fconf, vocab, static)


#: where the training-data hash may be recorded on the run, most specific first
DATA_HASH_KEYS = ("data_dvc_md5", "training_data_hash", "data_hash", "features_md5")


def _run_dictionary(tracking: Any, run_id: str | None) -> dict[str, Any] | None:
    """``feature_dictionary.json`` logged with the model's training run (any folder), if any."""
    if not run_id:
        return None
    try:
        c = tracking.client()
        folders = [""]
        while folders:
            folder = folders.pop(0)
            for item in c.list_artifacts(run_id, folder or None):
                if item.is_dir and folder.count("/") < 2:
                    folders.append(item.path)
                elif item.path.rsplit("/", 1)[-1] == "feature_dictionary.json":
                    local = c.download_artifacts(run_id, item.path)
                    data = json.loads(Path(local).read_text(encoding="utf-8"))
                    return data if isinstance(data, dict) else None
    except Exception as exc:  # informative only: fall back to the dictionary on disk
        logger.warning("no feature dictionary from run %s: %s", run_id, exc)
    return None


def _model_info(champion: LoadedModel, shadow: LoadedModel | None, tracking: Any) -> ModelInfo:
    metrics: dict[str, float] = {}
    data_hash: str | None = None
    if champion.run_id:
        try:
            run = tracking.client().get_run(champion.run_id)
            metrics = {k: float(v) for k, v in run.data.metrics.items()}
            recorded = {**run.data.params, **run.data.tags}
            data_hash = next((str(recorded[k]) for k in DATA_HASH_KEYS if recorded.get(k)), None)
        except Exception as exc:  # metadata is informative; scoring must still start
            logger.warning("could not read MLflow run %s: %s", champion.run_id, exc)
    meta = getattr(champion.model, "metadata", None) or {}
    if data_hash is None:
        for k, v in meta.items():
            if "hash" in str(k).lower():
                data_hash = str(v)
                break
    return ModelInfo(
        name=champion.name,
        version=champion.version,
        alias=champion.alias,
        run_id=champion.run_id,
        features=champion.feature_names,
        training_data_hash=data_hash,
        metrics=metrics,
        shadow=ModelRef(name=shadow.name, version=shadow.version) if shadow else None,
    )


def load_startup(params: str | Path | None = None) -> tuple[ServeConfig, KeyStore, str]:
    """The ``serve`` params, the API keys and the registered model name, checked.

    Shared by ``vitalrisk serve`` (its pre-flight) and the service's start-up, so both refuse
    the same things with the same sentence (``StartupError``).
    """
    try:
        config = load_serve_config(params)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        keys = KeyStore.from_env()
    except ValueError as exc:  # AuthConfigError is a ValueError
        raise StartupError(str(exc)) from None
    if not keys.keys:
        raise StartupError(
            "no API keys configured: set VITALRISK_API_KEYS (name:scope1+scope2:secret, "
            "comma-separated) or VITALRISK_API_KEYS_FILE (see README, Serving)"
        )
    try:
        check_secrets()
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    return config, keys, model_name(params)


def quiet_gc() -> None:
    """Move everything alive after start-up out of the garbage collector's sight.

    The loaded libraries leave about a million tracked objects; a full collection walks them
    all, which stalled requests for about 300 ms every two seconds under load. ``gc.freeze``
    exempts them, and a higher gen-2 threshold keeps the objects created afterwards (caches,
    lazily built schemas) from triggering full collections every few thousand allocations.
    Young cycles are still collected as usual.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


def build_runtime() -> Runtime:
    """Load params, keys, vocabulary, the champion (and challenger for shadow scoring).

    Raises ``StartupError`` with one clear sentence when something the service needs is missing.
    """
    from models import tracking

    config, keys, name = load_startup()
    try:
        info, model = tracking.load_by_alias(name, tracking.CHAMPION)
    except LookupError:
        raise StartupError(
            f"no champion to serve: registered model {name!r} has no '{tracking.CHAMPION}' alias "
            f"in {tracking.tracking_uri()} (run `dvc repro` / `vitalrisk register` first, or set "
            "MLFLOW_TRACKING_URI / VITALRISK_MODEL_NAME)"
        ) from None
    champion = LoadedModel(info.name, info.version, info.alias, info.run_id, model)
    shadow = None
    if config.shadow_challenger:
        try:
            sinfo, smodel = tracking.load_by_alias(name, tracking.CHALLENGER)
            if sinfo.version != info.version:
                shadow = LoadedModel(sinfo.name, sinfo.version, sinfo.alias, sinfo.run_id, smodel)
        except LookupError:
            shadow = None
    vocab = load_vocabulary()
    # the feature params the champion was trained with: its run's feature dictionary first
    run_dict = _run_dictionary(tracking, info.run_id)
    path = config.feature_dictionary_path()
    try:
        fconf = _load_features_config(run_dict, path)
    except Exception as exc:
        raise StartupError(f"feature params unusable: {exc}") from None
    doc = run_dict or _dictionary(path, fconf, vocab, champion.feature_names)
    texts = load_feature_texts(doc, champion.feature_names, vocab)
    try:  # no audit trail, no service: recover a crash-torn tail, check it can be appended
        audit = AuditWriter(
            AuditLog(config.audit_log_path(), head_interval=0.5, keep_open=True)
        ).start()
    except (AuditLogError, OSError) as exc:
        raise StartupError(f"audit log unusable: {exc}") from None
    rt = Runtime(
        config=config,
        keys=keys,
        vocab=vocab,
        champion=champion,
        shadow=shadow,
        audit=audit,
        predlog=PredictionLog(config.prediction_log_path(), config.prediction_log_synchronous),
        feature_config=fconf,
        texts=texts,
        info=_model_info(champion, shadow, tracking),
    )
    logger.info(
        "serving %s version %s (%d features)%s",
        name,
        info.version,
        len(champion.feature_names),
        f", shadow version {shadow.version}" if shadow else "",
    )
    return rt
