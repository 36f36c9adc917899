"""ASGI middleware in front of every route: request ids, API keys, scopes, rate and size limits,
strict JSON, and the audit trail.

Pure ASGI (no BaseHTTPMiddleware) so the hot path adds microseconds, and so that the same
checks cover both the FastAPI routes and BentoML's batchable ``/v1/score/features``.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from functools import lru_cache
from typing import Any

import orjson

from serving.auth import bearer_token

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: (method, path) -> scope needed; paths outside /v1 are public (probes, metrics, OpenAPI)
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("POST", "/v1/score"): "score",
    ("POST", "/v1/score/features"): "score",
    ("POST", "/v1/fhir/score"): "score",
    ("POST", "/v1/observations"): "ingest",
    ("GET", "/v1/model"): "read",
}
#: audit ``action`` per route (docs/contracts.md: ``predict`` is serving's data access)
ROUTE_ACTIONS: dict[str, str] = {
    "/v1/score": "predict",
    "/v1/score/features": "predict",
    "/v1/fhir/score": "predict",
    "/v1/observations": "collect",
    "/v1/model": "read_model",
}
FEATURES_PATH = "/v1/score/features"


_NON_FINITE = re.compile(rb"-?\b(NaN|Infinity)\b")


def parse_json(body: bytes) -> Any:
    """Strict RFC 8259 JSON (orjson): NaN/Infinity are refused, unlike ``json.loads``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if _NON_FINITE.search(body):
            raise ValueError("NaN/Infinity are not allowed: numbers must be finite") from None
        raise ValueError(str(exc)) from None


@lru_cache(maxsize=100_000)
def _pseudonym(pid: str) -> str:
    from serving.scoring import pseudonym_of

    return pseudonym_of(pid)


async def send_json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
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
    (pydantic reports each member of a union) and counts those."""
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
        doc = {"error": body.decode("utf-8", "replace")[:500]}
    raw = doc.get("detail") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        return 400, {"error": str(doc.get("error", "bad request")), "request_id": rid}
    return 422, problems_payload(raw, rid, one_per_place=True)


class GuardMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from serving.runtime import current_runtime

        rid = uuid.uuid4().hex
        rid_header = (b"x-request-id", rid.encode())
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        needed = ROUTE_SCOPES.get((method, path))
        is_api = path.startswith("/v1/") or path == "/v1"

        status_box = {"status": 500}
        held: list[Message] = []  # BentoML's own error answer on the batched route, rewritten

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], rid_header]
                if path == FEATURES_PATH and status_box["status"] == 400:
                    held.append(message)
                    return
            elif held:
                held.append(message)
                if message.get("more_body", False):
                    return
                body_parts = [m.get("body", b"") for m in held[1:]]
                status, payload = bentoml_error(b"".join(body_parts), rid)
                status_box["status"] = status  # the audit log records what the client got
                await send_json(send, status, payload, [rid_header])
                return
            await send(message)

        if not is_api:
            await self.app(scope, receive, send_with_id)
            return
        rt = current_runtime()
        if rt is None:
            await send_json(
                send, 503, {"error": "service is starting", "request_id": rid}, [rid_header]
            )
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        token = bearer_token(headers.get("authorization"))
        key = rt.keys.authenticate(token) if token else None
        if key is None:
            logger.warning(
                "401 %s %s: %s", method, path, "no key" if token is None else "unknown key"
            )
            await send_json(
                send,
                401,
                {
                    "error": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    "request_id": rid,
                },
                [rid_header, (b"www-authenticate", b'Bearer realm="vitalrisk"')],
            )
            return
        if needed is not None and not key.allows(needed):
            logger.warning("403 %s %s: key %s lacks scope %s", method, path, key.name, needed)
            await send_json(
                send,
                403,
                {
                    "error": f"API key {key.name!r} lacks the {needed!r} scope for {method} {path}",
                    "request_id": rid,
                },
                [rid_header],
            )
            return
        wait = rt.limiter.acquire(key.name, rate=key.rate)
        if wait > 0:
            await send_json(
                send,
                429,
                {
                    "error": f"rate limit for key {key.name!r} exceeded; retry in {wait:.2f} s",
                    "request_id": rid,
                },
                [rid_header, (b"retry-after", str(max(1, round(wait + 0.5))).encode())],
            )
            return

        body = b""
        if method in ("POST", "PUT", "PATCH"):
            limit = rt.config.max_body_bytes
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await send_json(
                    send,
                    413,
                    {
                        "error": f"request body of {declared} bytes exceeds the limit of {limit}",
                        "request_id": rid,
                    },
                    [rid_header],
                )
                return
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await send_json(
                        send,
                        413,
                        {
                            "error": f"request body exceeds the limit of {limit} bytes",
                            "request_id": rid,
                        },
                        [rid_header],
                    )
                    return
                chunks.append(chunk)
                more = bool(message.get("more_body", False))
            body = b"".join(chunks)
            if not body.strip():
                await send_json(
                    send,
                    400,
                    {"error": "request body is empty: expected a JSON object", "request_id": rid},
                    [rid_header],
                )
                return
            try:
                parsed = parse_json(body)
            except ValueError as exc:
                await send_json(
                    send,
                    400,
                    {"error": f"request body is not valid JSON: {exc}", "request_id": rid},
                    [rid_header],
                )
                return
            if not isinstance(parsed, dict):
                await send_json(
                    send,
                    422,
                    {"error": "request body must be a JSON object", "request_id": rid},
                    [rid_header],
                )
                return
        ctx: dict[str, Any] = {
            "request_id": rid,
            "actor": key.name,
            "patients": [],
            "model_version": None,
        }
        if method in ("POST", "PUT", "PATCH"):
            ctx["json"] = parsed  # the FastAPI routes validate this instead of parsing again
        if path == FEATURES_PATH and method == "POST":
            problem = rt.check_feature_rows(parsed)
            if problem is not None:
                status, msg = problem
                await send_json(send, status, {"error": msg, "request_id": rid}, [rid_header])
                return
            rows = parsed["rows"]
            ctx["patients"] = sorted(
                {_pseudonym(str(r["patient_id"])) for r in rows if r.get("patient_id")}
            )
            ctx["model_version"] = rt.champion.version
            for r in rows:  # the prediction log records the HTTP request id per row
                r["request_id"] = rid
            body = orjson.dumps(parsed)
        scope.setdefault("state", {})["vitalrisk"] = ctx
        if method in ("POST", "PUT", "PATCH"):
            # the body was parsed as JSON above: say so, whatever the client declared (this also
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

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send_with_id)
        finally:
            # batched feature rows: the runtime knows which version scored this request
            version = rt.answered_by(rid) or ctx.get("model_version")
            rt.audit.submit(
                actor=key.name,
                action=ROUTE_ACTIONS.get(path, "request"),
                resource=f"{method} {path}",
                patients=[str(p) for p in ctx.get("patients") or []],
                model_version=None if version is None else str(version),
                request_id=rid,
                status=status_box["status"],
            )
