"""The batch policy: which queued blocks go into the next batch, and when it starts.

Blocks of all sessions wait in one queue in arrival order. When a lane is free
(``oracle_service.lanes``), the next batch is taken by one scan from the oldest
block on:

* a block joins the batch unless its session already has one in it: a session
  may have two blocks queued (pipelining sends the next block before the previous
  verdict), and the second extends the first's verdict, so it must run in a later
  batch. Skipping it also keeps every later block of that session behind it, so
  each session's blocks still run in the order they arrived;
* the scan stops at ``max_batch`` blocks, and before the first block that would not fit
  the same forward as the blocks before it (``fits``: the KV pool's token budget, e.g. a
  batch-invariant forward holds B x T <= 128 grid tokens). The rest run in the next
  batch, which starts right after; before, one batch ran as two forwards and every
  session in it waited for both;
* a pipelined block that is already known to be stale (its session's committed
  tokens do not end with what it assumed) is answered "skipped" on the spot
  instead of taking a place: otherwise it would keep its session's next block,
  the re-drafted one, out of this batch and cost that session a whole forward.

A session with a job running in a lane (``OracleSession.busy``: a batch, or its
open) takes no place in the next batch: its blocks wait until that job is done.

Nobody starves: a block is passed over only for older blocks (max_batch of them
per batch) or because an older block of its own session is in the batch, never
for younger ones, so a session that keeps sending only adds blocks behind it.
With max_batch = 1 the queue is plain first come, first served.

The batch wait: before a batch, while fewer sessions have a block that could run
than have a stream open outside the running batches, the batcher waits for theirs
(at most ``batch_wait_s``), unless another lane is free too. Sessions answer a
verdict at different times (network, drafting), so a batch started the moment a
lane is free holds only the quickest; the others then wait a whole forward for the
next one. A short wait fills the batch instead: one forward of B rows costs about
one of a single row when the GPU is launch-bound. With another lane free, the
latecomers will have that one: no wait. Nor when the waiting blocks already fill a
forward, or when no latecomer is expected within the wait: each session's return
time (from its verdict to its next block: the round trip, plus the drafting of k
tokens when speculating) is a running mean, and a session answered at t is expected
at t + that mean. Waiting for sessions still drafting only idles the GPU: at 16
speculating sessions of an 8B oracle (drafting ~9 ms a block, a wait of 5 ms) the
batcher idled 5 ms before every batch and ran half the sessions anyway.

Rescue decisions due (``oracle_service.rescue``) are settled just before a batch is
taken, so that a block extending a miss's verdict finds it decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oracle_service.counters import BatchCounters
from oracle_service.lanes import Lanes
from oracle_service.sessions import Lease, OracleSession, SessionStore
from specdec.core.prefix import ends_with
from specdec.core.types import DraftBlock, VerifyResult

if TYPE_CHECKING:
    from oracle_service.rescue import Rescues


@dataclass(eq=False)
class PendingBlock:
    """One VerifyBlock waiting for the model; ``future`` gets its result.

    enqueued_ns: ``time.perf_counter_ns()`` when it could first run: when it was
    queued, or for a block queued behind its session's previous one, when that one's
    verdict was set (queue_ns starts there; before it, the wait is the pipelining's).
    """

    lease: Lease
    base_length: int
    block: DraftBlock
    assumed: tuple[int, ...]
    future: asyncio.Future[VerifyResult]
    enqueued_ns: int
    last_alternative: bool = False  # the draft's last block for the verdict it assumes

    @property
    def session(self) -> OracleSession:
        return self.lease.session


# A session's return time, as a running mean: mean' = RETURN_DECAY mean + (1 - it) sample.
RETURN_DECAY = 0.8


def _fits_always(sizes: Sequence[int]) -> bool:
    return True


class BlockQueue:
    """Blocks waiting for the model, oldest first (event loop only).

    fits(sizes): whether rows of ``sizes`` tokens (k + 1 each) run as one forward.
    """

    def __init__(
        self, max_batch: int, fits: Callable[[Sequence[int]], bool] = _fits_always
    ) -> None:
        self.max_batch = max_batch
        self.fits = fits
        self._waiting: deque[PendingBlock] = deque()
        # Sessions answered and not back yet -> when their verdict was answered (ns).
        self._answered: dict[OracleSession, int] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def sessions_waiting(self) -> int:
        """Sessions with a block that could run now (a pipelining session may have two)."""
        return len(
            {
                pending.session
                for pending in self._waiting
                if not pending.future.done() and not pending.session.busy
            }
        )

    def waiting(self, session: OracleSession) -> list[PendingBlock]:
        """``session``'s blocks waiting, oldest first."""
        return [p for p in self._waiting if p.session is session and not p.future.done()]

    def put(self, pending: PendingBlock) -> None:
        session = pending.session
        answered = self._answered.pop(session, None)
        if answered is not None:  # its return time: verdict -> this block
            took = max(0, pending.enqueued_ns - answered)
            session.return_ns = RETURN_DECAY * session.return_ns + (1 - RETURN_DECAY) * took
        self._waiting.append(pending)

    def answered(self, sessions: Sequence[OracleSession], now_ns: int) -> None:
        """``sessions`` got a verdict (or a skip) at ``now_ns``: those with no block waiting
        are expected back at now_ns + their return time."""
        waiting = {p.session for p in self._waiting if not p.future.done()}
        for session in sessions:
            if session not in waiting:
                self._answered[session] = now_ns

    def late_by(self, deadline_ns: int) -> int:
        """Sessions with an open stream, answered and not back, that are not expected back
        by ``deadline_ns`` (answered + return time later). A session never answered yet
        is not among them: it may come any moment."""
        for session in [s for s in self._answered if s.active_streams <= 0]:
            del self._answered[session]  # its stream ended: it sends nothing more
        return sum(
            1
            for session, answered in self._answered.items()
            if not session.busy and answered + session.return_ns > deadline_ns
        )

    def fills_forward(self) -> bool:
        """Whether the blocks that could run now fill a batch: ``max_batch`` of them, or
        more tokens than one forward holds."""
        sizes: list[int] = []
        sessions: set[OracleSession] = set()
        for pending in self._waiting:
            if pending.future.done() or pending.session.busy or pending.session in sessions:
                continue
            sessions.add(pending.session)
            sizes.append(len(pending.block.token_ids) + 1)
            if len(sizes) >= self.max_batch or not self.fits(sizes):
                return True
        return False

    def put_next(self, pending: PendingBlock) -> None:
        """Queue ``pending`` as its session's next block, ahead of the others it has
        waiting (a rescue block: the session's next verdict is promised to it)."""
        for index, waiting in enumerate(self._waiting):
            if waiting.session is pending.session:
                self._waiting.insert(index, pending)
                return
        self._waiting.append(pending)

    def restart_clocks(self, sessions: set[OracleSession], now_ns: int) -> None:
        """The blocks of ``sessions`` still waiting could first run at ``now_ns``: their
        sessions' previous blocks were just verified."""
        for pending in self._waiting:
            if pending.session in sessions:
                pending.enqueued_ns = max(pending.enqueued_ns, now_ns)

    def prune(self, stale: Callable[[PendingBlock], bool]) -> list[PendingBlock]:
        """Remove and return the stale blocks at the front of each session's line.

        Only between batches, when every session's committed tokens are final for its
        first waiting block: a session whose blocks were all drafted for outcomes its
        verdict did not have then counts as having nothing waiting.
        """
        pruned: list[PendingBlock] = []
        ready: set[OracleSession] = set()
        kept: deque[PendingBlock] = deque()
        for pending in self._waiting:
            if pending.future.done():
                continue
            if pending.session not in ready and not pending.session.busy and stale(pending):
                pruned.append(pending)
                continue
            ready.add(pending.session)
            kept.append(pending)
        self._waiting = kept
        return pruned

    def take(
        self, stale: Callable[[PendingBlock], bool] = lambda pending: False
    ) -> tuple[list[PendingBlock], list[PendingBlock]]:
        """(the next batch, the stale blocks passed over); ([], []) when nothing waits.

        ``stale`` is asked only of a session's first waiting block, the one its
        committed tokens are final for. Blocks whose caller gave up (future
        cancelled) are dropped here.
        """
        batch: list[PendingBlock] = []
        skipped: list[PendingBlock] = []
        sessions: set[OracleSession] = set()
        sizes: list[int] = []  # tokens of each row: the batch's, then the candidate's
        kept: deque[PendingBlock] = deque()
        while self._waiting and len(batch) < self.max_batch:
            pending = self._waiting.popleft()
            if pending.future.done():
                continue
            if pending.session in sessions or pending.session.busy:
                kept.append(pending)  # after its session's block in this batch or a lane
                continue
            if stale(pending):
                skipped.append(pending)  # its session's next block may take the place
                continue
            sizes.append(len(pending.block.token_ids) + 1)
            if batch and not self.fits(sizes):  # the next forward's first block
                kept.append(pending)
                break
            sessions.add(pending.session)
            batch.append(pending)
        kept.extend(self._waiting)
        self._waiting = kept
        return batch, skipped

    def drain(self) -> list[PendingBlock]:
        """Every waiting block, removed (shutdown)."""
        drained = list(self._waiting)
        self._waiting.clear()
        return drained


class Scheduler:
    """The batcher task (event loop): forms each batch once a lane is free and hands it,
    with the lane, to ``run``. ``rescues``: the misses' rescues to settle, if any."""

    def __init__(
        self,
        queue: BlockQueue,
        lanes: Lanes,
        sessions: SessionStore,
        counters: BatchCounters,
        run: Callable[[int, list[PendingBlock]], Coroutine[Any, Any, None]],
        *,
        batch_wait_s: float,
        rescues: Rescues | None = None,
    ) -> None:
        self.queue = queue
        self.batch_wait_s = batch_wait_s
        self.rescues = rescues
        self._lanes = lanes
        self._sessions = sessions
        self._counters = counters
        self._run = run
        self._running: set[asyncio.Task[None]] = set()  # the running batches
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def put(self, pending: PendingBlock) -> None:
        """Queue ``pending`` and wake the batcher (started on the running loop if need be)."""
        self.queue.put(pending)
        if self.rescues is not None:
            self.rescues.arrived(pending)
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.done() or self._loop is not loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._batcher = loop.create_task(self._batch_loop(), name="oracle-batcher")
        assert self._wakeup is not None
        self._wakeup.set()

    def wake(self) -> None:
        """Something the batcher waits for may have changed (event loop)."""
        if self._wakeup is not None:
            self._wakeup.set()

    def stop(self) -> None:
        """Cancel the queued blocks, the pending rescues, the batcher and the running
        batches, on the batcher's loop (callable from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            self._stop()
        else:
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        for pending in self.queue.drain():
            pending.future.cancel()
        if self.rescues is not None:
            self.rescues.cancel()
        if self._batcher is not None:
            self._batcher.cancel()
        for task in self._running:
            task.cancel()

    async def _batch_loop(self) -> None:
        """Take batches off the queue and run each in a free lane."""
        assert self._wakeup is not None
        while not self._lanes.closed:
            lane = await self._free_lane()
            await self._let_batch_fill()
            if self.rescues is not None:
                self.rescues.settle()
            batch, skipped = self.queue.take(known_stale)
            self._skip(skipped)
            if not batch:
                self._wakeup.clear()
                due_s = self.rescues.next_deadline_s() if self.rescues else None
                with contextlib.suppress(TimeoutError):  # a miss is due for its decision
                    await asyncio.wait_for(self._wakeup.wait(), due_s)
                continue
            # The lane and the sessions are taken now, before the next batch is formed.
            self._lanes.take(lane, [pending.session for pending in batch])
            task = asyncio.get_running_loop().create_task(self._run(lane, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _free_lane(self) -> int:
        """A lane with no batch running."""
        assert self._wakeup is not None
        while (lane := self._lanes.free()) is None:
            self._wakeup.clear()
            await self._wakeup.wait()
        return lane

    async def _let_batch_fill(self) -> None:
        """The batch wait (see the module doc): return once the batch may start."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        # A session whose waiting blocks are all stale (drafted for outcomes its verdict
        # did not have) has nothing to run: answer them first, then count it as not ready.
        while True:
            self._skip(self.queue.prune(known_stale))
            waiting = self.queue.sessions_waiting()
            could_wait = self._sessions.active_streams - self._lanes.sessions_in_batches
            if not 0 < waiting < min(self.queue.max_batch, could_wait):
                return
            if self._lanes.free_count > 1 or self.queue.fills_forward():
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            late = self.queue.late_by(time.perf_counter_ns() + int(remaining * 1e9))
            if could_wait - waiting <= late:
                return  # every latecomer is still drafting: waiting would only idle
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _skip(self, skipped: list[PendingBlock]) -> None:
        """Answer stale pipelined blocks without the model: nothing changes for them."""
        now = time.perf_counter_ns()
        self._counters.count_skipped(len(skipped))
        self.queue.answered([pending.session for pending in skipped], now)
        for pending in skipped:
            result = VerifyResult(
                None, len(pending.session.committed), 0, now - pending.enqueued_ns
            )
            pending.future.set_result(result)


def known_stale(pending: PendingBlock) -> bool:
    """A pipelined block whose assumption the session's committed tokens already refute.

    Read on the event loop between batches, or in the lane running the block: a
    session's committed tokens change only in a batch or when its stream opens
    (before any of its blocks).
    """
    committed = pending.session.committed
    return bool(pending.assumed) and not ends_with(committed, pending.base_length, pending.assumed)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
