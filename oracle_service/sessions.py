"""The oracle's session store: one KV cache per session, kept between turns under a budget.

A session's cache is soft state. Every OpenVerify carries all the committed
tokens, so a session whose cache was evicted costs one re-prefill and nothing
else; the cache only saves compute. The store therefore keeps caches of idle
sessions (no open verify stream) while they fit, and drops the least recently
used ones when the summed ``SequenceCache.memory_bytes`` exceeds the budget or
there are more than ``max_cached_sessions`` of them. Sessions with an open
stream are never evicted (their stream is using the cache).

Threads: admission and stream closing run on the event loop; everything that
touches a cache's tensors (prefill, verify, accounting, eviction, release)
runs in the engine's model threads (its lanes), one job per session at a time.
A lock guards the bookkeeping that they all share (the table, the counts).

Epochs: every OpenVerify of a session starts a new epoch, and a stream holds a
``Lease`` on the epoch it opened. Blocks of an older stream (a draft that
failed over while its old stream lingers) are refused instead of interleaving
with the new stream's blocks.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from specdec.core.errors import FailedPrecondition, ResourceExhausted
from specdec.core.sampling import SamplingParams
from specdec.drafters import Drafter
from specdec.engine.kv_cache import SequenceCache

EVICTED_IDS_KEPT = 4096


@dataclass(eq=False)
class OracleSession:
    """What the oracle keeps of one session.

    committed: the session's committed tokens; the cache holds the KV of committed[:-1].
    params, seed: the sampling used to verify this turn's blocks (from its OpenVerify).
    epoch: bumped by every OpenVerify, and when the session is evicted or released.
    kv_bytes: ``cache.memory_bytes()`` when last accounted.
    busy: the engine's jobs on this session running in a lane now (set on the event
    loop); while busy, its blocks wait and it is not evicted.
    return_ns: how long its next block takes to come after a verdict, a running mean
    (``oracle_service.scheduler``'s batch wait).
    """

    session_id: str
    cache: SequenceCache
    committed: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    epoch: int = 0
    active_streams: int = 0
    last_used: float = field(default_factory=time.monotonic)
    kv_bytes: int = 0
    busy: int = 0
    return_ns: float = 0.0


@dataclass(eq=False)
class Lease:
    """One verify stream's hold on a session, valid while the session is still at ``epoch``."""

    session: OracleSession
    epoch: int
    reprefill: bool = False  # the session's cache had been evicted: its context is recomputed
    refused: bool = False  # a block of this stream was refused: the later ones are too
    # Rescue (oracle_service.rescue): whether this stream's misses get a block drafted
    # by the oracle, the committed length at its open (its turn's output starts there) and
    # the stream's own drafter (made at the first miss, gone with the stream).
    rescue: bool = False
    opened_length: int = 0
    drafter: Drafter | None = None
    # How late this stream's blocks come after the verdict they extend (a running mean,
    # ns; it sets how long a rescue decision may wait for the draft's block),
    # and the committed length -> verdict time of its last rescues.
    late_ns: float = 5_000_000.0
    missed: dict[int, int] = field(default_factory=dict)
    # (start, assumed tokens) of the last blocks it flagged as the last for a verdict.
    bursts: deque[tuple[int, tuple[int, ...]]] = field(default_factory=lambda: deque(maxlen=4))


@dataclass
class StoreCounters:
    """Totals since start: evicted sessions, and prefill tokens computed vs found cached."""

    evictions: int = 0
    prefill_computed: int = 0
    prefill_reused: int = 0


class SessionStore:
    """Sessions by id, in least-recently-used order, with their caches' memory accounted."""

    def __init__(
        self,
        new_cache: Callable[[], SequenceCache],
        *,
        budget_bytes: int,
        max_cached_sessions: int,
        max_active_streams: int,
    ) -> None:
        self._new_cache = new_cache
        self.budget_bytes = budget_bytes
        self.max_cached_sessions = max_cached_sessions
        self.max_active_streams = max_active_streams
        self.counters = StoreCounters()
        self._lock = threading.Lock()
        # Oldest use first: eviction scans from the front.
        self._sessions: OrderedDict[str, OracleSession] = OrderedDict()
        self._active_streams = 0
        self._kv_bytes = 0
        # Ids of recently evicted sessions (bounded), to tell a re-prefill from a first one.
        self._evicted: OrderedDict[str, None] = OrderedDict()

    # -- event loop side ----------------------------------------------------

    def admit(self, session_id: str) -> Lease:
        """Open a stream on ``session_id`` (created if unknown), superseding older streams.

        Raises ``ResourceExhausted`` when ``max_active_streams`` streams are open already.
        """
        with self._lock:
            if self._active_streams >= self.max_active_streams:
                raise ResourceExhausted(
                    f"this oracle already serves {self._active_streams} verify streams "
                    f"(its --max-sessions is {self.max_active_streams}); retry later, use "
                    "another oracle, or start this one with a larger --max-sessions"
                )
            session = self._sessions.get(session_id)
            reprefill = False
            if session is None:
                session = OracleSession(session_id, self._new_cache())
                self._sessions[session_id] = session
                reprefill = session_id in self._evicted
                self._evicted.pop(session_id, None)
            self._sessions.move_to_end(session_id)
            session.epoch += 1
            session.active_streams += 1
            session.last_used = time.monotonic()
            self._active_streams += 1
            return Lease(session, session.epoch, reprefill)

    def close(self, lease: Lease) -> None:
        """The stream of ``lease`` ended: its session stays cached, now evictable."""
        with self._lock:
            lease.session.active_streams -= 1
            lease.session.last_used = time.monotonic()
            self._active_streams -= 1
            assert lease.session.active_streams >= 0 and self._active_streams >= 0

    def hold(self, session: OracleSession, count: int = 1) -> None:
        """A job on ``session`` goes to a lane (``count`` = -1: it ended). Under the lock,
        so that an eviction either sees it or bumped the epoch that the job then checks."""
        with self._lock:
            session.busy += count
            assert session.busy >= 0

    # -- model thread side ----------------------------------------------------

    def check(self, lease: Lease) -> OracleSession:
        """The leased session, or ``FailedPrecondition`` when a newer stream took it over."""
        session = lease.session
        if session.epoch != lease.epoch:
            raise FailedPrecondition(
                f"session {session.session_id!r} was reopened by a newer verify stream, "
                "released or evicted; this stream is stale: open a new one"
            )
        return session

    def touch(self, session: OracleSession) -> None:
        with self._lock:
            if self._sessions.get(session.session_id) is session:
                self._sessions.move_to_end(session.session_id)
            session.last_used = time.monotonic()

    def record_prefill(self, reused: int, computed: int) -> None:
        with self._lock:
            self.counters.prefill_reused += reused
            self.counters.prefill_computed += computed

    def account(self, session: OracleSession) -> None:
        """Re-measure ``session``'s cache after it changed (model thread)."""
        measured = session.cache.memory_bytes()
        with self._lock:
            if self._sessions.get(session.session_id) is session:
                self._kv_bytes += measured - session.kv_bytes
            session.kv_bytes = measured

    def evict(self, until: Callable[[], bool] | None = None) -> list[str]:
        """Drop idle sessions, least recently used first, until both limits hold (model thread)
        and ``until()`` is true (when given: the KV pool has the blocks a stream needs).

        Returns the evicted ids. Sessions with an open stream, or a job in another lane,
        are skipped: when
        they alone exceed the budget, the budget is exceeded until they close.
        """
        evicted: list[OracleSession] = []
        with self._lock:
            for session_id in list(self._sessions):
                if (
                    self._kv_bytes <= self.budget_bytes
                    and len(self._sessions) <= self.max_cached_sessions
                    and (until is None or until())
                ):
                    break
                session = self._sessions[session_id]
                if session.active_streams or session.busy:
                    continue
                self._drop_locked(session)
                self.counters.evictions += 1
                evicted.append(session)
                self._evicted[session_id] = None
                while len(self._evicted) > EVICTED_IDS_KEPT:
                    self._evicted.popitem(last=False)
                if until is not None:
                    session.cache.release()  # ``until`` sees its blocks free at once
        for session in evicted:
            session.cache.release()  # frees its tensors (or KV slot) now, not at the next GC
        return [s.session_id for s in evicted]

    def release(self, session_id: str) -> bool:
        """Forget ``session_id`` and free its cache (model thread); False if it was unknown.

        An open stream on it is made stale: its next block is refused.
        """
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            self._drop_locked(session)
        session.cache.release()
        return True

    def _drop_locked(self, session: OracleSession) -> None:
        del self._sessions[session.session_id]
        self._kv_bytes -= session.kv_bytes
        session.kv_bytes = 0
        session.epoch += 1

    # -- read-only views ------------------------------------------------------

    def get(self, session_id: str) -> OracleSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def session_ids(self) -> list[str]:
        """Every session with a cache here."""
        with self._lock:
            return list(self._sessions)

    @property
    def active_streams(self) -> int:
        """Verify streams open now (what ``max_active_streams`` bounds)."""
        return self._active_streams

    @property
    def cached_sessions(self) -> int:
        return len(self._sessions)

    @property
    def kv_cache_bytes(self) -> int:
        return self._kv_bytes
