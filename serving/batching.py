"""Opportunistic batching of raw-observation scoring (``/v1/score``, ``/v1/fhir/score``).

Why: scoring one patient from raw observations costs a few milliseconds of fixed work (one
pass per vocabulary code over every window, two LightGBM calls, one prediction-log commit)
and well under a millisecond per extra patient, because the training feature code is
vectorised over patients. Requests that arrive while a batch is being scored are therefore
scored together in the next batch: no timer, so a lone request never waits, and under load
the fixed work is shared.

Where a batch runs: small batches run on the event loop itself. The work is CPU-bound Python
either way, and a second thread only adds GIL hand-offs: every system call of the event loop
(socket writes, ``os.urandom`` for request ids) then waited for the scoring thread's switch
interval, which cost about a quarter more CPU per request and much longer waits (measured
with py-spy and cProfile under load). Batches above ``inline_observations`` run on one
scoring thread instead, so a huge request cannot hold up health probes for long.

Why not BentoML's adaptive batching (used for ``/v1/score/features``): it batches
``@bentoml.api`` routes whose input and output are lists concatenated along one axis, while a
``/v1/score`` answer is one document per request (its request id, the model, its patients).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Job(Generic[T]):
    """One request: its payload, request id and the future its handler awaits."""

    payload: T
    request_id: str
    size: int  # patients
    observations: int
    future: asyncio.Future[Any] = field(repr=False)


class ScoreQueue(Generic[T]):
    """Collects requests while a batch is being scored and scores them as the next batch.

    ``score_batch(jobs)`` returns one result (or exception) per job, in order; an exception
    only fails its own request.
    """

    def __init__(
        self,
        score_batch: Callable[[Sequence[Job[T]]], list[Any]],
        max_batch: int,
        inline_observations: int = 20_000,
    ) -> None:
        self._score_batch = score_batch
        self._max_batch = max(1, max_batch)
        self._inline_observations = inline_observations
        self._pending: deque[Job[T]] = deque()
        self._task: asyncio.Task[None] | None = None  # the drain task while batches remain
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitalrisk-score")
        # batches run one after the other (the drain task awaits each), so no lock is needed
        self.batches = 0
        self.requests = 0

    async def submit(
        self, payload: T, request_id: str, size: int = 1, observations: int = 0
    ) -> Any:
        """Score ``payload`` (``size`` patients) in the next batch; returns its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append(Job(payload, request_id, size, observations, fut))
        if self._task is None or self._task.done():
            # keep a reference: the loop holds tasks weakly
            self._task = loop.create_task(self._drain())
        return await fut

    async def _settle(self) -> None:
        """Let requests that already arrived reach the queue before the batch is cut.

        A request takes a few loop iterations from its socket to ``submit``; stop once three
        iterations in a row add nothing (each costs microseconds when nothing is ready).
        """
        stable = 0
        for _ in range(50):
            n = len(self._pending)
            await asyncio.sleep(0)
            stable = stable + 1 if len(self._pending) == n else 0
            if stable >= 3:
                break

    def _take(self) -> list[Job[T]]:
        """The next batch: pending jobs in arrival order up to ``max_batch`` patients."""
        batch: list[Job[T]] = []
        total = 0
        while self._pending:
            job = self._pending[0]
            if batch and total + job.size > self._max_batch:
                break
            batch.append(self._pending.popleft())
            total += job.size
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            await self._settle()
            batch = [j for j in self._take() if not j.future.cancelled()]
            if not batch:
                continue
            try:
                if sum(j.observations for j in batch) <= self._inline_observations:
                    results = self._run(batch)
                else:
                    results = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # the batch as a whole failed: tell every request
                results = [exc] * len(batch)
            for job, res in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)

    def _run(self, batch: list[Job[T]]) -> list[Any]:
        self.batches += 1
        self.requests += len(batch)
        out = self._score_batch(batch)
        if len(out) != len(batch):  # pragma: no cover - a programming error, not bad input
            raise RuntimeError("score_batch returned a different number of results")
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
        if self.batches:
            logger.info(
                "scored %d request(s) in %d batch(es), %.1f per batch",
                self.requests,
                self.batches,
                self.requests / self.batches,
            )
