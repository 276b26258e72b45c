"""The oracle engine: validates requests and runs every forward pass in its model threads.

All torch work runs in the engine's lanes, one thread each, and the event loop
stays free for the gRPC streams. On the CPU there is one lane: two forwards would
only contend for the same cores. With CUDA graphs there are two by default, each
on its own CUDA stream (``specdec.engine.static_kv``): the demo oracle's forward is bound
by kernel latency, so a batch that would wait for the running one runs beside it.
A session is in one lane's job at a time (``oracle_service.lanes``).

Blocks are verified in batches across sessions: ``verify`` queues its block
(``scheduler.BlockQueue``) and awaits it; one batcher task takes up to
``max_batch`` queued blocks, at most one per session, oldest first, and runs
them in a free lane as one job whose forward covers all of them
(``specdec.engine.batched.verify_batch``: each row's verdict is exactly the one the
session would get alone). Opens, releases and evictions go through the lanes too,
an open or a release once no job of its session runs. Each call is timed twice:

    queue_ns   = start in the lane - submission   (waiting behind other work)
    compute_ns = end - start                              (prefill, or the whole batch)

After a verdict that no waiting block of its session extends, a stream that
allows it may get a block drafted by the oracle itself, decided once the draft's
blocks for the verdict are all here (``oracle_service.rescue``).

Requests are checked before they reach the queue where that needs no session
state (ids in vocabulary, block well formed, context room); the committed
length a block extends is checked in the model thread, where the session's
state is serialised with every other change to it. A refused block changes
nothing: the session's committed tokens and cache stay as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from oracle_service.kv_pool import make_pool, reserve_turn, store_budget
from oracle_service.lanes import Lanes
from oracle_service.rescue import RescueDrafter, Rescues
from oracle_service.scheduler import BatchCounters, BlockQueue, PendingBlock
from oracle_service.sessions import Lease, OracleSession, SessionStore
from specdec.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from specdec.core.sampling import SamplingParams, validate_token_ids
from specdec.core.types import (
    MAX_SPECULATIVE_TOKENS,
    DraftBlock,
    OpenResult,
    Verdict,
    VerifyResult,
    committed_tokens,
)
from specdec.core.verifier import validate_block
from specdec.engine.batched import BatchItem, verify_batch
from specdec.engine.kv_options import KVSettings, turn_positions
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle, PrefillResult
from specdec.engine.paged_kv import PagedPool
from specdec.telemetry.setup import metrics

log = logging.getLogger(__name__)

MAX_SEED = (1 << 64) - 1
DEFAULT_MAX_BATCH = 16

# A block's outcome in the model thread: (verdict or None when skipped, committed length
# afterwards), or the error that refused it.
Outcome = tuple[Verdict | None, int] | BaseException


@dataclass(frozen=True)
class EngineInfo:
    """The oracle's model and load, as GetInfo reports them."""

    oracle_id: str
    model: str
    vocab_fingerprint: str
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    active_sessions: int
    cached_sessions: int
    kv_cache_bytes: int
    kv_cache_budget_bytes: int
    device: str
    batches: int  # verify batches run since start
    verified_blocks: int  # blocks verified in them
    verify_busy_ns: int  # lane time of those batches (summed over lanes)
    rescue_draft: str  # the model rescue blocks are drafted with ("" = none)
    rescue_blocks: int  # rescue blocks announced since start


class OracleEngine:
    """Sessions of one oracle model; async methods run the model in the engine's thread."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        oracle_id: str,
        kv_budget_bytes: int | None,
        max_sessions: int,
        max_cached_sessions: int,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_wait_s: float = 0.0,
        static_kv: str = "off",
        cuda_graphs: bool = True,
        lanes: int = 0,
        rescue_draft: LoadedModel | None = None,
        kv: KVSettings | None = None,
    ) -> None:
        """``max_batch``: the most blocks (of different sessions) verified in one forward.
        ``kv_budget_bytes`` (None = auto), ``static_kv``, ``cuda_graphs``, ``kv`` (the other
        KV settings): see ``oracle_service.kv_pool``.
        ``lanes``: batches verified at once (0 = auto: 2 with CUDA graphs for a launch-bound
        model, else 1).
        ``rescue_draft``: drafts the next block after a miss, for streams that allow
        it (``oracle_service.rescue``; it needs one lane)."""
        if max_batch < 1:
            raise InvalidArgument(f"max_batch must be >= 1, got {max_batch}")
        if lanes < 0:
            raise InvalidArgument(f"lanes must be >= 0 (0 = auto), got {lanes}")
        if rescue_draft is not None and lanes > 1:
            raise InvalidArgument(
                f"rescue blocks need one verify lane, got {lanes}: drop the rescue "
                "draft or set the lanes to 1"
            )
        self.model = model
        kv = dataclasses.replace(
            kv or KVSettings(),
            static_kv=static_kv,
            cuda_graphs=cuda_graphs,
            budget_bytes=kv_budget_bytes,
        )
        pool_lanes = 1 if rescue_draft is not None else lanes
        slots = make_pool(model, kv, max_rows=max_batch, lanes=pool_lanes)
        self.oracle = Oracle(model, slots)
        self.oracle_id = oracle_id
        self.sessions = SessionStore(
            self.oracle.new_cache,
            budget_bytes=store_budget(slots, kv),
            max_cached_sessions=max_cached_sessions,
            max_active_streams=max_sessions,
        )
        if isinstance(slots, PagedPool):  # a cache short of blocks evicts idle sessions first
            slots.reclaim = lambda blocks: self._evict_until(
                lambda: slots.available_blocks >= blocks
            )
        self.lanes = slots.lanes if slots is not None else max(1, lanes)
        self._lanes = Lanes(self.lanes, self._enter_lane, self.sessions, self._wake)
        self._running: set[asyncio.Task[None]] = set()  # the running batches
        self._closed = False
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.batch_counters = BatchCounters()
        self._queue = BlockQueue(max_batch)
        self.rescues: Rescues | None = None
        if rescue_draft is not None:
            on_cpu = rescue_draft.device.type == "cpu"
            if not on_cpu:
                log.warning(
                    "rescue blocks on %s: on a GPU oracle they were measured not to pay "
                    "(BENCHMARKS.md); consider running without a rescue draft",
                    rescue_draft.device,
                )
            drafter = RescueDrafter(rescue_draft, self._lanes.executors[0] if on_cpu else None)
            self.rescues = Rescues(drafter, self._queue, self._wake)
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued_blocks(self) -> int:
        """Blocks waiting for the model thread (the batch being verified not counted)."""
        return len(self._queue)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def _enter_lane(self, index: int) -> None:
        """Lane thread start: its forwards on the lane's CUDA stream and graphs."""
        if self.oracle.slots is not None:
            self.oracle.slots.enter_lane(index)
        elif self.model.device.type == "cuda" and self.lanes > 1:
            torch.cuda.set_stream(torch.cuda.Stream(self.model.device))

    async def warm_up(self) -> None:
        """Capture the verify and prefill forwards' CUDA graphs (static KV on a GPU) in each
        lane, before the first session: a capture while serving would stall a batch."""
        if self.oracle.slots is not None:
            for lane in range(self.lanes):
                await self._lanes.run(self.oracle.slots.capture_all, lane=lane)

    # -- open ---------------------------------------------------------------

    async def open(
        self,
        session_id: str,
        tokens: Sequence[int],
        sampling: SamplingParams,
        seed: int,
        allow_rescue: bool = False,
    ) -> tuple[Lease, OpenResult]:
        """Start a verify stream on ``session_id`` whose committed tokens are ``tokens``.

        Reuses the longest cached prefix and computes the rest: afterwards the
        cache holds tokens[:-1] (the last token is the first input of the next
        verify), so cached_tokens + computed_tokens = len(tokens) - 1.
        ``allow_rescue``: greedy streams get rescue blocks after a miss (when this
        oracle has a rescue draft).
        Raises ``ResourceExhausted`` at once when max_sessions streams are open.
        The lease must be given back with ``close`` when the stream ends.
        """
        if not session_id:
            raise InvalidArgument("OpenVerify.session_id must not be empty")
        tokens = [int(t) for t in tokens]
        validate_token_ids(tokens, self.vocab_size, "OpenVerify.token_ids")
        if len(tokens) >= self.max_context:
            raise InvalidArgument(
                f"{len(tokens)} committed tokens leave no room in the oracle's context of "
                f"{self.max_context} tokens ({self.model.name!r}); shorten the conversation"
            )
        sampling.validate()
        if not 0 <= seed <= MAX_SEED:
            raise InvalidArgument(f"seed must be in [0, 2^64), got {seed}")
        lease = self.sessions.admit(session_id)
        lease.rescue = allow_rescue and self.rescues is not None and sampling.greedy
        lease.opened_length = len(tokens)
        try:
            prefill, _, compute_ns = await self._lanes.run(
                lambda: self._open(lease, tokens, sampling, seed), lease.session
            )
        except BaseException:
            self.close(lease)
            raise
        log.debug(
            "session %s opened: %d tokens, %d cached, %d computed in %.1f ms",
            session_id,
            len(tokens),
            prefill.reused,
            prefill.computed,
            compute_ns / 1e6,
        )
        return lease, OpenResult(
            cached_tokens=prefill.reused,
            computed_tokens=prefill.computed,
            prefill_ns=compute_ns,
            oracle_id=self.oracle_id,
        )

    def _open(
        self, lease: Lease, tokens: list[int], sampling: SamplingParams, seed: int
    ) -> PrefillResult:
        session = self.sessions.check(lease)
        positions = turn_positions(len(tokens), sampling.max_new_tokens)
        reserve_turn(  # the admission rule (oracle_service.kv_pool), before any prefill
            lambda: session.cache.reserve(positions),
            self._evict_until,
            f"{positions} positions: {len(tokens)} committed + {sampling.max_new_tokens} new",
        )
        try:
            prefill = self.oracle.prefill(session.cache, tokens)
        finally:
            self.sessions.account(session)
        session.committed = tokens
        session.params = sampling
        session.seed = seed
        self.sessions.record_prefill(prefill.reused, prefill.computed)
        self.sessions.touch(session)
        self._evict()
        return prefill

    # -- verify -------------------------------------------------------------

    async def verify(
        self, lease: Lease, base_length: int, block: DraftBlock, assumed: Sequence[int] = ()
    ) -> VerifyResult:
        """Verify ``block``, drafted after the first ``base_length`` committed tokens
        (``submit``, awaited)."""
        return await self.submit(lease, base_length, block, assumed)

    def submit(
        self,
        lease: Lease,
        base_length: int,
        block: DraftBlock,
        assumed: Sequence[int] = (),
        last_alternative: bool = False,
    ) -> asyncio.Future[VerifyResult]:
        """Queue ``block``, drafted after the first ``base_length`` committed tokens; the
        future gets its result. Call on the event loop.

        The result fails with ``FailedPrecondition`` (and changes nothing) unless
        ``base_length`` is the session's committed length when the block's turn comes:
        the block is stale, duplicated or out of order; also once an earlier block of
        the same lease was refused (the blocks after it were drafted on a wrong
        premise). ``InvalidArgument`` (raised here) for a malformed block, in the result
        for one that would run past the context.

        ``assumed`` (pipelining): the last committed tokens the block takes for
        granted, sent before their verdict was known. If the session's tokens
        do not end with them at ``base_length``, the block is skipped: the
        result's verdict is None and nothing changes. ``last_alternative``: the
        draft sends no more blocks for that verdict (``oracle_service.rescue``).

        A session's blocks are verified in the order they were submitted, one per batch.
        """
        validate_block(block, self.vocab_size)
        assumed = _check_assumed(assumed, base_length, self.vocab_size)
        if self._closed:
            raise Unavailable("this oracle is shutting down; open the session on another oracle")
        loop = asyncio.get_running_loop()
        pending = PendingBlock(
            lease,
            base_length,
            block,
            assumed,
            loop.create_future(),
            time.perf_counter_ns(),
            last_alternative,
        )
        self._queue.put(pending)
        if self.rescues is not None:
            self.rescues.arrived(pending)
        self._start_batcher(loop)
        assert self._wakeup is not None
        self._wakeup.set()
        return pending.future

    def blocks_ended(self, lease: Lease) -> None:
        """The stream of ``lease`` sends no more blocks: no rescue block for it any more
        (a chain of them would go on without the draft)."""
        lease.rescue = False
        self._wake()

    def _wake(self) -> None:
        """Wake the batcher (event loop)."""
        if self._wakeup is not None:
            self._wakeup.set()

    def _start_batcher(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._batcher is None or self._batcher.done() or self._loop is not loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._batcher = loop.create_task(self._batch_loop(), name="oracle-batcher")

    async def _batch_loop(self) -> None:
        """Take batches off the queue and run each in a free lane."""
        assert self._wakeup is not None
        while not self._closed:
            lane = await self._free_lane()
            await self._let_batch_fill()
            if self.rescues is not None:
                self.rescues.settle(self._extends)
            batch, skipped = self._queue.take(self._known_stale)
            self._skip(skipped)
            if not batch:
                self._wakeup.clear()
                due_s = self.rescues.next_deadline_s() if self.rescues else None
                with contextlib.suppress(TimeoutError):  # a miss is due for its decision
                    await asyncio.wait_for(self._wakeup.wait(), due_s)
                continue
            # The lane and the sessions are taken now, before the next batch is formed.
            self._lanes.take(lane, [pending.session for pending in batch])
            task = asyncio.get_running_loop().create_task(self._run_batch(lane, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _free_lane(self) -> int:
        """A lane with no batch running."""
        assert self._wakeup is not None
        while (lane := self._lanes.free()) is None:
            self._wakeup.clear()
            await self._wakeup.wait()
        return lane

    async def _run_batch(self, lane: int, batch: list[PendingBlock]) -> None:
        """Verify ``batch`` in ``lane`` (taken by the batcher) and answer its blocks."""
        sessions = [pending.session for pending in batch]
        try:
            (outcomes, start_ns, compute_ns, rows, forward_rows), _, _ = await self._lanes.run(
                functools.partial(self._verify_batch, batch), lane=lane
            )
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
        self._count(len(batch), rows, forward_rows, compute_ns)
        self._queue.restart_clocks({p.session for p in batch}, time.perf_counter_ns())
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue  # its caller gave up; the work is done all the same
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
                continue
            verdict, committed_length = outcome
            result = VerifyResult(
                verdict=verdict,
                committed_length=committed_length,
                verify_ns=compute_ns,
                queue_ns=start_ns - pending.enqueued_ns,
            )
            k = self._rescue_k(pending, verdict)
            if k and self.rescues is not None:
                extended = self._extends(pending.session)
                result = self.rescues.after_verdict(pending, result, k, extended)
            pending.future.set_result(result)

    def _extends(self, session: OracleSession) -> bool:
        """A block waiting in the queue extends ``session``'s committed tokens as they are."""
        have = len(session.committed)
        return any(
            waiting.base_length == have and not self._known_stale(waiting)
            for waiting in self._queue.waiting(session)
        )

    def _rescue_k(self, pending: PendingBlock, verdict: Verdict | None) -> int:
        """Tokens of a rescue block after ``pending``'s verdict, should no block of the
        draft's extend it (0 = none): as long as the block just verified, within the
        turn's max_new_tokens and the context; none after an end-of-sequence token.
        """
        lease = pending.lease
        if verdict is None or not lease.rescue or verdict.next_token in self.model.eos_token_ids:
            return 0
        session = lease.session
        have = len(session.committed)
        remaining = session.params.max_new_tokens - (have - lease.opened_length)
        return max(0, min(len(pending.block), remaining - 1, self.max_context - have - 1))

    async def _let_batch_fill(self) -> None:
        """Before a batch: while fewer sessions have a block that could run than have a
        stream open outside the running batches, wait for theirs (at most
        ``batch_wait_s``), unless another lane is free too.

        Sessions answer a verdict at different times (network, drafting), so a batch
        started the moment a lane is free holds only the quickest; the others then
        wait a whole forward for the next one. A short wait fills the batch instead:
        one forward of B rows costs about one of a single row when the GPU is launch-bound.
        With another lane free, the latecomers will have that one: no wait.
        """
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        # A session whose waiting blocks are all stale (drafted for outcomes its verdict
        # did not have) has nothing to run: answer them first, then count it as not ready.
        while True:
            self._skip(self._queue.prune(self._known_stale))
            waiting = self._queue.sessions_waiting()
            could_wait = self.sessions.active_streams - self._lanes.sessions_in_batches
            if not 0 < waiting < min(self.max_batch, could_wait):
                return
            if self._lanes.free_count > 1:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _count(self, blocks: int, rows: int, forward_rows: int, compute_ns: int) -> None:
        counters = self.batch_counters
        counters.batches += 1
        counters.busy_ns += compute_ns
        counters.blocks += blocks
        counters.verified += rows
        if forward_rows > 1:
            counters.batched_forwards += 1
            counters.batched_rows += forward_rows
            counters.largest_forward = max(counters.largest_forward, forward_rows)
        recorder = metrics()
        if recorder is not None and rows:
            recorder.oracle_batch_size.record(rows)

    def _verify_batch(self, batch: list[PendingBlock]) -> tuple[list[Outcome], int, int, int, int]:
        """Model thread: check every block, verify the admitted ones together.

        -> (one outcome per block, start ns, compute ns, blocks verified, rows of the
        batched forward: 0 when they ran one by one).
        """
        start = time.perf_counter_ns()
        outcomes: list[Outcome] = []
        admitted: list[tuple[int, OracleSession, PendingBlock]] = []
        for pending in batch:
            try:
                session = self._admit(pending)
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
                    self.sessions.account(session)
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
                    self.sessions.record_prefill(0, timing.prefill_computed)
                self.sessions.touch(session)
                outcomes[index] = (verdict, len(session.committed))
                verified = True
            if verified:
                self._evict()
        return outcomes, start, time.perf_counter_ns() - start, len(admitted), forward_rows

    @staticmethod
    def _known_stale(pending: PendingBlock) -> bool:
        """A pipelined block whose assumption the session's committed tokens already refute.

        Read on the event loop between batches: a session's committed tokens change only
        in a batch (not running now) or when its stream opens (before any of its blocks).
        """
        committed = pending.session.committed
        return bool(pending.assumed) and not _ends_with(
            committed, pending.base_length, pending.assumed
        )

    def _skip(self, skipped: list[PendingBlock]) -> None:
        """Answer stale pipelined blocks without the model: nothing changes for them."""
        now = time.perf_counter_ns()
        for pending in skipped:
            self.batch_counters.blocks += 1
            result = VerifyResult(
                None, len(pending.session.committed), 0, now - pending.enqueued_ns
            )
            pending.future.set_result(result)

    def _admit(self, pending: PendingBlock) -> OracleSession | None:
        """The block's session if the block may be verified now; None: skip it; raises: refuse."""
        session = self.sessions.check(pending.lease)
        if pending.lease.refused:
            raise FailedPrecondition(
                "an earlier block of this verify stream was refused, and this one was sent "
                "before its answer; open a new stream"
            )
        have = len(session.committed)
        base_length, block, assumed = pending.base_length, pending.block, pending.assumed
        if assumed and not _ends_with(session.committed, base_length, assumed):
            return None
        if base_length != have:
            raise FailedPrecondition(
                f"block extends length {base_length} but session {session.session_id!r} has "
                f"{have} committed tokens: stale, duplicated or out of order"
            )
        k = len(block)
        # The round commits up to k + 1 tokens at positions have..have+k; all must fit.
        if have + k + 1 > self.max_context:
            raise InvalidArgument(
                f"a block of {k} tokens after {have} committed tokens runs past the oracle's "
                f"context of {self.max_context}; send at most "
                f"{max(0, self.max_context - have - 1)} tokens"
            )
        return session

    # -- session lifetime -------------------------------------------------------

    def close(self, lease: Lease) -> None:
        """The stream of ``lease`` ended; its cache stays for the session's next turn."""
        self.sessions.close(lease)
        if lease.session.active_streams == 0:
            lease.session.cache.unreserve()  # its turn's KV reservation ends
        if not self._closed:
            # Its session may now be evictable; evict in a lane, not waiting.
            self._lanes.executors[0].submit(self._evict)

    async def release(self, session_id: str) -> bool:
        """Free ``session_id``'s cache; False when this oracle held none."""
        session = self.sessions.get(session_id)
        released, _, _ = await self._lanes.run(lambda: self.sessions.release(session_id), session)
        if released:
            log.debug("session %s released", session_id)
        return released

    def _evict_until(self, done: Callable[[], bool]) -> None:
        """Evict idle sessions, least recently used first, until ``done()`` (model thread)."""
        evicted = self.sessions.evict(until=done)
        if evicted:
            log.debug("evicted %d idle session(s) for KV memory", len(evicted))

    def _evict(self) -> None:
        evicted = self.sessions.evict()
        if evicted:
            log.debug(
                "evicted %d idle session(s) (kv cache %d / %d bytes, %d cached)",
                len(evicted),
                self.sessions.kv_cache_bytes,
                self.sessions.budget_bytes,
                self.sessions.cached_sessions,
            )

    # -- reporting ------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            oracle_id=self.oracle_id,
            model=self.model.name,
            vocab_fingerprint=self.model.fingerprint,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            eos_token_ids=self.model.eos_token_ids,
            active_sessions=self.sessions.active_streams,
            cached_sessions=self.sessions.cached_sessions,
            kv_cache_bytes=self.sessions.kv_cache_bytes,
            kv_cache_budget_bytes=self.sessions.budget_bytes,
            device=str(self.model.device),
            batches=self.batch_counters.batches,
            verified_blocks=self.batch_counters.verified,
            verify_busy_ns=self.batch_counters.busy_ns,
            rescue_draft=self.rescues.drafter.name if self.rescues else "",
            rescue_blocks=self.rescues.blocks if self.rescues else 0,
        )

    def shutdown(self) -> None:
        """Stop the lanes (queued work is dropped; the running calls finish)."""
        self._closed = True
        self._lanes.shutdown()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            self._stop_batcher()
        else:
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                loop.call_soon_threadsafe(self._stop_batcher)

    def _stop_batcher(self) -> None:
        """Event loop: cancel the blocks still queued and the batcher."""
        for pending in self._queue.drain():
            pending.future.cancel()
        if self.rescues is not None:
            self.rescues.cancel()
        if self._batcher is not None:
            self._batcher.cancel()
        for task in self._running:
            task.cancel()


# A pipelined block assumes at most a few blocks' worth of tokens.
MAX_ASSUMED_TOKENS = 4 * (MAX_SPECULATIVE_TOKENS + 1)


def _check_assumed(assumed: Sequence[int], base_length: int, vocab_size: int) -> tuple[int, ...]:
    assumed = tuple(int(t) for t in assumed)
    if len(assumed) > MAX_ASSUMED_TOKENS:
        raise InvalidArgument(
            f"a block may assume at most {MAX_ASSUMED_TOKENS} tokens, got {len(assumed)}"
        )
    if len(assumed) > base_length:
        raise InvalidArgument(
            f"a block extending length {base_length} cannot assume {len(assumed)} tokens"
        )
    if assumed:
        validate_token_ids(assumed, vocab_size, "VerifyBlock.assumed_token_ids")
    return assumed


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _ends_with(committed: Sequence[int], length: int, tail: Sequence[int]) -> bool:
    """committed has exactly ``length`` tokens and its last ones are ``tail``."""
    return len(committed) == length and list(committed[length - len(tail) :]) == list(tail)
