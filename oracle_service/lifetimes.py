"""Session lifetimes: a verify stream's open and close, a session's release and eviction.

An open takes a lease on the session (``SessionStore.admit``, refused at once when
max_sessions streams are open) and prefills its committed tokens in a lane, once no
other job of the session runs; a release frees the session's cache the same way.
Idle sessions are evicted in a lane, least recently used first, after anything
that may have pushed the store over its budget: an open, a batch that verified
something, a stream's close (``oracle_service.sessions``); and, on paged KV, when an
opening stream's reservation or a growing cache needs their blocks
(``oracle_service.kv_pool``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from oracle_service.kv_pool import reserve_turn
from oracle_service.lanes import Lanes
from oracle_service.sessions import Lease, SessionStore
from specdec.core.sampling import SamplingParams
from specdec.core.types import OpenResult
from specdec.engine.kv_options import turn_positions
from specdec.engine.oracle import Oracle, PrefillResult

log = logging.getLogger(__name__)


class Lifetimes:
    """Opens, closes and releases the sessions of ``sessions`` (event loop; the cache
    work in ``lanes``). ``rescue``: streams that allow it get rescue blocks."""

    def __init__(
        self, oracle: Oracle, sessions: SessionStore, lanes: Lanes, oracle_id: str, rescue: bool
    ) -> None:
        self.oracle = oracle
        self.sessions = sessions
        self.oracle_id = oracle_id
        self.rescue = rescue
        self._lanes = lanes

    async def open(
        self,
        session_id: str,
        tokens: list[int],
        sampling: SamplingParams,
        seed: int,
        allow_rescue: bool,
    ) -> tuple[Lease, OpenResult]:
        """Start a verify stream on ``session_id`` whose committed tokens are ``tokens``
        (checked already): see ``OracleEngine.open``."""
        lease = self.sessions.admit(session_id)
        lease.rescue = allow_rescue and self.rescue and sampling.greedy
        lease.opened_length = len(tokens)
        try:
            prefill, _, compute_ns = await self._lanes.run(
                lambda: self._prefill(lease, tokens, sampling, seed), lease.session
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

    def _prefill(
        self, lease: Lease, tokens: list[int], sampling: SamplingParams, seed: int
    ) -> PrefillResult:
        """Lane: the session's cache made to hold tokens[:-1], reusing its longest prefix."""
        session = self.sessions.check(lease)
        positions = turn_positions(len(tokens), sampling.max_new_tokens)
        reserve_turn(  # the admission rule (oracle_service.kv_pool), before any prefill
            lambda: session.cache.reserve(positions),
            lambda done: evict_until(self.sessions, done),
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
        evict_idle(self.sessions)
        return prefill

    def close(self, lease: Lease) -> None:
        """The stream of ``lease`` ended; its cache stays for the session's next turn."""
        self.sessions.close(lease)
        if lease.session.active_streams == 0:
            lease.session.cache.unreserve()  # its turn's KV reservation ends
        if not self._lanes.closed:
            # Its session may now be evictable; evict in a lane, not waiting.
            self._lanes.executors[0].submit(evict_idle, self.sessions)

    async def release(self, session_id: str) -> bool:
        """Free ``session_id``'s cache; False when this oracle held none."""
        session = self.sessions.get(session_id)
        released, _, _ = await self._lanes.run(lambda: self.sessions.release(session_id), session)
        if released:
            log.debug("session %s released", session_id)
        return released


def evict_until(sessions: SessionStore, done: Callable[[], bool]) -> None:
    """Lane: evict idle sessions, least recently used first, until ``done()`` (the KV pool
    has the blocks a stream needs)."""
    evicted = sessions.evict(until=done)
    if evicted:
        log.debug("evicted %d idle session(s) for KV memory", len(evicted))


def evict_idle(sessions: SessionStore) -> None:
    """Lane: evict idle sessions until the store is within its limits."""
    evicted = sessions.evict()
    if evicted:
        log.debug(
            "evicted %d idle session(s) (kv cache %d / %d bytes, %d cached)",
            len(evicted),
            sessions.kv_cache_bytes,
            sessions.budget_bytes,
            sessions.cached_sessions,
        )
