"""Dynamic batching: concurrent requests share one beam search, and the batch thread starts the
next batch the moment the current one returns, without waiting for the event loop.

Requests arrive with their inputs already encoded on the host (onerec/serve/app.py) and wait in a
queue shared with one batch thread. The thread takes the waiting requests (up to
`max_batch_users` users; a request is never split: one whose users would overflow the batch starts
the next one), runs their search, hands the answers to the event loop (`call_soon_threadsafe`) and
takes the next batch at once: the requests that arrived while the GPU ran form the next batch, so
under load batches fill up to the maximum, and the GPU idles only while the thread stacks and
launches the next batch, not while the event loop answers the previous batch's clients (HTTP
responses, JSON, the clients' next requests: tens of ms per batch of 32 on one core, which used to
sit between two batches). torch releases the GIL while it waits for the GPU, so the event loop
keeps accepting requests meanwhile.

A thread that found the queue empty sleeps until a request arrives; it then waits until
`max_wait_s` after that first request for more users (0: start at once). Requests with different
beam widths cannot share a beam search (the width changes the result), so a batch runs one search
per width; different k share it (the top-k of the same beams is a prefix of the top-max(k)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
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
    arrived: float = field(default_factory=time.monotonic)


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
        self.on_batch = on_batch  # called in the batch thread with each batch's user count
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()  # guards _jobs and _stopping
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0  # submitted and not yet answered

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="onerec-batch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Answer everything already submitted, then stop."""
        if self._thread is None:
            return
        with self._ready:
            self._stopping = True
            self._ready.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def submit(self, users: list, k: int, beam: int) -> list:
        future = asyncio.get_running_loop().create_future()
        with self._ready:
            if self._thread is None or self._stopping or not self._thread.is_alive():
                raise BatcherStopped("the batcher is not running")
            self._jobs.append(Job(users, k, beam, future))
            self._ready.notify()
        self.in_flight += 1
        try:
            return await future
        finally:
            self.in_flight -= 1

    # --- the batch thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._run(jobs)
            except Exception as exc:  # a failure outside run() (on_batch): answer, never hang the callers
                log.exception("batch of %d requests failed", len(jobs))
                self._answer([(j, exc) for j in jobs])

    def _take(self) -> list[Job] | None:
        """The next batch (blocks while nothing waits); None once stopping with nothing left."""
        with self._ready:
            while not self._jobs:
                if self._stopping:
                    return None
                self._ready.wait()
            if self.max_wait_s > 0:
                deadline = self._jobs[0].arrived + self.max_wait_s
                while (not self._stopping and self._waiting_users() < self.max_batch_users
                       and (left := deadline - time.monotonic()) > 0):
                    self._ready.wait(left)
            jobs, n_users = [], 0
            while self._jobs:
                job = self._jobs[0]
                if job.future.done():  # the caller went away
                    self._jobs.popleft()
                    continue
                if jobs and n_users + len(job.users) > self.max_batch_users:
                    break
                jobs.append(self._jobs.popleft())
                n_users += len(job.users)
            return jobs

    def _waiting_users(self) -> int:
        return sum(len(j.users) for j in self._jobs)

    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        if self.on_batch is not None:
            self.on_batch(sum(len(j.users) for j in jobs))
        for beam in sorted({j.beam for j in jobs}):
            group = [j for j in jobs if j.beam == beam]
            users = [u for j in group for u in j.users]
            try:
                results = self.run(users, max(j.k for j in group), beam)
            except Exception as exc:
                log.exception("batch of %d users failed", len(users))
                self._answer([(j, exc) for j in group])
                continue
            answers, start = [], 0
            for j in group:
                answers.append((j, [r.top(j.k) for r in results[start : start + len(j.users)]]))
                start += len(j.users)
            self._answer(answers)

    def _answer(self, answers: list[tuple[Job, list | BaseException]]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(_set_all, answers)


def _set_all(answers: list[tuple[Job, list | BaseException]]) -> None:
    """On the event loop: each job's result (or error), unless its caller went away."""
    for job, answer in answers:
        if job.future.done():
            continue
        if isinstance(answer, BaseException):
            job.future.set_exception(answer)
        else:
            job.future.set_result(answer)
