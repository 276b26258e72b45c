"""The oracle's queue of blocks waiting for the model, and the rule that forms a batch.

Blocks of all sessions wait in one queue in arrival order. When the model is
free, the next batch is taken by one scan from the oldest block on:

* a block joins the batch unless its session already has one in it: a session
  may have two blocks queued (pipelining sends the next block before the previous
  verdict), and the second extends the first's verdict, so it must run in a later
  batch. Skipping it also keeps every later block of that session behind it, so
  each session's blocks still run in the order they arrived;
* the scan stops at ``max_batch`` blocks;
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
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from oracle_service.sessions import Lease, OracleSession
from specdec.core.types import DraftBlock, VerifyResult


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


@dataclass
class BatchCounters:
    """Totals since start (the event loop updates them after each batch).

    batches: batches taken from the queue (one model-thread job each).
    blocks: blocks in them, refused and skipped ones included.
    verified: blocks that reached verification (not refused or skipped before compute).
    batched_forwards: forwards that verified more than one block at once.
    batched_rows: blocks verified in those forwards.
    largest_forward: the most blocks verified in one forward.
    busy_ns: lane time of the batches (their compute, not their queueing), summed over
        lanes: with two lanes it may pass the wall time.
    """

    batches: int = 0
    blocks: int = 0
    verified: int = 0
    batched_forwards: int = 0
    batched_rows: int = 0
    largest_forward: int = 0
    busy_ns: int = 0


class BlockQueue:
    """Blocks waiting for the model, oldest first (event loop only)."""

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._waiting: deque[PendingBlock] = deque()

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
        self._waiting.append(pending)

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
