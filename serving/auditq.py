"""Coalesced audit writing: who accessed which patients through which route, without an fsync
per HTTP request.

Each request is submitted here (non-blocking); a background thread appends, every
``interval`` seconds, one ``governance.audit.AuditLog`` entry per (key, action, route, model
version) with the union of patient pseudonyms, the request ids and the status counts. Under
load this turns hundreds of fsyncs per second into a few, while a quiet service still gets one
entry per request. ``interval=0`` writes every request on its own (synchronously). Pending
entries are flushed on shutdown; a hard crash can lose at most the last ``interval`` seconds.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class _Group:
    patients: set[str] = field(default_factory=set)
    request_ids: list[str] = field(default_factory=list)
    status: Counter[str] = field(default_factory=Counter)
    first: str = ""
    last: str = ""


class AuditBatcher:
    def __init__(self, log: Any, interval: float = 0.25) -> None:
        self.log = log
        self.interval = float(interval)
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str, str | None], _Group] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AuditBatcher:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
        return self

    def submit(
        self,
        actor: str,
        action: str,
        resource: str,
        patients: list[str],
        model_version: str | None,
        request_id: str,
        status: int,
    ) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        if self.interval <= 0:
            self._write(
                (actor, action, resource, model_version),
                _Group(set(patients), [request_id], Counter({str(status): 1}), now, now),
            )
            return
        with self._lock:
            g = self._pending.setdefault(
                (actor, action, resource, model_version), _Group(first=now)
            )
            g.patients.update(patients)
            g.request_ids.append(request_id)
            g.status[str(status)] += 1
            g.last = now

    def flush(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, {}
        for key, group in pending.items():
            self._write(key, group)
        return len(pending)

    def _write(self, key: tuple[str, str, str, str | None], g: _Group) -> None:
        actor, action, resource, version = key
        try:
            self.log.append(
                actor=actor,
                action=action,
                resource=resource,
                patients=sorted(g.patients),
                model_version=version,
                details={
                    "requests": len(g.request_ids),
                    "request_ids": g.request_ids,
                    "status": dict(g.status),
                    "first": g.first,
                    "last": g.last or g.first,
                },
            )
        except Exception:  # never silent: the operator must see a failing audit trail
            logger.exception(
                "audit append failed for %d request(s) of %s", len(g.request_ids), actor
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
        self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()
