"""Group-committed audit writing: a request is answered only once its audit entry is durable.

Each request submits what it did (key, route, status, patient pseudonyms) and awaits it. One
writer thread takes everything submitted while the previous group was being written,
coalesces it per (key, action, route, model version, status) into entries that list the
request ids and the union of the pseudonyms, and appends the group with one write and one
``fsync`` (``AuditStore.append_many``). Under load hundreds of requests share an fsync; a
quiet service still writes each request as soon as it arrives (there is no timer).

When an append fails, every request of that group gets the error (the service answers 503),
``healthy`` turns False (``/readyz`` is not ready, data routes answer 503 at once) and the
writer probes the store (``check_writable``) every ``probe_seconds`` until appends can succeed
again. Entries of unauthenticated or throttled requests are queued without waiting
(:meth:`AuditWriter.record`): they touch no patient data, so their answers do not wait for
the disk, and a flood of them is bounded (``max_unacknowledged``) and counted when cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from governance.audit import AuditLogError, AuditRecord, AuditStore

logger = logging.getLogger(__name__)


class AuditUnavailable(RuntimeError):
    """The audit entry could not be made durable: the request must not be answered."""


@dataclass(frozen=True)
class AuditItem:
    """One HTTP request as the audit log records it."""

    actor: str
    action: str
    resource: str
    status: int
    request_id: str
    patients: Sequence[str] = ()
    model_version: str | None = None
    client: str | None = None


@dataclass
class _Group:
    patients: set[str] = field(default_factory=set)
    request_ids: list[str] = field(default_factory=list)
    clients: set[str] = field(default_factory=set)
    first: str = ""
    last: str = ""


_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]
_Key = tuple[str, str, str, str | None, int]


def coalesce(items: Sequence[tuple[AuditItem, str]]) -> list[AuditRecord]:
    """``(item, submitted_at)`` pairs -> one record per (actor, action, route, version, status),
    in order of first appearance; every request id is kept."""
    groups: dict[_Key, _Group] = {}
    for item, at in items:
        key = (item.actor, item.action, item.resource, item.model_version, item.status)
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(first=at)
        g.patients.update(item.patients)
        g.request_ids.append(item.request_id)
        if item.client:
            g.clients.add(item.client)
        g.last = at
    return [
        AuditRecord(
            actor=actor,
            action=action,
            resource=resource,
            patients=sorted(g.patients),
            model_version=version,
            details={
                "status": status,
                "requests": len(g.request_ids),
                "request_ids": g.request_ids,
                "clients": sorted(g.clients),
                "first": g.first,
                "last": g.last,
            },
        )
        for (actor, action, resource, version, status), g in groups.items()
    ]


def _settle(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in waiters:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(AuditUnavailable(str(error)))


class AuditWriter:
    """The service's audit trail: group commit on a thread, fail closed, self-probing."""

    def __init__(
        self,
        store: AuditStore,
        probe_seconds: float = 1.0,
        max_unacknowledged: int = 100_000,
    ) -> None:
        self.store = store
        self.probe_seconds = float(probe_seconds)
        self.max_unacknowledged = int(max_unacknowledged)
        self._cond = threading.Condition()
        self._pending: list[tuple[AuditItem, str, _Waiter | None]] = []
        self._unacknowledged = 0
        self._dropped = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.healthy = True
        self.last_error = ""
        self.groups = 0

    def start(self) -> AuditWriter:
        """Recover a crash-torn log (``AuditStore.prepare``), then start the writer thread.

        Raises ``AuditLogError`` when the store cannot be made appendable: the service must
        not start without an audit trail.
        """
        self.store.prepare()
        self.store.check_writable()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
        return self

    async def commit(self, item: AuditItem, timeout: float) -> None:
        """Return once ``item`` is durable; ``AuditUnavailable`` when it cannot be made so."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._put(item, (loop, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise AuditUnavailable(f"no durable audit entry within {timeout:g} s") from None

    def record(self, item: AuditItem) -> None:
        """Queue ``item`` without waiting (requests that touched no patient data)."""
        with self._cond:
            if self._unacknowledged >= self.max_unacknowledged:
                self._dropped += 1
                return
            self._unacknowledged += 1
        self._put(item, None)

    def _put(self, item: AuditItem, waiter: _Waiter | None) -> None:
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._cond:
            if self._stop:
                if waiter is not None:
                    waiter[1].set_exception(AuditUnavailable("the audit writer is closed"))
                return
            self._pending.append((item, at, waiter))
            self._cond.notify()

    def _next_batch(self) -> list[tuple[AuditItem, str, _Waiter | None]] | None:
        """What was submitted since the last group; ``[]`` after an idle wait, None to stop."""
        with self._cond:
            if not self._pending and not self._stop:
                self._cond.wait(None if self.healthy else self.probe_seconds)
            if not self._pending:
                return None if self._stop else []
            batch, self._pending = self._pending, []
            self._unacknowledged -= sum(1 for _, _, w in batch if w is None)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                if not self.healthy:
                    self._probe()
                continue
            error = self._write(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for _, _, waiter in batch:
                if waiter is not None:
                    by_loop.setdefault(waiter[0], []).append(waiter[1])
            # one wake-up per event loop and group, not one per request; a closed loop
            # (shutdown) has nobody waiting any more
            for loop, futures in by_loop.items():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, futures, error)

    def _write(self, batch: list[tuple[AuditItem, str, _Waiter | None]]) -> BaseException | None:
        records = coalesce([(item, at) for item, at, _ in batch])
        if self._dropped:
            records.append(self._dropped_record())
        try:
            self.store.append_many(records)
        except (OSError, AuditLogError, ValueError) as exc:
            if self.healthy:  # once per outage: the probe says when it is over
                logger.error(
                    "audit append failed for %d request(s): %s; data routes answer 503 "
                    "until the audit log is writable again",
                    len(batch),
                    exc,
                )
            self.healthy, self.last_error = False, str(exc)
            return exc
        self.groups += 1
        if not self.healthy:
            logger.warning("audit log writable again: serving resumes")
        self.healthy, self.last_error = True, ""
        return None

    def _dropped_record(self) -> AuditRecord:
        with self._cond:
            n, self._dropped = self._dropped, 0
        logger.warning("audit: %d denied-request entries were over the queue bound", n)
        return AuditRecord(
            "vitalrisk", "audit_overflow", "denied requests", details={"unrecorded": n}
        )

    def _probe(self) -> None:
        try:
            self.store.check_writable()
        except (OSError, AuditLogError) as exc:
            self.last_error = str(exc)
            return
        if not self.healthy:
            logger.warning("audit log writable again: serving resumes")
        self.healthy, self.last_error = True, ""

    def close(self) -> None:
        """Write what is pending and stop the thread (service shutdown)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.store.close()
