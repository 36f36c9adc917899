"""Everything the API needs after start-up, built once per worker process.

Kept apart from ``serving/service.py`` (the BentoML wrapper) so the logic is importable and
testable without a server, and so a BentoML upgrade touches one file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import UserError
from core.vocabulary import Vocabulary, load_vocabulary, vocabulary_from_dict
from features.build import FeatureArrays, input_codes
from governance.audit import AuditLogError
from models.thresholds import Thresholds, model_thresholds
from serving import safety
from serving.auditq import AuditWriter
from serving.auth import KeyStore, RateLimiter
from serving.batching import Job, ScoreQueue
from serving.config import (
    ServeConfig,
    check_secrets,
    ingest_preliminary,
    load_serve_config,
    model_name,
    params_path,
)
from serving.identities import IdentityMap
from serving.predlog import (
    AnswerRecord,
    PgPredictionLog,
    PredictionLog,
    PredictionRecord,
    features_json,
)
from serving.schemas import (
    FeatureRow,
    FeatureScore,
    ModelInfo,
    ModelRef,
    ObservationsRequest,
    ObservationsResponse,
    PatientIn,
    PatientScore,
    RiskThresholds,
    ScoreResponse,
    ValidRows,
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


@dataclass(frozen=True)
class ModelSet:
    """The models one answer is computed with, and everything that depends on them.

    Built whole (outside the request path) and swapped in with one assignment
    (``Runtime.swap``): a request takes the current set once and uses it throughout, so an
    answer, its prediction-log rows and its audit entry always name the version that scored it.
    """

    champion: LoadedModel
    shadow: LoadedModel | None
    feature_config: Any
    texts: dict[str, FeatureText]
    info: ModelInfo
    input_codes: Any
    #: feature-row keys accepted by /v1/score/features (features, NEWS2 and ``setting``)
    known: frozenset[str]
    categorical: frozenset[str]
    logged_cols: list[str]
    #: label horizon of the champion per care setting (hours), logged with each prediction
    horizons: Mapping[str, float]
    #: the vocabulary the champion was trained with: raw observations are judged by it
    vocab: Vocabulary
    #: the champion's own risk thresholds, fitted and logged with it (``models.thresholds``)
    thresholds: Thresholds

    def horizon(self, setting: str | None) -> float | None:
        if setting and setting in self.horizons:
            return float(self.horizons[setting])
        values = set(self.horizons.values())
        return float(values.pop()) if len(values) == 1 else None


@dataclass
class Runtime:
    config: ServeConfig
    keys: KeyStore
    vocab: Vocabulary
    models: ModelSet
    audit: AuditWriter
    predlog: PredictionLog | PgPredictionLog
    #: caller ids sealed per API key (``serving/identities.py``); None: ids are not kept
    identities: IdentityMap | None = None
    limiter: RateLimiter = field(init=False)
    #: set by ``serving.follow`` when the service follows the registry's aliases
    follower: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        from serving.stores import rate_limiter

        self.limiter = rate_limiter(self.config)  # Redis, a file shared by workers, or memory
        self._column_cache: dict[tuple[Any, ...], np.ndarray | None] = {}
        #: request id -> the champion version that answered (/v1/score/features is batched by
        #: BentoML, so the guard learns the version from here); bounded, popped by the guard
        self._answered: OrderedDict[str, str] = OrderedDict()
        self._answered_lock = threading.Lock()
        #: request id -> the API key name that sent it (answers are logged per key)
        self._actors: dict[str, str] = {}
        #: raw-observation requests queue up and are scored in batches (serving/batching.py)
        self.queue: ScoreQueue[Sequence[PatientIn]] = ScoreQueue(
            self.score_jobs, self.config.score_batch_patients, self.config.inline_observations
        )

    # the current set's parts (each read is one attribute load: take ``models`` once instead
    # when several parts must belong together)
    @property
    def champion(self) -> LoadedModel:
        return self.models.champion

    @property
    def shadow(self) -> LoadedModel | None:
        return self.models.shadow

    @property
    def info(self) -> ModelInfo:
        return self.models.info

    def swap(self, models: ModelSet) -> ModelSet:
        """Serve ``models`` from now on; requests already scoring finish with the old set."""
        old, self.models = self.models, models
        return old

    def _remember(self, request_ids: Sequence[str], version: str) -> None:
        with self._answered_lock:
            for rid in dict.fromkeys(request_ids):
                self._answered[rid] = version
            while len(self._answered) > 10_000:
                self._answered.popitem(last=False)

    def answered_by(self, request_id: str) -> str | None:
        """The champion version that scored ``request_id`` (once; for the audit entry)."""
        with self._answered_lock:
            return self._answered.pop(request_id, None)

    # -- /v1/score/features ---------------------------------------------------------------
    def check_feature_rows(self, valid: ValidRows) -> tuple[int, str] | None:
        """The model's checks of validated rows before adaptive batching (a bad row must not
        fail a whole batch): known features only, text only for categorical ones. Rows that
        pass get their model input (``FeatureRow._model_input``), built in the same pass:
        finding every feature in a row with as many keys proves it has no unknown one."""
        rows = valid.rows
        models = self.models
        if not rows:
            return 422, "rows: expected a non-empty list of {patient_id?, features: {name: value}}"
        if len(rows) > self.config.max_feature_rows:
            return (
                413,
                f"rows: {len(rows)} rows; at most {self.config.max_feature_rows} per request",
            )
        champion = models.champion
        feats = [r.features for r in rows]
        table, inexact = champion.table(feats)
        text = set(valid.text)
        for i in sorted(text.union(inexact)):
            f = feats[i]
            if i in text:
                bad = [
                    k for k, v in f.items() if isinstance(v, str) and k not in models.categorical
                ]
                if bad:
                    return (
                        422,
                        f"rows[{i}].features: {bad[:5]} must be numbers or null (text only for categorical features)",
                    )
            if not f.keys() <= models.known:
                unknown = [k for k in f if k not in models.known]
                return 422, (
                    f"rows[{i}].features: unknown feature(s) {unknown[:5]}; "
                    f"GET /v1/model lists the {len(champion.feature_names)} features"
                )
        X = champion.encode(table)
        for i, row in enumerate(rows):
            row._model_input = (champion, X, i)
        return None

    @staticmethod
    def _model_input(rows: Sequence[FeatureRow], model: LoadedModel) -> np.ndarray | None:
        """The rows' matrix for ``model`` as the guard built it, if it did for all of them
        (one request's rows, in order: that very matrix; a batch of requests: stacked)."""
        inputs = [x for r in rows if (x := r._model_input) is not None and x[0] is model]
        if len(inputs) != len(rows):
            return None
        X = inputs[0][1]
        if len(X) == len(rows) and all(x[1] is X and x[2] == i for i, x in enumerate(inputs)):
            return np.asarray(X)
        return np.vstack([x[1][x[2]] for x in inputs])

    def score_rows(self, rows: list[FeatureRow]) -> list[FeatureScore]:
        """Score a (batched) list of rows; one prediction-log transaction for the batch."""
        models = self.models  # one set for the whole batch, whatever the follower does
        champion, shadow = models.champion, models.shadow
        feats = [r.features for r in rows]
        X = self._model_input(rows, champion)
        if X is None:
            X = champion.matrix(feats)
        p = champion.predict_matrix(X)
        ids = [pseudonym_of(r.patient_id) if r.patient_id else None for r in rows]
        scored_at = _now_iso()
        rids = [r.request_id or uuid.uuid4().hex for r in rows]
        texts = [features_json(f) for f in feats]  # serialised once, shared with the shadow
        news2 = [_num(f.get("news2_total")) for f in feats]
        pids = [pid or "" for pid in ids]
        settings = [_text(f.get("setting")) for f in feats]
        context = _RowContext(scored_at, rids, pids, news2, texts, settings, models)
        records = _records(champion, "champion", context, p)
        if shadow is not None:
            ps = shadow.predict_matrix(shadow.matrix(feats))
            records += _records(shadow, "shadow", context, ps)
        self.predlog.append(records)
        self._remember(rids, champion.version)
        out = []
        # a feature row carries no single-parameter scores unless sent: the aggregate rule
        # and any news2_* sub-scores it has
        singles = _max_singles(feats)
        for row, pi, rid, n2, single in zip(rows, p, rids, news2, singles, strict=True):
            v = safety.decide(float(pi), models.thresholds, safety.OK, n2, single)
            out.append(
                FeatureScore(
                    patient_id=row.patient_id,
                    probability=float(pi),
                    risk_band=str(v.risk_band),
                    alert=v.alert,
                    escalation=v.escalation,
                    model_version=champion.version,
                    request_id=rid,
                )
            )
        return out

    # -- /v1/score ------------------------------------------------------------------------
    def feature_arrays(
        self, prepared: list[PreparedPatient], models: ModelSet | None = None
    ) -> FeatureArrays:
        """The training feature code's output, rows in request order (patients are distinct)."""
        from features.build import features_from_arrays

        models = models or self.models
        inputs = feature_inputs_for(prepared, models.input_codes)
        out = features_from_arrays(inputs, models.feature_config, models.vocab)
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

    def prepare(
        self, patients: Sequence[PatientIn], models: ModelSet | None = None
    ) -> list[PreparedPatient]:
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
        return prepare_patients(patients, (models or self.models).vocab, self.config)

    async def score(
        self, patients: Sequence[PatientIn], request_id: str, actor: str = ""
    ) -> tuple[ScoreResponse, list[str]]:
        """Score one request's patients in the next batch (``serving/batching.py``);
        ``actor`` is the API key name (its answers and caller ids are kept under it)."""
        if actor:
            self._actors[request_id] = actor
        n_obs = sum(len(p.observations) for p in patients)
        try:
            result: tuple[ScoreResponse, list[str]] = await self.queue.submit(
                patients, request_id, len(patients), n_obs
            )
        finally:  # a refused request never reaches the answer log: forget its key here
            self._actors.pop(request_id, None)
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
        models = self.models  # one set (and vocabulary) for the batch, whatever the follower does
        for i, job in enumerate(jobs):
            try:
                prepared = self.prepare(job.payload, models)
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
                resps = self.score_prepared([(prep, rid) for _, prep, rid in group], models)
            except Exception as exc:
                logger.exception("scoring a batch of %d request(s) failed", len(group))
                for i, _, _ in group:
                    results[i] = exc
                continue
            for (i, prep, _), resp in zip(group, resps, strict=True):
                results[i] = (resp, [pp.pseudonym for pp in prep])
        return results

    def score_prepared(
        self,
        requests: Sequence[tuple[list[PreparedPatient], str]],
        models: ModelSet | None = None,
    ) -> list[ScoreResponse]:
        """Features, probabilities, the safety rules, reasons and one prediction-log commit.

        Every request has a patient, and patients are distinct across ``requests`` (see
        :meth:`score_jobs`); each request keeps its own request id in its answer and in the
        prediction log. Only answers with a probability get ``predictions`` rows; every
        answer (also ``insufficient_data``) gets an ``answers`` row, in the same transaction.
        """
        models = models or self.models  # one set for the whole batch, whatever the follower does
        champion, shadow = models.champion, models.shadow
        prepared = [pp for prep, _ in requests for pp in prep]
        rids = [rid for prep, rid in requests for _ in prep]
        frame = self.feature_arrays(prepared, models)
        X = self._feature_matrix(frame, champion)
        p = champion.predict_matrix(X)
        contrib = champion.contributions_matrix(X)
        logged_cols = models.logged_cols
        values = self._logged_values(frame, logged_cols)
        news2 = [_num(v) for v in values[:, logged_cols.index("news2_total")]]
        has_parts = all(n in frame.names for n in safety.NEWS2_PARTS)
        parts = self._logged_values(frame, list(safety.NEWS2_PARTS))
        settings = [_text(v) for v in frame.setting.tolist()]
        scored_at = _now_iso()
        scores: list[PatientScore] = []
        answers: list[AnswerRecord] = []
        ok: list[int] = []
        for i, pp in enumerate(prepared):
            as_of_ns = _ns(pp.as_of)
            latest = safety.latest_times(pp.codes, pp.time_ns, as_of_ns)
            status, detail = safety.data_status(
                latest, as_of_ns, settings[i], self.config.data_sufficiency
            )
            single = safety.max_single([_num(v) for v in parts[i]])
            v = safety.decide(float(p[i]), models.thresholds, status, news2[i], single)
            warnings = pp.warnings + missing_warnings(models.vocab, pp)
            if not has_parts:
                warnings.append(
                    "NEWS2 single-parameter rule not applied: this model's features have no "
                    "NEWS2 sub-scores"
                )
            reasons = (
                explain(
                    champion.feature_names, X[i], contrib[i], models.texts, self.config.top_features
                )
                if v.status == safety.OK
                else []
            )
            if v.status == safety.OK:
                ok.append(i)
            score = PatientScore(
                patient_id=pp.caller_id or pp.pseudonym,
                status=v.status,  # type: ignore[arg-type]
                status_detail=detail,
                as_of=pp.as_of.isoformat().replace("+00:00", "Z"),
                setting=settings[i],
                horizon_hours=models.horizon(settings[i]),
                probability=None if v.probability is None else round(v.probability, 6),
                risk_band=v.risk_band,  # type: ignore[arg-type]
                model_risk_band=v.model_band,  # type: ignore[arg-type]
                alert=v.alert,
                escalation=v.escalation,  # type: ignore[arg-type]
                escalation_text=v.escalation_text,
                news2_total=news2[i],
                news2_max_single=single,
                latest_observations={c: safety.iso_ns(t) for c, t in sorted(latest.items())},
                top_features=reasons,
                warnings=warnings,
            )
            scores.append(score)
            answers.append(self._answer_record(rids[i], scored_at, pp, score, models, self.config))
        logged = [
            features_json(dict(zip(logged_cols, values[i].tolist(), strict=True))) for i in ok
        ]
        context = _RowContext(
            scored_at,
            [rids[i] for i in ok],
            [prepared[i].pseudonym for i in ok],
            [news2[i] for i in ok],
            logged,
            [settings[i] for i in ok],
            models,
        )
        records = _records(champion, "champion", context, p[ok])
        if shadow is not None and ok:
            ps = shadow.predict_matrix(self._feature_matrix(frame, shadow))
            records += _records(shadow, "shadow", context, ps[ok])
        self._keep_identities(answers, prepared)
        self.predlog.append(records, answers)
        model = ModelRef(name=champion.name, version=champion.version)
        t = models.thresholds
        bands = RiskThresholds(
            low=t.low, high=t.high, alert_budget_per_100=t.alert_budget_per_100, unit=t.unit
        )
        out = []
        start = 0
        for prep, rid in requests:
            out.append(
                ScoreResponse(
                    request_id=rid,
                    model=model,
                    thresholds=bands,
                    results=scores[start : start + len(prep)],
                )
            )
            start += len(prep)
        return out

    @staticmethod
    def _answer_record(
        rid: str,
        scored_at: str,
        pp: PreparedPatient,
        score: PatientScore,
        models: ModelSet,
        config: ServeConfig,
    ) -> AnswerRecord:
        return AnswerRecord(
            request_id=rid,
            scored_at=scored_at,
            as_of=score.as_of,
            patient_id=pp.pseudonym,
            key_name="",  # set by _keep_identities (the key is known per request)
            model_name=models.champion.name,
            model_version=models.champion.version,
            status=score.status,
            probability=score.probability,
            risk_band=score.risk_band,
            model_risk_band=score.model_risk_band,
            alert=score.alert,
            escalation=score.escalation,
            news2_total=score.news2_total,
            news2_max_single=score.news2_max_single,
            setting=score.setting,
            horizon_hours=score.horizon_hours,
            age_band=age_band(pp.covariates.get("age"), config.feedback.age_bands),
            reasons=tuple(c.text for c in score.top_features),
            latest=score.latest_observations,
        )

    def _keep_identities(
        self, answers: list[AnswerRecord], prepared: Sequence[PreparedPatient]
    ) -> None:
        """Name each answer's key; keep the caller ids sealed for that key."""
        by_key: dict[str, list[tuple[str, str]]] = {}
        for j, (a, pp) in enumerate(zip(answers, prepared, strict=True)):
            actor = self._actors.get(a.request_id, "")
            answers[j] = dataclasses.replace(a, key_name=actor)
            if actor and pp.caller_id:
                by_key.setdefault(actor, []).append((pp.pseudonym, pp.caller_id))
        for rid in {a.request_id for a in answers}:
            self._actors.pop(rid, None)
        if self.identities is not None:
            for actor, pairs in by_key.items():
                self.identities.remember(actor, pairs)

    # -- /v1/observations -----------------------------------------------------------------
    def collect(
        self, req: ObservationsRequest, request_id: str, actor: str = ""
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
        callers: dict[str, str] = {}

        def pseudonym(pid: str) -> str:
            ps = pseudonym_of(pid)
            callers[ps] = pid
            return ps

        rows, rejected = validate_items(
            req.observations, self.vocab, pseudonym, self.config.future_tolerance_minutes
        )
        landed = write_landing(rows, self.config.landing_path(), request_id) if rows else None
        pats = sorted({r["patient_id"] for r in rows})
        if self.identities is not None and actor:
            self.identities.remember(actor, [(ps, callers[ps]) for ps in pats if ps in callers])
        resp = ObservationsResponse(
            request_id=request_id,
            received=len(req.observations),
            accepted=len(rows),
            rejected=rejected,
            landing_file=landed,
        )
        return resp, pats


@dataclass(frozen=True)
class _RowContext:
    """What the prediction-log rows of one batch share between the champion and its shadow."""

    scored_at: str
    request_ids: Sequence[str]
    patient_ids: Sequence[str]
    news2: Sequence[float | None]
    features: Sequence[str]
    settings: Sequence[str | None]
    models: ModelSet


def _records(
    model: LoadedModel,
    role: str,
    ctx: _RowContext,
    probabilities: np.ndarray | Sequence[float],
) -> list[PredictionRecord]:
    """Prediction-log rows of one model (``champion`` or its ``shadow``) for scored rows."""
    horizon = ctx.models.horizon
    return [
        PredictionRecord(
            rid,
            ctx.scored_at,
            pid,
            model.name,
            model.version,
            role,
            float(p),
            n2,
            f,
            st,
            horizon(st),
        )
        for rid, pid, p, n2, f, st in zip(
            ctx.request_ids,
            ctx.patient_ids,
            probabilities,
            ctx.news2,
            ctx.features,
            ctx.settings,
            strict=True,
        )
    ]


def _max_singles(feats: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """``safety.max_single`` of each row's NEWS2 sub-scores as :func:`_num` reads them
    (non-finite or absent: not scored), for all rows at once."""
    names = safety.NEWS2_PARTS
    try:
        parts = np.array([[f.get(n) for n in names] for f in feats], dtype=float)
    except (TypeError, ValueError):  # text where a sub-score belongs: one by one
        return [safety.max_single([_num(f.get(n)) for n in names]) for f in feats]
    parts = parts.reshape(len(feats), len(names))
    best = np.where(np.isfinite(parts), parts, -np.inf).max(axis=1, initial=-np.inf)
    return [None if b == -np.inf else b for b in best.tolist()]


def _ns(t: datetime) -> int:
    from serving.scoring import _ns_of

    return _ns_of(t)


def age_band(age: Any, edges: Sequence[float]) -> str | None:
    """``"65-80"`` for an age within the configured band edges (None when unknown)."""
    a = _num(age)
    if a is None:
        return None
    for lo, hi in itertools.pairwise(edges):
        if lo <= a < hi:
            return f"{lo:g}-{hi:g}"
    return f"{edges[-1]:g}+" if a >= edges[-1] else None


def _text(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    text = str(v)
    return text or None


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


def _run_vocabulary(tracking: Any, run_id: str | None) -> Vocabulary | None:
    """The vocabulary logged with the model's training run (``vocabulary.json``), if any:
    the service must judge units and ranges as the training data was judged."""
    if not run_id:
        return None
    try:
        local = tracking.client().download_artifacts(run_id, "vocabulary.json")
        data = json.loads(Path(local).read_text(encoding="utf-8"))
        return vocabulary_from_dict(data)
    except Exception as exc:  # older runs: the project's vocabulary, with a warning
        logger.warning("no vocabulary logged with run %s (%s); using the project's", run_id, exc)
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
        ingest_preliminary(params)  # FHIR status policy shared with ingest: checked at start
    except (ValueError, UserError) as exc:
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


def label_horizons(model: Any) -> dict[str, float]:
    """Label horizon per care setting the model was trained for (its feature dictionary's)."""
    label = (getattr(model, "metadata", None) or {}).get("label") or {}
    horizon = label.get("horizon_hours")
    if isinstance(horizon, Mapping):
        return {str(k): float(v) for k, v in horizon.items()}
    if isinstance(horizon, int | float):
        return {"*": float(horizon)}
    return {}


@dataclass(frozen=True)
class PinnedModel:
    """A model shipped inside a Bento (``serving.service.pinned_model``): served as is."""

    path: Path
    name: str
    version: str
    run_id: str | None
    metrics: dict[str, float]
    dictionary: Path | None


def _loaded(info: Any, model: Any) -> LoadedModel:
    return LoadedModel(info.name, info.version, info.alias, info.run_id, model)


def load_models(
    config: ServeConfig,
    vocab: Vocabulary,
    name: str,
    champion_version: str | None = None,
    shadow_version: str | None = None,
) -> ModelSet:
    """The champion (by alias, or the given version), its shadow and what depends on them.

    Raises ``StartupError`` with one clear sentence when something the service needs is missing.
    """
    from models import tracking

    try:
        if champion_version is None:
            info, model = tracking.load_by_alias(name, tracking.CHAMPION)
        else:
            info, model = tracking.load_version(name, champion_version)
            info = tracking.LoadedVersion(**{**info.__dict__, "alias": tracking.CHAMPION})
    except LookupError:
        raise StartupError(
            f"no champion to serve: registered model {name!r} has no '{tracking.CHAMPION}' alias "
            f"in {tracking.describe_store()} (run `dvc repro` / `vitalrisk promote` first, or set "
            "MLFLOW_TRACKING_URI / VITALRISK_MODEL_NAME)"
        ) from None
    champion = _loaded(info, model)
    shadow = None
    if config.shadow_challenger:
        try:
            if shadow_version is None:
                sinfo, smodel = tracking.load_by_alias(name, tracking.CHALLENGER)
            else:
                sinfo, smodel = tracking.load_version(name, shadow_version)
            if sinfo.version != info.version:
                shadow = _loaded(sinfo, smodel)
        except LookupError:
            shadow = None
    # units and ranges as the champion was trained with (its run's vocabulary.json)
    vocab = _run_vocabulary(tracking, info.run_id) or vocab
    # the feature params the champion was trained with: its run's feature dictionary first
    run_dict = _run_dictionary(tracking, info.run_id)
    path = config.feature_dictionary_path()
    try:
        fconf = _load_features_config(run_dict, path)
    except Exception as exc:
        raise StartupError(f"feature params unusable: {exc}") from None
    doc = run_dict or _dictionary(path, fconf, vocab, champion.feature_names)
    return _model_set(champion, shadow, fconf, doc, vocab, _model_info(champion, shadow, tracking))


def load_pinned(config: ServeConfig, vocab: Vocabulary, pinned: PinnedModel) -> ModelSet:
    """The Bento's own model (no registry, no shadow): what ``bentoml build`` pinned."""
    from models import tracking

    model = tracking.load_model(str(pinned.path))
    champion = LoadedModel(pinned.name, pinned.version, tracking.CHAMPION, pinned.run_id, model)
    dictionary = pinned.dictionary or config.feature_dictionary_path()
    try:
        fconf = _load_features_config(None, dictionary)
    except Exception as exc:
        raise StartupError(f"feature params unusable: {exc}") from None
    doc = _dictionary(dictionary, fconf, vocab, champion.feature_names)
    info = ModelInfo(
        name=pinned.name,
        version=pinned.version,
        alias=tracking.CHAMPION,
        run_id=pinned.run_id,
        features=champion.feature_names,
        training_data_hash=None,
        metrics=pinned.metrics,
        shadow=None,
    )
    return _model_set(champion, None, fconf, doc, vocab, info)


def _model_set(
    champion: LoadedModel,
    shadow: LoadedModel | None,
    fconf: Any,
    doc: dict[str, Any],
    vocab: Vocabulary,
    info: ModelInfo,
) -> ModelSet:
    categorical = frozenset(getattr(champion.model, "categories", None) or {})
    thresholds = model_thresholds(getattr(champion.model, "metadata", None))
    if thresholds is None:
        raise StartupError(
            f"model {champion.name} version {champion.version} carries no fitted risk "
            "thresholds (trained before they were logged with the model): retrain it "
            "(`dvc repro`) and promote the new version"
        )
    info = info.model_copy(
        update={
            "thresholds": RiskThresholds(
                low=thresholds.low,
                high=thresholds.high,
                alert_budget_per_100=thresholds.alert_budget_per_100,
                unit=thresholds.unit,
            )
        }
    )
    return ModelSet(
        champion=champion,
        shadow=shadow,
        feature_config=fconf,
        texts=load_feature_texts(doc, champion.feature_names, vocab),
        info=info,
        input_codes=input_codes(fconf, vocab),
        known=frozenset(champion.feature_names) | {"news2_total", "setting"},
        categorical=categorical | {"setting"},
        logged_cols=list(dict.fromkeys([*champion.feature_names, "news2_total"])),
        horizons=label_horizons(champion.model),
        vocab=vocab,
        thresholds=thresholds,
    )


def build_runtime(
    follow: bool = True, primary: bool = True, pinned: PinnedModel | None = None
) -> Runtime:
    """Load params, keys, vocabulary, the champion (and challenger for shadow scoring).

    ``follow``: watch the registry's aliases every ``serve.model_watch_seconds`` and swap
    models while serving (``serving.follow``); ``primary``: this worker also notices alias
    changes made outside vitalrisk (one worker does, so each change is audited once);
    ``pinned``: serve this Bento's own model instead (no registry, nothing to follow).
    Raises ``StartupError`` with one clear sentence when something the service needs is missing.
    """
    config, keys, name = load_startup()
    vocab = load_vocabulary()
    models = (
        load_models(config, vocab, name) if pinned is None else load_pinned(config, vocab, pinned)
    )
    # the feature kernels loaded (compiled once per machine, then from numba's cache) before
    # the service reports ready: the first requests must not wait for a compiler
    from features.kernels import warm_up

    warm_up()
    from serving.stores import StoreError, audit_store, prediction_log

    try:  # no audit trail, no service: recover a crash-torn tail, check it can be appended
        audit = AuditWriter(audit_store(config)).start()
    except (AuditLogError, OSError) as exc:
        raise StartupError(f"audit log unusable: {exc}") from None
    try:
        predlog = prediction_log(config)
        rt = Runtime(
            config=config,
            keys=keys,
            vocab=vocab,
            models=models,
            audit=audit,
            predlog=predlog,
            identities=IdentityMap(config.database_location() or config.identity_map_path()),
        )
    except StoreError as exc:
        audit.close()
        raise StartupError(str(exc)) from None
    logger.info(
        "serving %s version %s (%d features)%s",
        name,
        models.champion.version,
        len(models.champion.feature_names),
        f", shadow version {models.shadow.version}" if models.shadow else "",
    )
    if follow and pinned is None and config.model_watch_seconds > 0:
        from serving.follow import ModelFollower

        rt.follower = ModelFollower(rt, name, config.model_watch_seconds, primary).start()
    return rt
