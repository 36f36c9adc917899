"""ASGI middleware in front of every route: routes and methods, API keys, scopes, throttling,
rate and size limits, body timeouts, strict JSON, and the audit trail as part of the answer.

Pure ASGI (no BaseHTTPMiddleware) so the hot path adds microseconds, and so that the same
checks cover both the FastAPI routes and BentoML's batchable ``/v1/score/features``.

What it promises (README, "Guarantees"):

* only declared routes reach the application: any other path is a JSON 404, any other method
  a 405 with ``Allow``; the raw path is never logged (it may hold an identifier);
* an authenticated ``/v1`` answer leaves only after its audit entry is durable
  (``serving/auditq.py``); when the audit log cannot be written the answer is 503;
* unauthenticated and throttled requests are audited too, without waiting for the disk;
* every bad request is a 4xx with a reason: 400 malformed JSON or duplicate keys, 408 a body
  that does not arrive in time, 413 too large (after reading and discarding up to
  ``serve.discard_body_bytes`` so the client sees the answer), 422 schema problems.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from pydantic import ValidationError

from serving.auditq import AuditItem, AuditUnavailable
from serving.auth import bearer_token
from serving.metrics import observe_refusal
from serving.schemas import (
    FeatureRow,
    complete_openapi,
    feature_rows,
    unknown_flags,
)

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: path -> {method: scope needed}; every /v1 route (the others are public, GET only)
ROUTE_SCOPES: dict[str, dict[str, str]] = {
    "/v1/score": {"POST": "score"},
    "/v1/score/features": {"POST": "score"},
    "/v1/fhir/score": {"POST": "score"},
    "/v1/observations": {"POST": "ingest"},
    "/v1/model": {"GET": "read"},
    "/v1/patients/{patient_id}/summary": {"GET": "read"},
    "/v1/cohort": {"GET": "read"},
    # CDS Hooks 2.0: the EHR sends our API key as its bearer token (serving/cds.py)
    "/cds-services/vitalrisk-patient-view": {"POST": "score"},
}
#: the clinician pages (serving/worklist.py): a session cookie instead of a bearer token
#: (serving/sessions.py); path -> methods (HEAD with GET)
PAGE_ROUTES: dict[str, frozenset[str]] = {
    "/worklist": frozenset({"GET"}),
    "/worklist/login": frozenset({"GET", "POST"}),
    "/worklist/logout": frozenset({"POST"}),
    "/worklist/acknowledge": frozenset({"POST"}),
    "/worklist/patients/{pseudonym}": frozenset({"GET"}),
    "/worklist/static/worklist.css": frozenset({"GET"}),
    "/cohort": frozenset({"GET"}),
}
#: pages anyone may load (the login form, its stylesheet)
OPEN_PAGES = frozenset({"/worklist/login", "/worklist/static/worklist.css"})
LOGIN_PATH = "/worklist/login"
#: routes with a path parameter: the template is what logs, metrics and the audit name
ROUTE_TEMPLATES: dict[str, re.Pattern[str]] = {
    "/v1/patients/{patient_id}/summary": re.compile(r"^/v1/patients/[^/]{1,384}/summary$"),
    "/worklist/patients/{pseudonym}": re.compile(r"^/worklist/patients/p_[0-9a-f]{20}$"),
}


def route_of(path: str) -> str:
    """The declared route a path belongs to (its template for parameterised routes)."""
    if path in ROUTE_SCOPES or path in PAGE_ROUTES:
        return path
    for template, pattern in ROUTE_TEMPLATES.items():
        if pattern.match(path):
            return template
    return path


#: audit ``action`` per route (docs/contracts.md: ``predict`` is serving's data access)
ROUTE_ACTIONS: dict[str, str] = {
    "/v1/score": "predict",
    "/v1/score/features": "predict",
    "/v1/fhir/score": "predict",
    "/v1/observations": "collect",
    "/v1/model": "read_model",
    "/v1/patients/{patient_id}/summary": "read_patient",
    "/v1/cohort": "read_cohort",
    "/cds-services/vitalrisk-patient-view": "predict",
    "/worklist": "read_worklist",
    "/worklist/login": "login",
    "/worklist/logout": "logout",
    "/worklist/acknowledge": "acknowledge",
    "/worklist/patients/{pseudonym}": "read_patient",
    "/cohort": "read_cohort",
}
#: public routes (probes, metrics, OpenAPI, BentoML's index page and its assets)
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/healthz",
        "/livez",
        "/readyz",
        "/metrics",
        "/docs.json",
        "/schema.json",
        "/cds-services",  # CDS Hooks discovery: no patient data
    }
)
STATIC_PREFIX = "/static_content/"
FEATURES_PATH = "/v1/score/features"
#: the guard's context key of ``/v1/score/features``' validated rows (``check_features``)
FEATURE_ROWS_KEY = "feature_rows"
SCORE_PATH = "/v1/score"
DOCS_PATH = "/docs.json"
METRICS_PATH = "/metrics"
#: set by the connection layer (serving/connections.py): the real path, while ``path`` holds
#: the bounded metrics label until the guard puts the real one back
REAL_PATH_KEY = "vitalrisk.path"
ANONYMOUS = "(anonymous)"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def metrics_label(path: str) -> str:
    """The path as a metrics label: declared routes by name, everything else in one bucket
    (an unknown path must not become a new label set, nor put an identifier in /metrics)."""
    route = route_of(path)
    if route in ROUTE_SCOPES or route in PAGE_ROUTES or path in PUBLIC_PATHS:
        return route
    if path.startswith(STATIC_PREFIX):
        return STATIC_PREFIX + "*"
    return "/(undeclared)"


class MetricsLabels:
    """Outermost ASGI layer (``serving/worker.py``): BentoML's metrics middleware labels each
    request with ``scope["path"]``, so an undeclared path is shown to it as its bounded
    :func:`metrics_label`; the guard, inside that middleware, puts the real path back before
    routing (``REAL_PATH_KEY``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            label = metrics_label(path)
            if label != path:
                scope[REAL_PATH_KEY] = path
                scope["path"] = label
        await self.app(scope, receive, send)


_NON_FINITE = re.compile(rb"-?\b(NaN|Infinity)\b")
_COLON_ESCAPE = re.compile(rb"\\u003[aA]")


class _DuplicateKey(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise _DuplicateKey(f"duplicate key {dup[:64]!r}: every key may appear once per object")
    return out


def _exact_duplicate_check(body: bytes) -> None:
    """Raise ``_DuplicateKey`` naming the first repeated key (standard-library parser)."""
    try:
        json.loads(body, object_pairs_hook=_pairs)
    except _DuplicateKey:
        raise
    except (ValueError, RecursionError):  # orjson accepted it: nothing more to find here
        return


#: dicts with more entries than this are counted by their length alone (a feature row)
_WIDE = 32


def _keys_at_least(doc: Any) -> int:
    """A lower bound on the number of keys in a parsed document: every dict's length, looking
    inside the values of dicts of at most ``_WIDE`` entries and inside lists (so exact for
    the API's documents, whose wide dicts hold numbers, text and nulls only)."""
    n = 0
    stack = [doc]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            n += len(node)
            if len(node) <= _WIDE:
                stack.extend(v for v in node.values() if type(v) is dict or type(v) is list)
        elif type(node) is list:
            stack.extend(v for v in node if type(v) is dict or type(v) is list)
    return n


def parse_json(body: bytes) -> Any:
    """Strict RFC 8259 JSON: NaN/Infinity refused (unlike ``json.loads``), and duplicate keys
    refused (parsers silently keep one of the values, so a forged first value could pass a
    review while the second one is used).

    Fast duplicate check: a JSON text has one structural ``:`` per key, plus the colons
    inside its strings; the parsed document has one key per key that survived. So when the
    text has no more colons than (a lower bound on) the document's keys, no key was dropped
    (the usual case, and one count over the text). Otherwise orjson's output of the document
    has one ``:`` per surviving key plus the same colons inside strings, so those counts
    differ exactly when a key was dropped, unless a string spells a colon as ``\\u003a``:
    then the standard library's parser decides.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if _NON_FINITE.search(body):
            raise ValueError("NaN/Infinity are not allowed: numbers must be finite") from None
        raise ValueError(str(exc)) from None
    if isinstance(doc, dict | list):
        if body.count(b":") <= _keys_at_least(doc):
            return doc
        if _COLON_ESCAPE.search(body):
            _exact_duplicate_check(body)
        elif body.count(b":") != orjson.dumps(doc).count(b":"):
            _exact_duplicate_check(body)  # names the key
            raise _DuplicateKey("duplicate key: every key may appear once per object")
    return doc


@lru_cache(maxsize=100_000)
def _pseudonym(pid: str) -> str:
    from serving.scoring import pseudonym_of

    return pseudonym_of(pid)


def json_response(
    status: int, payload: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[Message, bytes]:
    body = json.dumps(payload).encode("utf-8")
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }
    return start, body


async def send_json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    start, body = json_response(status, payload, headers)
    await send(start)
    await send({"type": "http.response.body", "body": body})


#: pydantic's union-member tags in an error location (not places in the document)
_UNION_TAGS = frozenset({"float", "constrained-str", "str", "int", "none", "bool"})


def error_loc(parts: Any) -> str:
    """``("body", "rows", 0, "features", "age", "float")`` -> ``rows[0].features.age``."""
    out = ""
    for x in parts:
        if (x == "body" and not out) or x in _UNION_TAGS:
            continue
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def problems_payload(
    errors: Sequence[Mapping[str, Any]], rid: str, one_per_place: bool = False
) -> dict[str, Any]:
    """Our 4xx body for pydantic errors: each problem's place and message (the first 50), a
    one-line summary and the request id. ``one_per_place`` keeps one problem per location
    (pydantic reports each member of a union) and counts those. Input values are never
    echoed (they may be identifiers)."""
    detail: list[dict[str, str]] = []
    for e in errors[:50]:
        loc = error_loc(e.get("loc", ()))
        if one_per_place and any(d["loc"] == loc for d in detail):
            continue
        detail.append({"loc": loc, "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    total = len(detail) if one_per_place else len(errors)
    first = f"{detail[0]['loc']}: {detail[0]['msg']}" if detail else "invalid request"
    return {"error": f"{total} problem(s); first: {first}", "detail": detail, "request_id": rid}


def bentoml_error(body: bytes, rid: str) -> tuple[int, dict[str, Any]]:
    """BentoML's 400 for a body that breaks the schema -> our 422 shape with the request id."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = {"error": "bad request"}
    raw = doc.get("detail") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        return 400, {"error": str(doc.get("error", "bad request"))[:500], "request_id": rid}
    return 422, problems_payload(raw, rid, one_per_place=True)


class Reject(Exception):
    """An answer the guard gives itself (status, message, extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        payload: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        self.payload = payload


@dataclass
class Exchange:
    """One request as the guard sees it: who, what, and what the audit log will say."""

    rid: str
    method: str
    path: str
    client: str
    actor: str = ANONYMOUS
    status: int = 500
    patients: list[str] = field(default_factory=list)
    model_version: str | None = None
    route: str = ""

    def __post_init__(self) -> None:
        self.route = route_of(self.path)

    @property
    def rid_header(self) -> tuple[bytes, bytes]:
        return (b"x-request-id", self.rid.encode())

    def resource(self) -> str:
        declared = self.route in ROUTE_SCOPES or self.route in PAGE_ROUTES
        return f"{self.method} {self.route if declared else '(undeclared path)'}"

    def audit_item(self) -> AuditItem:
        return AuditItem(
            actor=self.actor,
            action=ROUTE_ACTIONS.get(self.route, "request"),
            resource=self.resource(),
            status=self.status,
            request_id=self.rid,
            patients=tuple(self.patients),
            model_version=self.model_version,
            client=self.client,
        )


async def _starting(ex: Exchange, send: Send) -> None:
    """503 with a retry hint: no runtime yet (the model and stores are still loading)."""
    await send_json(
        send,
        503,
        {"error": "service is starting", "request_id": ex.rid},
        [ex.rid_header, (b"retry-after", b"5")],
    )


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class GuardMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._docs: tuple[bytes, bytes] | None = None  # (BentoML's document, completed)
        self._throttle: Any = None  # serving.auth.AuthThrottle, from the runtime's params

    def throttle(self, rt: Any) -> Any:
        if self._throttle is None:
            from serving.stores import auth_throttle

            self._throttle = auth_throttle(rt.config)
        return self._throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        real = scope.pop(REAL_PATH_KEY, None)
        if real is not None:
            scope["path"] = real
        ex = Exchange(
            uuid.uuid4().hex, scope.get("method", "GET"), scope.get("path", ""), _client(scope)
        )
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if ex.route in PAGE_ROUTES:
                await self._page(ex, scope, receive, tracked)
            elif ex.route in ROUTE_SCOPES or ex.path.startswith("/v1/") or ex.path == "/v1":
                await self._api(ex, scope, receive, tracked)
            else:
                await self._public(ex, scope, receive, tracked)
        except Exception as exc:  # a bug: answer now (BentoML's timeout would wait 60 s)
            logger.error("request %s failed", ex.rid, exc_info=exc)
            if not started:
                await send_json(
                    send, 500, {"error": "internal error", "request_id": ex.rid}, [ex.rid_header]
                )

    # -- public routes ------------------------------------------------------------------
    async def _public(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        if ex.path not in PUBLIC_PATHS and not ex.path.startswith(STATIC_PREFIX):
            await send_json(send, 404, _not_found(ex), [ex.rid_header])
            return
        if ex.method not in ("GET", "HEAD"):
            await send_json(
                send,
                405,
                _not_allowed(ex, ["GET", "HEAD"]),
                [ex.rid_header, (b"allow", b"GET, HEAD")],
            )
            return

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), ex.rid_header]
            await send(message)

        if ex.path == METRICS_PATH:
            from serving import metrics
            from serving.runtime import current_runtime

            rt = current_runtime()
            if rt is not None:
                metrics.refresh(rt)  # versions, audit health, the monitor's last verdict
        if ex.path == DOCS_PATH:
            await self.app(scope, receive, self._docs_sender(with_id))
        else:
            await self.app(scope, receive, with_id)

    def _docs_sender(self, send: Send) -> Send:
        """BentoML's OpenAPI document, completed with every status the routes can answer."""
        held: list[Message] = []

        async def sender(message: Message) -> None:
            held.append(message)
            if message["type"] != "http.response.body" or message.get("more_body", False):
                return
            start = held[0]
            raw = b"".join(m.get("body", b"") for m in held[1:])
            if int(start["status"]) != 200 or not raw:  # HEAD, or an error: as it is
                for m in held:
                    await send(m)
                return
            if self._docs is None or self._docs[0] != raw:
                self._docs = (raw, orjson.dumps(complete_openapi(orjson.loads(raw))))
            body = self._docs[1]
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            await send(
                {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            )
            await send({"type": "http.response.body", "body": body})

        return sender

    # -- /v1 ----------------------------------------------------------------------------
    async def _api(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        from serving.runtime import current_runtime

        rt = current_runtime()
        if rt is None:
            await _starting(ex, send)
            return
        headers = _headers(scope)
        try:
            key = self._authenticate(rt, ex, headers)
        except Reject as r:  # 401 and throttled 429: audited, but not worth waiting for
            ex.status = r.status
            rt.audit.record(ex.audit_item())
            observe_refusal(ex.path, r.status)
            await send_json(send, r.status, _payload(r, ex), [ex.rid_header, *r.headers])
            return
        ex.actor = key.name
        responder = _Responder(rt, ex, send)
        try:
            body, parsed = await self._admit(rt, ex, key, headers, receive, responder)
        except Reject as r:
            await responder.reject(r)
            return
        if body is None:  # the client went away while sending
            return
        await self._forward(rt, ex, scope, receive, responder, body, parsed)

    # -- clinician pages ----------------------------------------------------------------
    async def _page(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        """Session-cookie pages: method, session (or the login form's key), rate, body,
        audit health; then the route, answered once its audit entry is durable."""
        from serving import sessions
        from serving.runtime import current_runtime

        rt = current_runtime()
        methods = PAGE_ROUTES[ex.route]
        allowed = methods | ({"HEAD"} if "GET" in methods else set())
        if ex.method not in allowed:
            allow = ", ".join(sorted(allowed))
            await send_json(
                send,
                405,
                _not_allowed(ex, sorted(allowed)),
                [ex.rid_header, (b"allow", allow.encode())],
            )
            return
        if rt is None:
            await _starting(ex, send)
            return
        headers = _headers(scope)
        ctx: dict[str, Any] = {"request_id": ex.rid, "actor": "", "patients": []}
        responder = _Responder(rt, ex, send)
        if ex.route not in OPEN_PAGES:
            found = sessions.verify(sessions.cookie_of(headers.get("cookie")), rt.keys)
            if found is None:
                ex.status = 303 if ex.method in ("GET", "HEAD") else 401
                rt.audit.record(ex.audit_item())
                if ex.status == 303:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 303,
                            "headers": [(b"location", LOGIN_PATH.encode()), ex.rid_header],
                        }
                    )
                    await send({"type": "http.response.body", "body": b""})
                else:
                    await send_json(
                        send,
                        401,
                        {"error": "not logged in (or the session expired)", "request_id": ex.rid},
                        [ex.rid_header],
                    )
                return
            ctx["session"], key = found
            ex.actor = ctx["actor"] = key.name
        elif ex.route != LOGIN_PATH:
            responder.unaudited = True  # the stylesheet: no data, nobody to name
        body = b""
        try:
            if ex.actor != ANONYMOUS:
                wait = rt.limiter.acquire(ex.actor, rate=None)
                if wait > 0:
                    raise Reject(429, "rate limit exceeded", [(b"retry-after", b"1")])
            if not rt.audit.healthy and not responder.unaudited:
                responder.unaudited = True
                raise Reject(503, "audit log unavailable; retry later", [(b"retry-after", b"5")])
            if ex.method == "POST":
                got = await read_body(receive, headers, rt.config, responder)
                if got is None:
                    return
                body = got
                ctx["form"] = _form(body)
                if ex.route == LOGIN_PATH:
                    self._login(rt, ex, ctx)
        except Reject as r:
            await responder.reject(r)
            return
        await self._hand_over(scope, receive, responder, ctx, body)

    async def _hand_over(
        self, scope: Scope, receive: Receive, responder: Any, ctx: dict[str, Any], body: bytes
    ) -> None:
        """Hand the checked request to the app: the guard's context in ``scope.state``, the
        body it already read replayed once, then the client's stream."""
        scope.setdefault("state", {})["vitalrisk"] = ctx
        responder.ctx = ctx
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, responder.send)

    def _login(self, rt: Any, ex: Exchange, ctx: dict[str, Any]) -> None:
        """The login form's key, checked like a bearer token (same throttle on failures)."""
        throttle = self.throttle(rt)
        wait = throttle.blocked(ex.client)
        if wait > 0:
            raise Reject(429, f"too many failed logins; retry in {wait:.0f} s")
        presented = (ctx["form"].get("key") or "").strip()
        key = rt.keys.authenticate(presented) if presented else None
        if key is None:
            throttle.failed(ex.client)
            ctx["login_error"] = "unknown key"
        elif not key.allows("read"):
            ctx["login_error"] = f"key {key.name!r} lacks the read scope"
            ctx["actor"] = key.name
        else:
            ctx["login_key"] = key
            ctx["actor"] = key.name

    def _authenticate(self, rt: Any, ex: Exchange, headers: dict[str, str]) -> Any:
        throttle = self.throttle(rt)
        wait = throttle.blocked(ex.client)
        if wait > 0:
            raise Reject(
                429,
                f"too many failed authentications from this address; retry in {wait:.0f} s",
                [(b"retry-after", str(max(1, round(wait + 0.5))).encode())],
            )
        token = bearer_token(headers.get("authorization"))
        key = rt.keys.authenticate(token) if token else None
        if key is None:
            if throttle.failed(ex.client):
                logger.warning(
                    "failed authentications from %s over the limit: throttled", ex.client
                )
            raise Reject(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                [(b"www-authenticate", b'Bearer realm="vitalrisk"')],
            )
        return key

    async def _admit(
        self,
        rt: Any,
        ex: Exchange,
        key: Any,
        headers: dict[str, str],
        receive: Receive,
        responder: _Responder,
    ) -> tuple[bytes | None, Any]:
        """Route, method, scope, audit health and rate; then the body. ``Reject`` otherwise."""
        methods = ROUTE_SCOPES.get(ex.route)
        if methods is None:
            raise Reject(404, _not_found(ex)["error"])
        needed = methods.get(ex.method)
        if needed is None:
            allow = ", ".join(methods)
            raise Reject(
                405, _not_allowed(ex, list(methods))["error"], [(b"allow", allow.encode())]
            )
        if not key.allows(needed):
            logger.info("403 %s %s: key %s lacks scope %s", ex.method, ex.path, key.name, needed)
            raise Reject(
                403, f"API key {key.name!r} lacks the {needed!r} scope for {ex.method} {ex.path}"
            )
        if not rt.audit.healthy:
            responder.unaudited = True
            raise Reject(
                503,
                "audit log unavailable: nothing was processed; retry later",
                [(b"retry-after", b"5")],
            )
        wait = rt.limiter.acquire(key.name, rate=key.rate)
        if wait > 0:
            raise Reject(
                429,
                f"rate limit for key {key.name!r} exceeded; retry in {wait:.2f} s",
                [(b"retry-after", str(max(1, round(wait + 0.5))).encode())],
            )
        if ex.method not in BODY_METHODS:
            return b"", None
        body = await read_body(receive, headers, rt.config, responder)
        if body is None:
            return None, None
        return body, parse_body(body)

    async def _forward(
        self,
        rt: Any,
        ex: Exchange,
        scope: Scope,
        receive: Receive,
        responder: _Responder,
        body: bytes,
        parsed: Any,
    ) -> None:
        ctx: dict[str, Any] = {
            "request_id": ex.rid,
            "actor": ex.actor,
            "patients": [],
            "model_version": None,
        }
        try:
            if ex.path == FEATURES_PATH:
                ctx[FEATURE_ROWS_KEY] = check_features(rt, ex, parsed)
                ctx["patients"], ctx["model_version"] = ex.patients, ex.model_version
            elif ex.path == SCORE_PATH:
                check_flags(rt, parsed)
        except Reject as r:
            await responder.reject(r)
            return
        if parsed is not None:
            ctx["json"] = parsed  # the FastAPI routes validate this instead of parsing again
            # the body was parsed as JSON: say so, whatever the client declared (this also
            # keeps BentoML's pickle/arrow/form decoders away from untrusted input)
            scope["headers"] = [
                *(
                    (k, v)
                    for k, v in scope.get("headers", [])
                    if k.lower() not in (b"content-type", b"content-length")
                ),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        await self._hand_over(scope, receive, responder, ctx, body)


def _form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body: the first value of each field."""
    from urllib.parse import parse_qs

    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise Reject(400, "form body is not valid") from None
    return {k: v[0][:512] for k, v in fields.items() if v}


def _payload(r: Reject, ex: Exchange) -> dict[str, Any]:
    return r.payload if r.payload is not None else {"error": r.message, "request_id": ex.rid}


def _not_found(ex: Exchange) -> dict[str, Any]:
    return {"error": "no such route (GET /docs.json lists them)", "request_id": ex.rid}


def _not_allowed(ex: Exchange, methods: list[str]) -> dict[str, Any]:
    return {
        "error": f"method {ex.method} not allowed here; use {', '.join(methods)}",
        "request_id": ex.rid,
    }


class _Responder:
    """Sends an authenticated request's answer only once its audit entry is durable.

    The status is known at ``http.response.start``: the entry (with the patients and model
    version the route recorded) is committed then, and the start is held until it is. If the
    commit fails, the client gets 503 instead and the route's own answer is dropped. BentoML's
    400 for the batched route is rewritten into our 422 shape on the way.
    """

    def __init__(self, rt: Any, ex: Exchange, send: Send) -> None:
        self.rt = rt
        self.ex = ex
        self._send = send
        self.ctx: dict[str, Any] | None = None
        self.unaudited = False  # the audit log is down: answer without trying
        self._started = False
        self._dropping = False
        self._held: list[Message] = []

    async def _commit(self, status: int) -> bool:
        self.ex.status = status
        if self.ctx is not None:
            self.ex.patients = [str(p) for p in self.ctx.get("patients") or []]
            if self.ctx.get("actor"):  # a login names its key once it is checked
                self.ex.actor = str(self.ctx["actor"])
            # batched feature rows: the runtime knows which version scored this request
            v = self.rt.answered_by(self.ex.rid) or self.ctx.get("model_version")
            self.ex.model_version = None if v is None else str(v)
        try:
            await self.rt.audit.commit(self.ex.audit_item(), self.rt.config.audit_timeout_seconds)
        except AuditUnavailable as exc:
            logger.error("request %s not answered: %s", self.ex.rid, exc)
            return False
        return True

    async def _answer(self, start: Message, chunks: list[Message]) -> None:
        if not self.unaudited and not await self._commit(int(start["status"])):
            await self._unavailable()
            observe_refusal(self.ex.path, 503)
            return
        observe_refusal(self.ex.path, int(start["status"]))  # counts 4xx and 503 only
        await self._send(start)
        for m in chunks:
            await self._send(m)

    async def _unavailable(self) -> None:
        self._dropping = True
        await send_json(
            self._send,
            503,
            {
                "error": "audit log unavailable: the answer was withheld; retry later",
                "request_id": self.ex.rid,
            },
            [self.ex.rid_header, (b"retry-after", b"5")],
        )

    async def reject(self, r: Reject, more_body: bool = False) -> None:
        """The guard's own answer (audited like any other)."""
        start, body = json_response(
            r.status, _payload(r, self.ex), [self.ex.rid_header, *r.headers]
        )
        self._started = True
        await self._answer(
            start, [{"type": "http.response.body", "body": body, "more_body": more_body}]
        )

    async def finish(self) -> None:
        """End a response started with ``reject(..., more_body=True)``."""
        if not self._dropping:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def send(self, message: Message) -> None:
        if self._dropping:
            return
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), self.ex.rid_header]
            if self.ex.path == FEATURES_PATH and int(message["status"]) == 400:
                self._held.append(message)
                return
            self._started = True
            await self._answer(message, [])
            return
        if self._held:
            self._held.append(message)
            if message.get("more_body", False):
                return
            raw = b"".join(m.get("body", b"") for m in self._held[1:])
            status, payload = bentoml_error(raw, self.ex.rid)
            start, body = json_response(status, payload, [self.ex.rid_header])
            self._held = []
            await self._answer(start, [{"type": "http.response.body", "body": body}])
            return
        await self._send(message)


async def read_body(
    receive: Receive, headers: dict[str, str], config: Any, responder: _Responder
) -> bytes | None:
    """The whole body within ``body_timeout_seconds`` (else 408) and ``max_body_bytes``.

    None when there is nothing more to do: the client went away, or the body was too large
    and the 413 has been sent. The 413 goes out at once; then what the client is still
    sending is read and discarded (up to ``discard_body_bytes``, within the same deadline)
    before the connection closes, so that a client which reads only after sending sees the
    413 instead of a reset connection.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    limit = int(config.max_body_bytes)
    deadline = loop.time() + float(config.body_timeout_seconds)
    declared = headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    chunks: list[bytes] = []
    got, more = 0, True
    too_large = ""
    try:
        async with asyncio.timeout_at(deadline):
            if size is not None and size > limit:
                too_large = f"request body of {size} bytes exceeds the limit of {limit}"
            while more and not too_large:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                got += len(chunk)
                more = bool(message.get("more_body", False))
                if got > limit:
                    too_large = f"request body exceeds the limit of {limit} bytes"
                chunks.append(chunk)
    except TimeoutError:
        raise Reject(
            408,
            f"the request body did not arrive within {config.body_timeout_seconds:g} s",
            [(b"connection", b"close")],
        ) from None
    if too_large:
        left = None if size is None else size - got
        expect = headers.get("expect", "").lower() == "100-continue"
        await _refuse_and_drain(
            receive, responder, too_large, deadline, config, left, more, expect and got == 0
        )
        return None
    body = b"".join(chunks)
    if not body.strip():
        raise Reject(400, "request body is empty: expected a JSON object")
    return body


async def _refuse_and_drain(
    receive: Receive,
    responder: _Responder,
    message: str,
    deadline: float,
    config: Any,
    left: int | None,
    more: bool,
    waiting_for_continue: bool,
) -> None:
    """Send the 413, read and discard the rest within the budget, then end the answer."""
    import asyncio

    budget = int(config.discard_body_bytes)
    # a client waiting for "100 Continue" has sent nothing yet: answer and close
    drain = more and not waiting_for_continue and (left is None or left <= budget)
    await responder.reject(Reject(413, message, [(b"connection", b"close")]), more_body=drain)
    if not drain:
        return
    read = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            while more and read <= budget:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    break
                read += len(msg.get("body", b""))
                more = bool(msg.get("more_body", False))
    await responder.finish()


def parse_body(body: bytes) -> Any:
    try:
        parsed = parse_json(body)
    except ValueError as exc:
        raise Reject(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise Reject(422, "request body must be a JSON object")
    return parsed


def check_features(rt: Any, ex: Exchange, parsed: dict[str, Any]) -> list[FeatureRow]:
    """Everything BentoML's validation of ``/v1/score/features`` would refuse, refused here
    first (BentoML logs the inputs of a body it rejects); returns the validated rows, each
    with the HTTP request id (the prediction log records it), for the route to score
    without parsing or validating the body again (``serving/service.py``)."""
    rows = parsed.get("rows")
    if isinstance(rows, list) and len(rows) > rt.config.max_feature_rows:
        raise Reject(
            413, f"rows: {len(rows)} rows; at most {rt.config.max_feature_rows} per request"
        )
    try:
        valid = feature_rows(parsed, ex.rid)
    except ValidationError as exc:
        payload = problems_payload(exc.errors(include_input=False), ex.rid, one_per_place=True)
        raise Reject(422, payload["error"], payload=payload) from None
    problem = rt.check_feature_rows(valid)
    if problem is not None:
        raise Reject(*problem)
    ex.patients = sorted({_pseudonym(r.patient_id) for r in valid.rows if r.patient_id})
    ex.model_version = str(rt.champion.version)
    return valid.rows


@lru_cache(maxsize=8)
def _known_flags(feature_names: tuple[str, ...], scale2: tuple[str, ...]) -> frozenset[str]:
    return frozenset(n for n in feature_names if n.startswith("cm_")) | frozenset(scale2)


def check_flags(rt: Any, parsed: dict[str, Any]) -> None:
    """Refuse covariate flags the served model does not read, by name (422)."""
    patients = parsed.get("patients")
    if not isinstance(patients, list):
        return
    news2 = getattr(rt.models.feature_config, "news2", None)
    known = _known_flags(
        tuple(rt.champion.feature_names), tuple(getattr(news2, "scale2_flags", None) or ())
    )
    problems = []
    for i, p in enumerate(patients[:1000]):
        cov = p.get("covariates") if isinstance(p, dict) else None
        for name in unknown_flags(cov, known):
            problems.append(f"patients[{i}].covariates.{name[:40]}")
    if problems:
        accepted = ", ".join(sorted(known)) or "none"
        raise Reject(
            422,
            f"unknown covariate flag(s) {problems[:5]}: model version {rt.champion.version} "
            f"reads age, sex, setting and these flags: {accepted}",
        )
