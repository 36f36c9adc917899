"""Connection-level limits under the ASGI app: the uvicorn protocol each worker serves with.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``), concurrent requests
(``limit_concurrency``: 503 beyond it) and graceful shutdown (``timeout_graceful_shutdown``);
``serving/worker.py`` sets those from params ``serve``. What it lacks, and what a client that
opens connections and then stalls uses to exhaust a server's file descriptors, is added here
on its httptools protocol (uvicorn's default when httptools is installed):

* a deadline for a request's line and headers (``header_timeout_seconds``): 408, closed. It
  runs from the connection's opening or from the first byte of each further request;
* a cap on their size (``max_header_bytes``; httptools has none): 431, closed;
* a cap on open connections per worker (``max_connections``) and per client address
  (``max_connections_per_client``): a connection over either is answered 503 and closed at
  once, before it holds a file descriptor for long;
* a cap on requests per keep-alive connection (``max_requests_per_connection``): the last
  answer carries ``Connection: close``.

The body deadline is the guard's (``serving/guard.py``), which can still answer in JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_connections_per_client: int  # 0: no per-address cap
    max_requests_per_connection: int
    header_timeout_seconds: float
    max_header_bytes: int

    @classmethod
    def from_config(cls, config: Any) -> ConnectionLimits:
        return cls(
            max_connections=int(config.max_connections),
            max_connections_per_client=int(config.max_connections_per_client),
            max_requests_per_connection=int(config.max_requests_per_connection),
            header_timeout_seconds=float(config.header_timeout_seconds),
            max_header_bytes=int(config.max_header_bytes),
        )


_REASONS = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def raw_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection (JSON, like the guard's)."""
    body = json.dumps({"error": message}).encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (``limits`` set per subclass)."""

    limits: ClassVar[ConnectionLimits]
    #: open connections per client address in this process (all connections share one loop)
    per_client: ClassVar[Counter[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._requests = 0
        self._counted: str | None = None
        self._answered = False

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        lim = self.limits
        addr = self.client[0] if self.client else ""
        if len(self.connections) > lim.max_connections:
            self._refuse(503, "too many open connections; retry shortly")
            return
        if (
            lim.max_connections_per_client
            and self.per_client[addr] >= lim.max_connections_per_client
        ):
            self._refuse(503, "too many open connections from this address; retry shortly")
            return
        self.per_client[addr] += 1
        self._counted = addr
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._counted is not None:
            self.per_client[self._counted] -= 1
            if self.per_client[self._counted] <= 0:
                del self.per_client[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def _refuse(self, status: int, message: str) -> None:
        """Answer with a closing error (no request was, or will be, handed to the app)."""
        self._cancel_header_timer()
        self._answered = True
        if not self.transport.is_closing():
            self.transport.write(raw_response(status, message))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self._answered:  # we already answered (431): the parser error is ours
            self.transport.close()
            return
        super().send_400_response(msg)

    # -- headers ------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(
                self.limits.header_timeout_seconds, self._header_timeout
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        secs = self.limits.header_timeout_seconds
        self._refuse(408, f"the request line and headers did not arrive within {secs:g} s")

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes and not self._answered:
            limit = self.limits.max_header_bytes
            self._refuse(431, f"request line and headers exceed {limit} bytes")
            raise ValueError("header limit")  # stops the parser; see send_400_response

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()
        self._requests += 1
        if self._requests >= self.limits.max_requests_per_connection and self.cycle is not None:
            self.cycle.keep_alive = False  # uvicorn then answers with "connection: close"


def protocol_class(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn's ``Config(http=...)`` takes, bound to ``limits``."""
    return type(
        "VitalRiskHttpProtocol",
        (LimitedHttpToolsProtocol,),
        {"limits": limits, "per_client": Counter()},
    )
