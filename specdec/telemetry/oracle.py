"""The oracle's spans and metrics: ``specdec.prefill`` per OpenVerify, ``specdec.verify`` per
block, each a child of the context its request message carries, with the KV cache's
events on them.

KV events: ``specdec.kv.prefill`` (cached / computed tokens), ``specdec.kv.re_prefill``
(the session had been evicted: its context is computed again), ``specdec.kv.rollback``
(the k - accepted rejected draft tokens dropped from the cache after a verdict),
``specdec.kv.eviction`` (idle sessions the store evicted since the stream's previous
span; evictions happen in the model thread, between requests of any session).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer

from specdec.core.types import OpenResult, VerifyResult
from specdec.telemetry import names
from specdec.telemetry.metrics import Metrics
from specdec.telemetry.setup import metrics, tracer


class StoreCounters(Protocol):
    evictions: int
    prefill_computed: int
    prefill_reused: int


class SessionStoreLike(Protocol):
    """What is read of ``oracle_service.sessions.SessionStore``."""

    @property
    def counters(self) -> StoreCounters: ...

    @property
    def active_streams(self) -> int: ...

    @property
    def cached_sessions(self) -> int: ...

    @property
    def kv_cache_bytes(self) -> int: ...

    budget_bytes: int


def observe_store(store: SessionStoreLike) -> None:
    """Report the store's sessions, KV memory, evictions and prefill totals at each scrape."""
    recorder = metrics()
    if recorder is None:
        return
    recorder.observe(
        active_sessions=lambda: store.active_streams,
        cached_sessions=lambda: store.cached_sessions,
        kv_cache_bytes=lambda: store.kv_cache_bytes,
        kv_cache_budget_bytes=lambda: store.budget_bytes,
        kv_evictions=lambda: store.counters.evictions,
    )
    recorder.observe_prefill(
        cached=lambda: store.counters.prefill_reused,
        computed=lambda: store.counters.prefill_computed,
    )


class VerifyObserver:
    """One Verify stream, created when its open request arrives: ``opened``, then
    ``verified`` per block (each span starts when its block arrived)."""

    def __init__(
        self,
        tracer: Tracer | None,
        recorder: Metrics | None,
        store: SessionStoreLike,
        session_id: str,
    ) -> None:
        self._tracer = tracer
        self._metrics = recorder
        self._store = store
        self._session_id = session_id
        self._start_ns = time.time_ns()  # the open request arrived
        self._evictions = store.counters.evictions  # as of the last span

    def _parent(self, carrier: Mapping[str, str]) -> Context | None:
        # No carried context: the current one (the Verify RPC's server span).
        return propagate.extract(dict(carrier)) if carrier else None

    def opened(self, carrier: Mapping[str, str], opened: OpenResult, reprefill: bool) -> None:
        if self._metrics is not None:
            self._metrics.oracle_prefill.record(opened.prefill_ns / 1e9)
        if self._tracer is None:
            return
        span = self._tracer.start_span(
            names.PREFILL_SPAN,
            context=self._parent(carrier),
            start_time=self._start_ns,
            attributes={
                names.SESSION_ID: self._session_id,
                names.CACHED_TOKENS: opened.cached_tokens,
                names.COMPUTED_TOKENS: opened.computed_tokens,
                names.PREFILL_NS: opened.prefill_ns,
            },
        )
        span.add_event(
            names.EVENT_PREFILL,
            {"cached_tokens": opened.cached_tokens, "computed_tokens": opened.computed_tokens},
        )
        if reprefill:
            span.add_event(names.EVENT_REPREFILL, {"tokens": opened.computed_tokens})
        self._eviction_event(span)
        span.end()

    def verified(
        self,
        carrier: Mapping[str, str],
        arrived_ns: int,  # time.time_ns() when the block arrived
        round_index: int,
        k: int,
        result: VerifyResult,
    ) -> None:
        verdict = result.verdict
        assert verdict is not None, "a skipped block is not a verification"
        rejected = k - verdict.num_accepted  # rolled back out of the cache
        if self._metrics is not None:
            self._metrics.oracle_verify.record(result.verify_ns / 1e9)
            self._metrics.oracle_queue.record(result.queue_ns / 1e9)
            if rejected:
                self._metrics.kv_rollback.add(rejected)
        if self._tracer is None:
            return
        span = self._tracer.start_span(
            names.VERIFY_SPAN,
            context=self._parent(carrier),
            start_time=arrived_ns,
            attributes={
                names.SESSION_ID: self._session_id,
                names.ROUND_INDEX: round_index,
                names.ROUND_K: k,
                names.ROUND_ACCEPTED: verdict.num_accepted,
                names.ROUND_EXTRA_TOKEN: names.BONUS if verdict.is_bonus else names.CORRECTION,
                names.ROUND_COMMITTED_LENGTH: result.committed_length,
                names.ROUND_VERIFY_NS: result.verify_ns,
                names.ROUND_QUEUE_NS: result.queue_ns,
            },
        )
        if rejected:
            span.add_event(names.EVENT_ROLLBACK, {"tokens": rejected})
        self._eviction_event(span)
        span.end()

    def _eviction_event(self, span: Span) -> None:
        """Sessions evicted since the stream's previous span."""
        evictions = self._store.counters.evictions
        evicted, self._evictions = evictions - self._evictions, evictions
        if evicted > 0:
            span.add_event(names.EVENT_EVICTION, {"sessions": evicted})


def verify_observer(store: SessionStoreLike, session_id: str) -> VerifyObserver | None:
    """Observer of one Verify stream, or None when tracing and metrics are off."""
    active, recorder = tracer(), metrics()
    if active is None and recorder is None:
        return None
    return VerifyObserver(active, recorder, store, session_id)
