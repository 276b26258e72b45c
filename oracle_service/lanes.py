"""The oracle's lanes: the threads its torch work runs in, and which job may run where.

A lane is one thread (a single-worker executor); with CUDA graphs each lane also has
its own CUDA stream and graphs (``specdec.engine.static_kv.SlotPool.enter_lane``), so two
lanes' forwards run at once on the GPU. The event loop submits every job here:

* a batch takes a lane with no batch running (``take`` ... ``give_back``): a lane runs
  one batch at a time, and other jobs (opens, releases) queue behind it;
* a job on one session (a batch's sessions, an open, a release) holds that session
  (``OracleSession.busy``) until the job really ends, even if its caller gave up, and a
  job that needs a held session waits: no two lanes ever touch one session's cache.

Everything here runs on the event loop, except the jobs themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from oracle_service.sessions import OracleSession, SessionStore

T = TypeVar("T")


class Lanes:
    """``count`` lane threads; ``enter(i)`` runs first in lane i's thread; ``wake`` is
    called on the event loop whenever a job ends (a lane or a session may be free)."""

    def __init__(
        self,
        count: int,
        enter: Callable[[int], None],
        sessions: SessionStore,
        wake: Callable[[], None],
    ) -> None:
        self.count = count
        self.executors = [
            ThreadPoolExecutor(1, f"oracle-lane{i}", initializer=enter, initargs=(i,))
            for i in range(count)
        ]
        self._sessions = sessions
        self._wake = wake
        self._jobs = [0] * count  # jobs submitted to each lane and not done
        self._batch = [False] * count  # whether a batch runs in each lane
        self.sessions_in_batches = 0
        self.closed = False  # shut down: no job will run any more
        self._idle_waiters: list[asyncio.Future[None]] = []  # jobs waiting for a session

    async def run(
        self,
        fn: Callable[[], T],
        session: OracleSession | None = None,
        lane: int | None = None,
    ) -> tuple[T, int, int]:
        """fn() in a lane -> (its result, queue_ns, compute_ns).

        ``session``: fn touches it, so it runs once no other job of it does.
        ``lane``: that lane (default: the one with the fewest jobs)."""
        submitted = time.perf_counter_ns()
        if session is not None:
            while session.busy:
                waiter = asyncio.get_running_loop().create_future()
                self._idle_waiters.append(waiter)
                await waiter
            self._sessions.hold(session)
        chosen = self._least_busy(range(self.count)) if lane is None else lane

        def timed() -> tuple[T, int, int]:
            start = time.perf_counter_ns()
            result = fn()
            return result, start - submitted, time.perf_counter_ns() - start

        def done(_: object) -> None:  # when the job ends, even if its caller gave up
            self._jobs[chosen] -= 1
            if session is not None:
                self._sessions.hold(session, -1)
            self._job_done()

        try:
            future = asyncio.get_running_loop().run_in_executor(self.executors[chosen], timed)
        except BaseException:  # the lane is shut down: the session is free again
            if session is not None:
                self._sessions.hold(session, -1)
                self._job_done()
            raise
        self._jobs[chosen] += 1
        future.add_done_callback(done)
        return await asyncio.shield(future)

    def free(self) -> int | None:
        """A lane with no batch running (the one with the fewest jobs), or None."""
        free = [i for i in range(self.count) if not self._batch[i]]
        return self._least_busy(free) if free else None

    @property
    def free_count(self) -> int:
        return self._batch.count(False)

    def take(self, lane: int, sessions: Sequence[OracleSession]) -> None:
        """A batch of ``sessions`` goes to ``lane``: both are taken until ``give_back``."""
        assert not self._batch[lane], lane
        self._batch[lane] = True
        self.sessions_in_batches += len(sessions)
        for session in sessions:
            self._sessions.hold(session)

    def give_back(self, lane: int, sessions: Sequence[OracleSession]) -> None:
        """The batch ``take`` gave ``lane`` ended."""
        self._batch[lane] = False
        self.sessions_in_batches -= len(sessions)
        for session in sessions:
            self._sessions.hold(session, -1)
        self._job_done()

    def shutdown(self) -> None:
        """Stop every lane (queued jobs are dropped; running ones finish)."""
        self.closed = True
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)

    def _least_busy(self, lanes: Sequence[int] | range) -> int:
        return min(lanes, key=lambda i: (self._jobs[i], i))

    def _job_done(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._wake()
