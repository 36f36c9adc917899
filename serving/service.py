"""The BentoML 1.4 service: the one module that touches BentoML (see DESIGN.md).

Routes (all under ``/v1`` need ``Authorization: Bearer <key>``; see ``serving/auth.py``):

* ``POST /v1/score``           raw observations -> calibrated risk, band, NEWS2, reasons
* ``POST /v1/score/features``  precomputed feature rows, BentoML adaptive batching
* ``POST /v1/fhir/score``      FHIR R4 Bundle of Observations -> FHIR R4 RiskAssessment
* ``POST /v1/observations``    data collection into the landing area for ``vitalrisk ingest``
* ``GET  /v1/model``           served version, features, training-data hash, metrics
* ``GET  /healthz``, ``/readyz`` (BentoML's probes; ready once the champion is loaded),
  ``GET /docs.json`` (OpenAPI)

Start with ``vitalrisk serve`` (``serving/supervisor.py``: clean lifetime, and the
connection limits of ``serving/worker.py``); ``bentoml serve serving.service:VitalRisk`` also
works, without those limits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import metrics
from serving.fhir import parse_bundle, risk_assessment
from serving.guard import GuardMiddleware, problems_payload
from serving.predlog import LogUnavailable
from serving.runtime import (
    PinnedModel,
    Runtime,
    StartupError,
    build_runtime,
    current_runtime,
    quiet_gc,
    set_runtime,
)
from serving.schemas import (
    ERROR_STATUSES,
    CdsDiscovery,
    CdsHookRequest,
    CdsResponse,
    CohortResponse,
    ErrorResponse,
    FeatureRow,
    FeatureScore,
    FhirBundle,
    ModelInfo,
    ObservationsRequest,
    ObservationsResponse,
    ScoreRequest,
    ScoreResponse,
)
from serving.scoring import InputError

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in ERROR_STATUSES.items()
}


class _GuardedRequest(Request):
    """A request whose body the guard already parsed as strict JSON (``serving/guard.py``).

    FastAPI would parse it a second time with the standard library (about 0.1 ms for one
    patient's day of vitals); it gets the guard's document instead, and still validates it
    against the route's pydantic model.
    """

    async def json(self) -> Any:
        ctx = self.scope.get("state", {}).get("vitalrisk")
        if isinstance(ctx, dict) and "json" in ctx:
            return ctx["json"]
        return await super().json()


class _GuardedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            return await handler(_GuardedRequest(request.scope, request.receive))

        return guarded


app = FastAPI(
    title="vitalrisk",
    version="1",
    description="Deterioration-risk scoring and data collection (see README).",
    # BentoML serves the whole API's document at /docs.json; FastAPI's own (/openapi.json,
    # /docs from a CDN) would describe only part of it
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
# the routes are module functions, not methods of the service class: BentoML would inject
# ``self`` through a synchronous dependency, which FastAPI runs on its thread pool (a thread
# hand-off per request); they reach the loaded model through ``current_runtime()`` instead
app.router.route_class = _GuardedRoute


def _rid(request: Request) -> str:
    ctx = getattr(request.state, "vitalrisk", None) or {}
    return str(ctx.get("request_id") or "")


def _audit(request: Request, patients: list[str], model_version: str | None) -> None:
    ctx = getattr(request.state, "vitalrisk", None)
    if isinstance(ctx, dict):
        ctx["patients"] = patients
        ctx["model_version"] = model_version


def _actor(request: Request) -> str:
    ctx = getattr(request.state, "vitalrisk", None) or {}
    return str(ctx.get("actor") or "")


def _rt() -> Runtime:
    rt = current_runtime()
    if rt is None:  # pragma: no cover - the guard answers 503 before this
        raise StarletteHTTPException(503, "service is starting")
    return rt


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    payload = problems_payload(exc.errors(), _rid(request))
    status = 400 if any(e["type"] == "json_invalid" for e in payload["detail"]) else 422
    return JSONResponse(payload, status_code=status)


@app.exception_handler(InputError)
async def _input(request: Request, exc: InputError) -> JSONResponse:
    detail = [{"loc": loc, "msg": msg, "type": "value_error"} for loc, msg in exc.problems[:50]]
    return JSONResponse(
        {"error": str(exc), "detail": detail, "request_id": _rid(request)}, status_code=exc.status
    )


@app.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc.detail), "request_id": _rid(request)},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


@app.exception_handler(ValidationError)
async def _invalid(request: Request, exc: ValidationError) -> JSONResponse:
    # a model built inside a route from request data (e.g. a FHIR resource): still the
    # client's input, so a 422 with the places, never a 500
    payload = problems_payload(exc.errors(include_input=False), _rid(request), one_per_place=True)
    return JSONResponse(payload, status_code=422)


@app.exception_handler(LogUnavailable)
async def _log_unavailable(request: Request, exc: LogUnavailable) -> JSONResponse:
    # the prediction log (file or database) refused the write or read: nothing was answered
    # from a half-written state, and the client can retry (serving/predlog.py)
    return JSONResponse(
        {"error": str(exc), "request_id": _rid(request)},
        status_code=503,
        headers={"retry-after": "5"},
    )


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # where it failed, not the message (it may quote a request's values): serving/logsafe.py
    logger.error("unexpected error in request %s", _rid(request), exc_info=exc)
    return JSONResponse(
        {"error": "internal error; the server log has the details", "request_id": _rid(request)},
        status_code=500,
    )


@app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, tags=["scoring"])
async def score(request: Request, body: ScoreRequest) -> Response:
    """Score patients from raw observations with the training feature code."""
    rt = _rt()
    resp, patients = await rt.score(body.patients, _rid(request), _actor(request))
    _audit(request, patients, resp.model.version)  # the version that answered
    metrics.observe_scores(resp.results, [p.covariates.setting for p in body.patients])
    # serialised here: returning the model would make FastAPI validate it once more;
    # ``response_model`` still documents it
    return Response(resp.model_dump_json(), media_type="application/json")


@app.post("/v1/fhir/score", responses=_ERRORS, tags=["scoring"])
async def fhir_score(request: Request, body: FhirBundle) -> JSONResponse:
    """FHIR R4 Bundle (Observations, optional Patient) in; FHIR R4 RiskAssessment out."""
    rt = _rt()
    patient, warnings, basis = parse_bundle(body.model_dump(exclude_none=True), rt.models.vocab)
    resp, patients = await rt.score([patient], _rid(request), _actor(request))
    _audit(request, patients, resp.model.version)  # the version that answered
    metrics.observe_scores(resp.results, [patient.covariates.setting])
    score = resp.results[0]
    score.warnings = warnings + score.warnings
    ra = risk_assessment(score, resp.model.name, resp.model.version, resp.request_id, basis)
    return JSONResponse(ra, media_type="application/fhir+json")


@app.post(
    "/v1/observations",
    response_model=ObservationsResponse,
    responses=_ERRORS,
    tags=["collection"],
)
def observations(request: Request, body: ObservationsRequest) -> ObservationsResponse:
    """Validate observations and land the good ones for the next ``vitalrisk ingest``."""
    rt = _rt()
    resp, patients = rt.collect(body, _rid(request), _actor(request))
    _audit(request, patients, None)
    metrics.observe_rejected_items(resp.rejected)
    return resp


@app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS, tags=["model"])
def model(request: Request) -> ModelInfo:
    """The served model: version, feature list, training-data hash and metrics."""
    info = _rt().info  # one read: the follower may swap models at any time
    _audit(request, [], info.version)
    return info


# -- CDS Hooks 2.0 (serving/cds.py) ---------------------------------------------------------
@app.get("/cds-services", response_model=CdsDiscovery, tags=["cds-hooks"])
def cds_discovery() -> JSONResponse:
    """CDS Hooks discovery: the patient-view service and its prefetch templates."""
    from serving import cds

    return JSONResponse(cds.discovery())


@app.post(
    "/cds-services/vitalrisk-patient-view",
    response_model=CdsResponse,
    responses=_ERRORS,
    tags=["cds-hooks"],
)
async def cds_patient_view(request: Request, body: CdsHookRequest) -> JSONResponse:
    """patient-view hook: prefetched Patient + vital-sign Observations in, one card out
    (``Authorization: Bearer <API key with the score scope>``)."""
    from serving import cds
    from serving.scoring import InputError as _InputError

    rt = _rt()
    payload, pid = cds.prefetch_bundle(body.model_dump(exclude_none=True))
    patient, warnings, _ = parse_bundle(payload, rt.models.vocab)
    if patient.patient_id != pid:
        raise _InputError(
            [("context.patientId", "the prefetched Observations are of another patient")]
        )
    resp, patients = await rt.score([patient], _rid(request), _actor(request))
    _audit(request, patients, resp.model.version)
    score = resp.results[0]
    score.warnings = warnings + score.warnings
    return JSONResponse(cds.cards(score, resp.thresholds, resp.model.name, resp.model.version))


# -- feedback: the person's summary, the cohort (serving/feedback.py) ---------------------------
class FhirJSONResponse(JSONResponse):
    media_type = "application/fhir+json"


@app.get(
    "/v1/patients/{patient_id}/summary",
    response_class=FhirJSONResponse,
    responses=_ERRORS | {404: {"model": ErrorResponse, "description": "no data from this key"}},
    tags=["feedback"],
)
def patient_summary(request: Request, patient_id: str) -> JSONResponse:
    """FHIR R4 Bundle of the patient's own observations and latest RiskAssessment (PHR):
    only for the API key that sent this patient's data."""
    from datetime import UTC, datetime, timedelta

    from serving import feedback
    from serving.landing import read_landing
    from serving.schemas import valid_patient_id
    from serving.scoring import InputError as _InputError
    from serving.scoring import pseudonym_of

    rt = _rt()
    if not valid_patient_id(patient_id):
        raise _InputError([("patient_id", "expected 1-128 printable characters")])
    caller = patient_id.strip()
    ps = pseudonym_of(caller)
    actor = _actor(request)
    _audit(request, [ps], None)
    if rt.identities is None or not rt.identities.resolve(actor, [ps]):
        raise StarletteHTTPException(
            404, f"key {actor!r} sent no data for this patient (ids are resolved per key)"
        )
    since = datetime.now(UTC) - timedelta(days=365)
    latest = feedback.answers_of(rt.predlog, actor, since, [ps])
    obs = read_landing(rt.config.landing_path(), {ps})
    doc = feedback.summary_bundle(
        caller, obs, latest[-1] if latest else None, rt.models.vocab, rt.models.champion.name
    )
    return FhirJSONResponse(doc)


@app.get("/v1/cohort", response_model=CohortResponse, responses=_ERRORS, tags=["feedback"])
def cohort_json(
    request: Request, weeks: Annotated[int | None, Query(ge=1, le=520)] = None
) -> JSONResponse:
    """Patients, alerts and events per ISO week by setting and age band over the last
    ``weeks`` (default ``serve.feedback.cohort_weeks``), cells under k suppressed
    (``serve.feedback.k_anonymity``)."""
    from serving import feedback

    rt = _rt()
    _audit(request, [], None)
    fb = rt.config.feedback
    return JSONResponse(
        feedback.cohort(rt.predlog, fb.k_anonymity, fb.age_bands, weeks or fb.cohort_weeks)
    )


# -- the clinician pages (serving/worklist.py; session cookie: serving/sessions.py) ---------
def _session(request: Request) -> Any:
    ctx = getattr(request.state, "vitalrisk", None) or {}
    return ctx.get("session")


def _form(request: Request) -> dict[str, str]:
    ctx = getattr(request.state, "vitalrisk", None) or {}
    return dict(ctx.get("form") or {})


@app.get("/worklist/static/worklist.css", include_in_schema=False)
def worklist_css() -> Response:
    from serving import worklist

    return Response(worklist.stylesheet(), media_type="text/css")


@app.get("/worklist/login", include_in_schema=False)
def login_form() -> HTMLResponse:
    from serving import worklist

    return HTMLResponse(worklist.login_page())


@app.post("/worklist/login", include_in_schema=False)
def login(request: Request) -> Response:
    """Exchange a read-scoped key (checked by the guard) for a session cookie."""
    from serving import sessions, worklist

    ctx = getattr(request.state, "vitalrisk", None) or {}
    key = ctx.get("login_key")
    if key is None:
        return HTMLResponse(
            worklist.login_page(str(ctx.get("login_error") or "unknown key")), status_code=401
        )
    minutes = _rt().config.feedback.session_minutes
    value, _ = sessions.issue(key, minutes)
    resp = RedirectResponse("/worklist", status_code=303)
    resp.raw_headers.append(
        (b"set-cookie", sessions.cookie_header(value, minutes, request.url.scheme == "https"))
    )
    return resp


@app.post("/worklist/logout", include_in_schema=False)
def logout(request: Request) -> Response:
    from serving import sessions

    session = _session(request)
    if session is None or not session.csrf_ok(_form(request).get("csrf")):
        return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
    resp = RedirectResponse("/worklist/login", status_code=303)
    resp.raw_headers.append((b"set-cookie", sessions.clear_cookie_header()))
    return resp


def _work_items(rt: Runtime, key_name: str, setting: str | None = None) -> tuple[Any, Any, Any]:
    from datetime import UTC, datetime, timedelta

    from serving import feedback

    now = datetime.now(UTC)
    start = now - timedelta(hours=rt.config.feedback.worklist_hours)
    log = rt.predlog  # the file, or in team mode the PostgreSQL log every replica writes
    answers = feedback.answers_of(log, key_name, start)
    pseudonyms = sorted({str(a["patient_id"]) for a in answers})
    callers = rt.identities.resolve(key_name, pseudonyms) if rt.identities else {}
    items = feedback.worklist(answers, callers, feedback.acknowledgements(log, key_name), setting)
    return items, now, start


@app.get("/worklist", include_in_schema=False)
def worklist_view(request: Request, setting: str | None = None) -> HTMLResponse:
    """The patients this key sent, ranked by current risk."""
    from serving import worklist

    rt = _rt()
    session = _session(request)
    chosen = setting if setting in ("ward", "home") else None
    items, now, start = _work_items(rt, session.key_name, chosen)
    _audit(request, [it.pseudonym for it in items], rt.models.champion.version)
    page = worklist.worklist_page(
        items,
        session.key_name,
        session.csrf(),
        now,
        start,
        chosen,
        rt.config.feedback.worklist_hours,
    )
    return HTMLResponse(page, headers={"cache-control": "no-store"})


@app.get("/worklist/patients/{pseudonym}", include_in_schema=False)
def patient_view(request: Request, pseudonym: str) -> HTMLResponse:
    """One patient: charts of each vital and of risk over time, alerts marked; acknowledge."""
    from collections import defaultdict

    from serving import feedback, worklist
    from serving.landing import read_landing

    rt = _rt()
    session = _session(request)
    items, now, start = _work_items(rt, session.key_name)
    item = next((it for it in items if it.pseudonym == pseudonym), None)
    _audit(request, [pseudonym], None)
    if item is None:
        return HTMLResponse("<p>No such patient for this key in this period.</p>", status_code=404)
    vitals: dict[str, list[Any]] = defaultdict(list)
    for _, t, code, value in read_landing(rt.config.landing_path(), {pseudonym}):
        when = feedback.parse_time(t)
        if when >= start:
            vitals[code].append((when, value))
    for pts in vitals.values():
        pts.sort()
    units = {c: rt.models.vocab.codes[c].unit for c in vitals if c in rt.models.vocab.codes}
    acked = item.acked_at if item.acknowledged else None
    # the time axis spans the data shown (within the window), not the whole window
    first = [feedback.parse_time(a["as_of"]) for a in item.history]
    first += [pts[0][0] for pts in vitals.values() if pts]
    left = max(start, min(first)) if first else start
    page = worklist.patient_page(
        item, vitals, units, session.key_name, session.csrf(), now, left, acked
    )
    return HTMLResponse(page, headers={"cache-control": "no-store"})


@app.post("/worklist/acknowledge", include_in_schema=False)
def acknowledge(request: Request) -> Response:
    """Record that a clinician saw this answer: the acknowledgement table and the audit log
    (the guard commits the audit entry, with the patient's pseudonym, before the redirect)."""
    from datetime import UTC, datetime

    rt = _rt()
    session = _session(request)
    form = _form(request)
    if not session.csrf_ok(form.get("csrf")):
        return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
    pseudonym = form.get("patient", "")
    items, _, _ = _work_items(rt, session.key_name)
    item = next((it for it in items if it.pseudonym == pseudonym), None)
    if item is None:
        return JSONResponse({"error": "no such patient for this key"}, status_code=404)
    _audit(request, [pseudonym], str(item.current["model_version"]))
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    rt.predlog.acknowledge(now, pseudonym, session.key_name, str(item.current["request_id"]))
    return RedirectResponse(f"/worklist/patients/{pseudonym}", status_code=303)


@app.get("/cohort", include_in_schema=False)
def cohort_view(
    request: Request, weeks: Annotated[int | None, Query(ge=1, le=520)] = None
) -> HTMLResponse:
    from serving import feedback, worklist

    rt = _rt()
    session = _session(request)
    _audit(request, [], None)
    fb = rt.config.feedback
    doc = feedback.cohort(rt.predlog, fb.k_anonymity, fb.age_bands, weeks or fb.cohort_weeks)
    return HTMLResponse(worklist.cohort_page(doc, session.key_name, session.csrf()))


#: the model a Bento pins (``bentofile.yaml``): served from the Bento, not the registry
BENTO_MODEL_ENV = "VITALRISK_BENTO_MODEL"
#: the MLflow model directory inside a BentoML model made by ``import_champion``
BENTO_MLFLOW_DIR = "mlflow"


def pinned_model() -> PinnedModel | None:
    """The BentoML model named by ``VITALRISK_BENTO_MODEL`` (set in the Bento), if any."""
    tag = os.environ.get(BENTO_MODEL_ENV)
    if not tag:
        return None
    try:
        bm = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise StartupError(f"{BENTO_MODEL_ENV}={tag}: no such model in the Bento") from None
    labels, meta = dict(bm.info.labels), dict(bm.info.metadata)
    metrics: Any = meta.get("metrics") or {}
    root = Path(bm.path)
    dictionary = root / "feature_dictionary.json"
    return PinnedModel(
        path=root / BENTO_MLFLOW_DIR,
        name=labels["registered_model"],
        version=labels["version"],
        run_id=labels.get("run_id"),
        metrics={str(k): float(v) for k, v in metrics.items()},
        dictionary=dictionary if dictionary.is_file() else None,
    )


def import_champion(name: str) -> str:
    """Copy the registry's champion into BentoML's model store as ``<name>:v<version>`` (the
    MLflow model, its run's feature dictionary and test metrics); returns the tag."""
    import json
    import tempfile

    from models import tracking

    mv = tracking.get_alias(name, tracking.CHAMPION)
    if mv is None:
        raise StartupError(f"registered model {name!r} has no champion to put in a Bento")
    tag = f"{name}:v{mv.version}"
    with contextlib.suppress(bentoml.exceptions.NotFound):
        bentoml.models.get(tag)
        return tag
    run = tracking.client().get_run(mv.run_id) if mv.run_id else None
    metrics = {k: v for k, v in (run.data.metrics if run else {}).items() if k.startswith("test.")}
    labels = {"registered_model": name, "version": str(mv.version), "run_id": str(mv.run_id)}
    with bentoml.models.create(tag, labels=labels, metadata={"metrics": metrics}) as bm:
        tracking.download_model(f"models:/{name}/{mv.version}", Path(bm.path) / BENTO_MLFLOW_DIR)
        if mv.run_id:
            with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Exception):
                local = tracking.client().download_artifacts(
                    mv.run_id, "feature_dictionary.json", tmp
                )
                doc = json.loads(Path(local).read_text(encoding="utf-8"))
                (Path(bm.path) / "feature_dictionary.json").write_text(json.dumps(doc))
    return tag


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@bentoml.service(
    name="vitalrisk",
    workers=_env_int("VITALRISK_SERVE_WORKERS", 1),
    traffic={"timeout": 60},
    logging={"access": {"enabled": _env_int("VITALRISK_ACCESS_LOG", 0) == 1}},
    # OpenTelemetry spans for every request cost ~0.35 ms of CPU each (measured), and go
    # nowhere unless an exporter is configured: on only with ``serve.tracing`` (README)
    tracing={"excluded_urls": [] if _env_int("VITALRISK_TRACING", 0) == 1 else ["/"]},
)
@bentoml.asgi_app(app, path="/")
class VitalRisk:
    """Deterioration-risk scoring: the MLflow registry's champion behind versioned routes."""

    def __init__(self) -> None:
        from serving import logsafe, supervisor

        # one record, one line, no client data: before anything can log a request
        logsafe.install()
        # BentoML sets up its own loggers only: let ours say which model serves, and stats
        logging.getLogger("serving").setLevel(logging.INFO)
        # fail fast: without a champion, keys, valid params or a writable audit log the server
        # must not start; `vitalrisk serve` hears why over its pipe, `bentoml serve` (which
        # would restart the worker forever) is stopped
        try:
            # worker 1 (or the only one) also audits alias changes made outside vitalrisk
            worker = bentoml.server_context.worker_index
            set_runtime(build_runtime(primary=worker in (None, 1), pinned=pinned_model()))
            # a full garbage collection walks every object of MLflow, pandas and BentoML
            # (~300 ms stalls under load, measured): keep start-up objects out of it
            quiet_gc()
        except StartupError as exc:
            logger.critical("vitalrisk cannot start: %s", exc)
            if supervisor.supervised():
                supervisor.notify(f"error: {exc}")
            elif os.environ.get("VITALRISK_STOP_ON_STARTUP_ERROR", "1") != "0":
                os.kill(os.getppid(), signal.SIGTERM)
            raise
        supervisor.notify("ready")

    @bentoml.on_shutdown
    def _flush_audit(self) -> None:
        rt = current_runtime()
        if rt is not None:
            if rt.follower is not None:
                rt.follower.stop()
            rt.queue.close()
            rt.limiter.close()
            rt.audit.close()
            rt.predlog.close()
            if rt.identities is not None:
                rt.identities.close()

    def __is_ready__(self) -> bool:
        # not ready while the audit trail cannot be written: data routes answer 503 then
        rt = current_runtime()
        return rt is not None and bool(rt.audit.healthy)

    @bentoml.api(
        batchable=_env_int("VITALRISK_ADAPTIVE_BATCHING", 1) == 1,
        route="/v1/score/features",
        max_batch_size=_env_int("VITALRISK_MAX_BATCH_SIZE", 5000),
        max_latency_ms=_env_int("VITALRISK_MAX_LATENCY_MS", 1000),
    )
    def score_features(
        self, rows: Annotated[list[FeatureRow], Field(min_length=1)]
    ) -> list[FeatureScore]:
        """Score precomputed feature rows (adaptive batching across concurrent requests)."""
        scores = _rt().score_rows(rows)
        metrics.observe_scores(scores, [r.features.get("setting") for r in rows])
        return scores


VitalRisk.add_asgi_middleware(GuardMiddleware)  # type: ignore[attr-defined]


def _use_guard_rows(spec: Any) -> None:
    """``/v1/score/features`` takes the rows the guard already parsed and validated
    (``serving.guard.check_features``) instead of BentoML parsing and validating the body a
    second time (for 1,000 rows, ~9.6 MB of JSON, that costs more than scoring them).
    Without the guard's rows (no guard in front), BentoML decodes the body as usual."""
    from serving.guard import FEATURE_ROWS_KEY

    decode = spec.from_http_request

    async def from_http_request(request: Request, serde: Any) -> Any:
        ctx = request.scope.get("state", {}).get("vitalrisk")
        rows = ctx.get(FEATURE_ROWS_KEY) if isinstance(ctx, dict) else None
        if rows is None:
            return await decode(request, serde)
        return spec.model_construct(rows=rows)

    spec.from_http_request = from_http_request


def _scores_as_json(spec: Any) -> None:
    """``/v1/score/features`` answers in one pydantic serialisation of the score list
    (BentoML would validate the list again, dump it twice and encode it with the standard
    library's ``json``: ~10 ms for 1,000 rows); the same JSON document."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(list[FeatureScore])
    encode = spec.to_http_response

    async def to_http_response(obj: Any, serde: Any) -> Response:
        if isinstance(obj, list):
            return Response(adapter.dump_json(obj), media_type="application/json")
        return await encode(obj, serde)

    spec.to_http_response = to_http_response


_use_guard_rows(VitalRisk.apis["score_features"].input_spec)  # type: ignore[attr-defined]
_scores_as_json(VitalRisk.apis["score_features"].output_spec)  # type: ignore[attr-defined]
# BentoML 1.4 works out the response media type from the output's JSON schema on every call
# (about 1.5 ms per request on this machine); it is always JSON here, so fix it once.
VitalRisk.apis["score_features"].output_spec.media_type = "application/json"  # type: ignore[attr-defined]
