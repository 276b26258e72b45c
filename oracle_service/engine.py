"""The oracle engine: validates requests and runs every forward pass in one model thread.

One model must not run two forward passes at once (they would contend for the
same device and, on CPU, the same cores, and later work batches verification
across sessions), so all torch work goes through a single-worker thread pool
and the event loop stays free for the gRPC streams. Each call is timed twice:

    queue_ns   = start in the model thread - submission   (waiting behind other sessions)
    compute_ns = end - start                              (prefill or verify itself)

Requests are checked before they reach the queue where that needs no session
state (ids in vocabulary, block well formed, context room); the committed
length a block extends is checked in the model thread, where the session's
state is serialised with every other change to it. A refused block changes
nothing: the session's committed tokens and cache stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from oracle_service.sessions import Lease, SessionStore
from specdec.errors import FailedPrecondition, InvalidArgument
from specdec.models import LoadedModel
from specdec.oracle import Oracle, PrefillResult
from specdec.sampling import SamplingParams, validate_token_ids
from specdec.turn import OpenResult, VerifyResult
from specdec.verifier import DraftBlock, Verdict, committed_tokens, validate_block

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_SEED = (1 << 64) - 1


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


class OracleEngine:
    """Sessions of one oracle model; async methods run the model in the engine's thread."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        oracle_id: str,
        kv_budget_bytes: int,
        max_sessions: int,
        max_cached_sessions: int,
    ) -> None:
        self.model = model
        self.oracle = Oracle(model)
        self.oracle_id = oracle_id
        self.sessions = SessionStore(
            self.oracle.new_cache,
            budget_bytes=kv_budget_bytes,
            max_cached_sessions=max_cached_sessions,
            max_active_streams=max_sessions,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oracle-model")
        self._closed = False

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_context(self) -> int:
        return self.model.max_context

    async def _run(self, fn: Callable[[], T]) -> tuple[T, int, int]:
        """fn() in the model thread -> (its result, queue_ns, compute_ns)."""
        submitted = time.perf_counter_ns()

        def timed() -> tuple[T, int, int]:
            start = time.perf_counter_ns()
            result = fn()
            return result, start - submitted, time.perf_counter_ns() - start

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, timed)

    # -- open ---------------------------------------------------------------

    async def open(
        self, session_id: str, tokens: Sequence[int], sampling: SamplingParams, seed: int
    ) -> tuple[Lease, OpenResult]:
        """Start a verify stream on ``session_id`` whose committed tokens are ``tokens``.

        Reuses the longest cached prefix and computes the rest: afterwards the
        cache holds tokens[:-1] (the last token is the first input of the next
        verify), so cached_tokens + computed_tokens = len(tokens) - 1.
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
        try:
            prefill, _, compute_ns = await self._run(
                lambda: self._open(lease, tokens, sampling, seed)
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

    async def verify(self, lease: Lease, base_length: int, block: DraftBlock) -> VerifyResult:
        """Verify ``block``, drafted after the first ``base_length`` committed tokens.

        Raises ``FailedPrecondition`` (and changes nothing) unless ``base_length``
        is the session's committed length: the block is stale, duplicated or out
        of order. ``InvalidArgument`` for a malformed block or one that would
        run past the context.
        """
        validate_block(block, self.vocab_size)
        verdict, queue_ns, compute_ns = await self._run(
            lambda: self._verify(lease, base_length, block)
        )
        committed_length = base_length + verdict.num_accepted + 1
        return VerifyResult(
            verdict=verdict,
            committed_length=committed_length,
            verify_ns=compute_ns,
            queue_ns=queue_ns,
        )

    def _verify(self, lease: Lease, base_length: int, block: DraftBlock) -> Verdict:
        session = self.sessions.check(lease)
        have = len(session.committed)
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
        try:
            verdict, timing = self.oracle.verify_timed(
                session.cache, session.committed, block, session.params, session.seed
            )
        finally:
            self.sessions.account(session)
        # The oracle's invariant: the cache now holds the new committed[:-1].
        session.committed.extend(committed_tokens(block, verdict))
        if timing.prefill_computed:
            self.sessions.record_prefill(0, timing.prefill_computed)
        self.sessions.touch(session)
        self._evict()
        return verdict

    # -- session lifetime -------------------------------------------------------

    def close(self, lease: Lease) -> None:
        """The stream of ``lease`` ended; its cache stays for the session's next turn."""
        self.sessions.close(lease)
        if not self._closed:
            # Its session may now be evictable; evict in the model thread, not waiting.
            self._executor.submit(self._evict)

    async def release(self, session_id: str) -> bool:
        """Free ``session_id``'s cache; False when this oracle held none."""
        released, _, _ = await self._run(lambda: self.sessions.release(session_id))
        if released:
            log.debug("session %s released", session_id)
        return released

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
        )

    def shutdown(self) -> None:
        """Stop the model thread (queued work is dropped; the running call finishes)."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
