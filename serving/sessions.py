"""Browser sessions of the clinician pages: an API key exchanged once for a signed cookie.

The login form (``POST /worklist/login``) checks the key exactly like a bearer token
(``KeyStore.authenticate``, the guard's throttle on failures) and needs the ``read`` scope.
The cookie ``vr_session`` holds the key *name*, a fingerprint of the key's digest (a rotated
or removed key ends its sessions), an expiry (``serve.feedback.session_minutes``) and a
nonce, signed with HMAC-SHA256; it is ``HttpOnly``, ``SameSite=Strict``, ``Path=/`` (and
``Secure`` behind HTTPS). The key itself never reaches the browser again. POST forms carry a
CSRF token: an HMAC of the session nonce, checked in constant time.

The signing secret is ``VITALRISK_SESSION_KEY``, else derived from the pseudonym key (so every
worker process of one deployment accepts the same cookies).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Any

COOKIE = "vr_session"
KEY_ENV = "VITALRISK_SESSION_KEY"


def _secret() -> bytes:
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode("utf-8")
    from governance.pseudonym import get_key

    return hashlib.sha256(b"vitalrisk session v1\x00" + get_key()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fingerprint(digest: bytes) -> str:
    return hashlib.sha256(b"fp" + digest).hexdigest()[:16]


@dataclass(frozen=True)
class Session:
    key_name: str
    key_fp: str
    expires: float
    nonce: str

    def csrf(self, secret: bytes | None = None) -> str:
        mac = hmac.new(secret or _secret(), b"csrf\x00" + self.nonce.encode(), hashlib.sha256)
        return mac.hexdigest()

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(), str(token))


def issue(key: Any, minutes: float, now: float | None = None) -> tuple[str, Session]:
    """A signed cookie value for ``key`` (a ``serving.auth.ApiKey``)."""
    session = Session(
        key_name=key.name,
        key_fp=fingerprint(key.digest),
        expires=(now or time.time()) + minutes * 60.0,
        nonce=_b64(os.urandom(16)),
    )
    body = _b64(
        json.dumps(
            {"k": session.key_name, "f": session.key_fp, "e": session.expires, "n": session.nonce},
            separators=(",", ":"),
        ).encode()
    )
    sig = _b64(hmac.new(_secret(), body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}", session


def verify(
    value: str | None, keys: Any, scope: str = "read", now: float | None = None
) -> tuple[Session, Any] | None:
    """The session and its (still configured, still ``scope``-allowed) key, or None."""
    if not value or "." not in value or len(value) > 1024:
        return None
    body, _, sig = value.partition(".")
    want = _b64(hmac.new(_secret(), body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(want, sig):
        return None
    try:
        doc = json.loads(_unb64(body))
        session = Session(str(doc["k"]), str(doc["f"]), float(doc["e"]), str(doc["n"]))
    except (ValueError, KeyError, TypeError):
        return None
    if session.expires < (now or time.time()):
        return None
    key = next((k for k in keys.keys if k.name == session.key_name), None)
    if key is None or fingerprint(key.digest) != session.key_fp or not key.allows(scope):
        return None
    return session, key


def cookie_header(value: str, minutes: float, secure: bool) -> bytes:
    parts = [
        f"{COOKIE}={value}",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        f"Max-Age={int(minutes * 60)}",
    ]
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("latin-1")


def clear_cookie_header() -> bytes:
    return f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0".encode("latin-1")


def cookie_of(header: str | None) -> str | None:
    """The session cookie's value from a ``Cookie`` header."""
    for part in (header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None
