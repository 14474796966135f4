"""Dynamic batching: concurrent requests share one beam search, and the next batch fills while
the current one runs.

A background task takes the first waiting request, then keeps collecting until the batch holds
`max_batch_users` users, or `max_wait_s` has passed since that first request AND the previous
batch has finished: while the GPU is busy there is no reason to close a batch early, so under
load batches fill up to the maximum. Requests arrive with their inputs already encoded on the
host (onerec/serve/app.py), the batch runs in one worker thread (torch releases the GIL, so the
event loop keeps accepting requests and the next batch fills while this one computes). A request
is never split: one whose users would overflow the batch starts the next one. Requests with
different beam widths cannot share a beam search (the width changes the result), so a batch runs
one search per width; different k share it (the top-k of the same beams is a prefix of the
top-max(k)).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class BatcherStopped(RuntimeError):
    """Submitted to a batcher that is not running (not started yet, or shut down)."""


@dataclass
class Job:
    """One request: its users (opaque to the batcher), k, beam, and the caller's future."""

    users: list
    k: int
    beam: int
    future: asyncio.Future = field(repr=False)


# run(users of several jobs, k, beam) -> one result per user, in order; a result has .top(k)
RunFn = Callable[[list, int, int], list]


class DynamicBatcher:
    def __init__(
        self, run: RunFn, max_batch_users: int = 64, max_wait_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_users < 1 or max_wait_s < 0:
            raise ValueError("max_batch_users must be >= 1 and max_wait_s >= 0")
        self.run = run
        self.max_batch_users = max_batch_users
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onerec-batch")
        self._task: asyncio.Task | None = None
        self._carry: Job | None = None
        self.in_flight = 0  # submitted and not yet answered

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="onerec-batcher")

    async def stop(self) -> None:
        """Answer everything already submitted, then stop."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, users: list, k: int, beam: int) -> list:
        if self._task is None or self._task.done():
            raise BatcherStopped("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        self.in_flight += 1
        try:
            await self._queue.put(Job(users, k, beam, future))
            return await future
        finally:
            self.in_flight -= 1

    async def _collect(self, running: asyncio.Task | None) -> tuple[list[Job], bool]:
        """The next batch, and whether stop was requested. `running`: the batch on the GPU now."""
        loop = asyncio.get_running_loop()
        first = self._carry or await self._queue.get()
        self._carry = None
        if first is None:
            return [], True
        jobs, n_users = [first], len(first.users)
        deadline = loop.time() + self.max_wait_s
        while n_users < self.max_batch_users:
            if self._queue.empty():
                busy = running is not None and not running.done()
                timeout = deadline - loop.time()
                if timeout <= 0 and not busy:
                    break
                getter = asyncio.ensure_future(self._queue.get())
                waiting = {getter, running} if busy else {getter}
                await asyncio.wait(waiting, timeout=None if busy and timeout <= 0 else max(timeout, 0),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue  # the deadline passed or the GPU became free: check again
                job = getter.result()
            else:
                job = self._queue.get_nowait()
            if job is None:
                return jobs, True
            if n_users + len(job.users) > self.max_batch_users:
                self._carry = job
                break
            jobs.append(job)
            n_users += len(job.users)
        return jobs, False

    async def _run(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for beam in sorted({j.beam for j in jobs}):
            group = [j for j in jobs if j.beam == beam]
            users = [u for j in group for u in j.users]
            try:
                results = await loop.run_in_executor(self._executor, self.run, users, max(j.k for j in group), beam)
            except Exception as exc:
                log.exception("batch of %d users failed", len(users))
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            start = 0
            for j in group:
                mine = results[start : start + len(j.users)]
                start += len(j.users)
                if not j.future.done():
                    j.future.set_result([r.top(j.k) for r in mine])

    async def _loop(self) -> None:
        stopping = False
        running: asyncio.Task | None = None
        while not stopping or self._carry is not None or not self._queue.empty():
            jobs, stop = await self._collect(running)
            stopping = stopping or stop
            jobs = [j for j in jobs if not j.future.done()]  # callers that went away
            if not jobs:
                continue
            if running is not None:
                await running  # one batch on the GPU at a time; this one is already collected
            if self.on_batch is not None:
                self.on_batch(sum(len(j.users) for j in jobs))
            running = asyncio.get_running_loop().create_task(self._run(jobs), name="onerec-batch")
        if running is not None:
            await running
