"""The oracle engine: the object the servicer calls, wired from one module per job.

All torch work runs in the engine's lanes, one thread each, and the event loop
stays free for the gRPC streams. On the CPU there is one lane: two forwards would
only contend for the same cores. With CUDA graphs there are two by default, each
on its own CUDA stream (``specdec.engine.static_kv``): the demo oracle's forward is bound
by kernel latency, so a batch that would wait for the running one runs beside it.
A session is in one lane's job at a time (``oracle_service.lanes``).

A request goes through, in order:

* ``oracle_service.validation``: what needs no session state, checked before the queue
  (the engine's settings: ``oracle_service.config.check_settings``, at construction);
* ``oracle_service.lifetimes``: an open, a close, a release, evictions;
* ``oracle_service.scheduler``: the queue, and which blocks form the next batch and when;
* ``oracle_service.execution``: a batch in its lane (admit, verify together, commit),
  then its blocks answered;
* ``oracle_service.rescue``: after a verdict that no waiting block of its session
  extends, a block drafted by the oracle itself, for streams that allow it;
* ``oracle_service.counters``: the totals that GetInfo and the metrics report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import torch

from oracle_service.config import check_settings
from oracle_service.counters import BatchCounters, EngineInfo
from oracle_service.execution import BatchRunner
from oracle_service.kv_pool import make_pool, store_budget
from oracle_service.lanes import Lanes
from oracle_service.lifetimes import Lifetimes, evict_until
from oracle_service.rescue import rescues_for
from oracle_service.scheduler import BlockQueue, PendingBlock, Scheduler
from oracle_service.sessions import Lease, SessionStore
from oracle_service.validation import check_block, check_open
from specdec.core.errors import Unavailable
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock, OpenResult, VerifyResult
from specdec.engine.kv_options import KVSettings
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle
from specdec.engine.paged_kv import PagedPool

DEFAULT_MAX_BATCH = 16


class OracleEngine:
    """Sessions of one oracle model; async methods run the model in the engine's lanes."""

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
        prefill_threads: int = 1,
    ) -> None:
        """``max_batch``: the most blocks (of different sessions) verified in one forward.
        ``batch_wait_s``: the batch wait (``oracle_service.scheduler``).
        ``kv_budget_bytes`` (None = auto), ``static_kv``, ``cuda_graphs``, ``kv`` (the other
        KV settings): see ``oracle_service.kv_pool``.
        ``lanes``: batches verified at once (0 = auto: 2 with CUDA graphs for a launch-bound
        model, else 1).
        ``rescue_draft``: drafts the next block after a miss, for streams that allow
        it (``oracle_service.rescue``; it needs one lane).
        ``prefill_threads``: a CPU oracle's threads for a long prefill (``Oracle``).
        Raises ``InvalidArgument`` for a setting out of range (``config.check_settings``).
        """
        check_settings(
            max_sessions=max_sessions,
            max_cached_sessions=max_cached_sessions,
            kv_budget_bytes=kv_budget_bytes,
            max_batch=max_batch,
            batch_wait_s=batch_wait_s,
            lanes=lanes,
            rescue=rescue_draft is not None,
            kv=kv,
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
        self.oracle = Oracle(model, slots, lean=kv.lean_forward, prefill_threads=prefill_threads)
        self.oracle_id = oracle_id
        self.sessions = SessionStore(
            self.oracle.new_cache,
            budget_bytes=store_budget(slots, kv),
            max_cached_sessions=max_cached_sessions,
            max_active_streams=max_sessions,
        )
        if isinstance(slots, PagedPool):  # a cache short of blocks evicts idle sessions first
            sessions = self.sessions
            slots.reclaim = lambda blocks: evict_until(
                sessions, lambda: slots.available_blocks >= blocks
            )
        self.lanes = slots.lanes if slots is not None else max(1, lanes)
        self._lanes = Lanes(self.lanes, self._enter_lane, self.sessions, self._wake)
        self.max_batch = max_batch
        self.batch_counters = BatchCounters()
        # A batch is what one forward holds (a paged pool's token budget).
        queue = BlockQueue(max_batch)
        if isinstance(slots, PagedPool):
            queue.fits = slots.fits_one_forward
        self.rescues = rescues_for(rescue_draft, model, self._lanes.executors[0], queue, self._wake)
        self._lifetimes = Lifetimes(
            self.oracle, self.sessions, self._lanes, oracle_id, self.rescues is not None
        )
        self._runner = BatchRunner(
            self.oracle, self.sessions, self._lanes, queue, self.batch_counters, self.rescues
        )
        self._scheduler = Scheduler(
            queue,
            self._lanes,
            self.sessions,
            self.batch_counters,
            self._runner.run,
            batch_wait_s=batch_wait_s,
            rescues=self.rescues,
        )

    @property
    def queued_blocks(self) -> int:
        """Blocks waiting for a lane (the batches being verified not counted)."""
        return len(self._scheduler.queue)

    @property
    def batch_wait_s(self) -> float:
        return self._scheduler.batch_wait_s

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

    def _wake(self) -> None:
        """Wake the batcher (event loop): a lane, a session or a rescue may be free."""
        self._scheduler.wake()

    # -- the servicer's calls --------------------------------------------------

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
        ``allow_rescue``: the stream gets rescue blocks after a miss (when this oracle
        has a rescue draft; coupled ones when sampled).
        Raises ``InvalidArgument`` for a malformed request, ``ResourceExhausted`` at once
        when max_sessions streams are open.
        The lease must be given back with ``close`` when the stream ends.
        """
        checked = check_open(
            session_id,
            tokens,
            sampling,
            seed,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            model_name=self.model.name,
        )
        return await self._lifetimes.open(session_id, checked, sampling, seed, allow_rescue)

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
        checked = check_block(block, base_length, assumed, self.vocab_size)
        if self._lanes.closed:
            raise Unavailable("this oracle is shutting down; open the session on another oracle")
        pending = PendingBlock(
            lease,
            base_length,
            block,
            checked,
            asyncio.get_running_loop().create_future(),
            time.perf_counter_ns(),
            last_alternative,
        )
        self._scheduler.put(pending)
        return pending.future

    def blocks_ended(self, lease: Lease) -> None:
        """The stream of ``lease`` sends no more blocks: no rescue block for it any more
        (a chain of them would go on without the draft)."""
        lease.rescue = False
        self._wake()

    def close(self, lease: Lease) -> None:
        """The stream of ``lease`` ended; its cache stays for the session's next turn."""
        self._lifetimes.close(lease)

    async def release(self, session_id: str) -> bool:
        """Free ``session_id``'s cache; False when this oracle held none."""
        return await self._lifetimes.release(session_id)

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
        self._lanes.shutdown()
        self._scheduler.stop()
