"""A batch's run in its lane: admit each block, verify the admitted ones together, commit.

In the lane (``BatchRunner.verify``), one job per batch:

* admit: a block runs only if its stream is still the session's (``SessionStore.check``),
  no earlier block of the stream was refused, it extends exactly the session's committed
  length and it fits the context; a pipelined block whose assumption failed is skipped
  (the draft re-drafts). A refused block changes nothing: the session's committed tokens
  and cache stay as they were;
* verify: the admitted blocks in one forward (``specdec.engine.batched.verify_batch``:
  each row's verdict is exactly the one the session would get alone);
* commit: each verdict's tokens are appended to its session's committed tokens (the
  oracle's invariant: the cache now holds committed[:-1]); then idle sessions over the
  budget are evicted.

Back on the event loop (``BatchRunner.run``) the lane is given back, the batch
counted, and every block answered, each call timed twice:

    queue_ns   = start in the lane - the block's enqueued_ns   (waiting behind other work)
    compute_ns = end - start                                   (the whole batch)

A verdict that a rescue block may follow goes through ``Rescues.answer``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from oracle_service.counters import BatchCounters
from oracle_service.lanes import Lanes
from oracle_service.lifetimes import evict_idle
from oracle_service.rescue import Rescues
from oracle_service.scheduler import BlockQueue, PendingBlock, known_stale
from oracle_service.sessions import OracleSession, SessionStore
from specdec.core.errors import FailedPrecondition, InvalidArgument
from specdec.core.types import Verdict, VerifyResult, committed_tokens
from specdec.engine.batched import BatchItem, verify_batch
from specdec.engine.oracle import Oracle

log = logging.getLogger(__name__)

# A block's outcome in the lane: (its verdict, None when skipped; the committed length
# afterwards), or the error that refused it.
BlockOutcome = tuple[Verdict | None, int] | BaseException


@dataclass
class BatchRun:
    """What a batch's lane job did: one outcome per block, in the batch's order.

    start_ns: ``time.perf_counter_ns()`` when the job started; compute_ns: its duration.
    verified: blocks admitted to verification; forward_rows: rows of the one batched
    forward (0: the blocks ran one by one).
    """

    outcomes: list[BlockOutcome]
    start_ns: int
    compute_ns: int
    verified: int
    forward_rows: int


class BatchRunner:
    """Runs the batches the scheduler forms, in the lane it took for each."""

    def __init__(
        self,
        oracle: Oracle,
        sessions: SessionStore,
        lanes: Lanes,
        queue: BlockQueue,
        counters: BatchCounters,
        rescues: Rescues | None,
    ) -> None:
        self.oracle = oracle
        self.max_context = oracle.model.max_context
        self._sessions = sessions
        self._lanes = lanes
        self._queue = queue
        self._counters = counters
        self._rescues = rescues

    async def run(self, lane: int, batch: list[PendingBlock]) -> None:
        """Verify ``batch`` in ``lane`` (taken by the scheduler) and answer its blocks."""
        sessions = [pending.session for pending in batch]
        try:
            done, _, _ = await self._lanes.run(functools.partial(self.verify, batch), lane=lane)
        except asyncio.CancelledError:
            self._lanes.give_back(lane, sessions)
            for pending in batch:  # shutting down: queued work is dropped
                pending.future.cancel()
            raise
        except BaseException as exc:  # the executor is gone, or a bug: fail this batch only
            self._lanes.give_back(lane, sessions)
            log.exception("a verify batch of %d blocks failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self._lanes.give_back(lane, sessions)
        self._counters.count_batch(len(batch), done.verified, done.forward_rows, done.compute_ns)
        now = time.perf_counter_ns()
        self._queue.restart_clocks({p.session for p in batch}, now)
        self._queue.answered([p.session for p in batch], now)
        for pending, outcome in zip(batch, done.outcomes, strict=True):
            if pending.future.done():
                continue  # its caller gave up; the work is done all the same
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
                continue
            verdict, committed_length = outcome
            result = VerifyResult(
                verdict=verdict,
                committed_length=committed_length,
                verify_ns=done.compute_ns,
                queue_ns=done.start_ns - pending.enqueued_ns,
            )
            if self._rescues is not None:
                result = self._rescues.answer(pending, result)
            pending.future.set_result(result)

    def verify(self, batch: list[PendingBlock]) -> BatchRun:
        """Lane: admit every block, verify the admitted ones together, commit their verdicts."""
        start = time.perf_counter_ns()
        outcomes: list[BlockOutcome] = []
        admitted: list[tuple[int, OracleSession, PendingBlock]] = []
        for pending in batch:
            try:
                session = self.admit(pending)
            except Exception as exc:  # refused: nothing changes
                pending.lease.refused = True
                outcomes.append(exc)
                continue
            if session is None:  # the pipelined guess was wrong: skip, the draft re-drafts
                outcomes.append((None, len(pending.session.committed)))
                continue
            admitted.append((len(outcomes), session, pending))
            outcomes.append((None, 0))  # placeholder, set below
        forward_rows = 0
        if admitted:
            items = [
                BatchItem(session.cache, session.committed, p.block, session.params, session.seed)
                for _, session, p in admitted
            ]
            try:
                verification = verify_batch(self.oracle, items)
            finally:
                for _, session, _ in admitted:
                    self._sessions.account(session)
            forward_rows = verification.forward_rows
            verified = False
            for (index, session, pending), result in zip(
                admitted, verification.results, strict=True
            ):
                if isinstance(result, BaseException):
                    outcomes[index] = result
                    continue
                verdict, timing = result
                # The oracle's invariant: the cache now holds the new committed[:-1].
                session.committed.extend(committed_tokens(pending.block, verdict))
                if timing.prefill_computed:
                    self._sessions.record_prefill(0, timing.prefill_computed)
                self._sessions.touch(session)
                outcomes[index] = (verdict, len(session.committed))
                verified = True
            if verified:
                evict_idle(self._sessions)
        elapsed = time.perf_counter_ns() - start
        return BatchRun(outcomes, start, elapsed, len(admitted), forward_rows)

    def admit(self, pending: PendingBlock) -> OracleSession | None:
        """Lane: the block's session if the block may be verified now; None: skip it;
        raises: refuse it."""
        session = self._sessions.check(pending.lease)
        if pending.lease.refused:
            raise FailedPrecondition(
                "an earlier block of this verify stream was refused, and this one was sent "
                "before its answer; open a new stream"
            )
        if known_stale(pending):
            return None
        have = len(session.committed)
        if pending.base_length != have:
            raise FailedPrecondition(
                f"block extends length {pending.base_length} but session "
                f"{session.session_id!r} has {have} committed tokens: stale, duplicated or "
                "out of order"
            )
        k = len(pending.block)
        # The round commits up to k + 1 tokens at positions have..have+k; all must fit.
        if have + k + 1 > self.max_context:
            raise InvalidArgument(
                f"a block of {k} tokens after {have} committed tokens runs past the oracle's "
                f"context of {self.max_context}; send at most "
                f"{max(0, self.max_context - have - 1)} tokens"
            )
        return session
