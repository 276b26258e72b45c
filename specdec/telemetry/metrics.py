"""The OpenTelemetry instruments of every service, exported for Prometheus to scrape.

Names as Prometheus shows them (counters get ``_total``). The gateway sees every
round of every request, so request and round metrics are recorded there, once:

    specdec_draft_tokens_total, specdec_accepted_tokens_total   acceptance rate =
        rate(accepted) / rate(draft)  (vLLM's spec_decode num_draft/num_accepted_tokens)
    specdec_rounds_total                                        verification rounds
    specdec_accepted_tokens_per_position_total{position}        acceptance by block position
    specdec_draft_tokens_per_position_total{position}           its denominator
    specdec_accepted_length                                     histogram, per round
    specdec_output_tokens_total, specdec_prompt_tokens_total    tokens/s = rate(...)
    specdec_time_to_first_token_seconds, specdec_inter_token_latency_seconds,
    specdec_request_duration_seconds                            histograms
    specdec_round_trip_seconds (verify + queue + network), specdec_round_{draft,verify,
        network,queue}_seconds                                  histograms, per round
    specdec_requests_total{finish_reason}, specdec_failovers_total
    specdec_active_sessions                                     turns generating now

Labelled with ``drafter`` (model | ngram | none) where it separates populations.
The oracle adds its own view (specdec_oracle_{prefill,verify,queue}_seconds,
specdec_kv_rollback_tokens_total, specdec_oracle_batch_size: blocks verified in one
batch) and, observed at scrape time,
specdec_active_sessions (open verify streams), specdec_cached_sessions,
specdec_kv_cache_bytes, specdec_kv_cache_budget_bytes, specdec_kv_evictions_total,
specdec_prefill_tokens_total{source=cached|computed}. The draft adds
specdec_draft_propose_seconds and observes specdec_active_sessions (assignments
running) and specdec_kv_cache_bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

# Seconds: 0.5 ms .. 60 s, roughly x2.5 per bucket.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
# Accepted draft tokens in one round: 0 .. MAX_SPECULATIVE_TOKENS (32).
LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
# Blocks verified in one batch of the oracle (1 = alone).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

Gauge = Callable[[], float]

# Observed values (gauges and cumulative counters) a service can hand in.
OBSERVED = {
    # name: (kind, unit, description)
    "active_sessions": ("gauge", "{session}", "sessions being generated for right now"),
    "cached_sessions": ("gauge", "{session}", "sessions whose KV cache is kept"),
    "kv_cache_bytes": ("gauge", "By", "KV cache memory in use"),
    "kv_cache_budget_bytes": ("gauge", "By", "KV cache memory kept before LRU eviction"),
    "kv_evictions": ("counter", "{session}", "idle sessions evicted from the KV cache"),
}


class Metrics:
    """All instruments of one process; a service records only its own."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        counter, histogram = meter.create_counter, meter.create_histogram
        # -- gateway: requests and rounds --
        self.requests = counter("specdec_requests", "{request}", "Generate requests finished")
        self.failovers = counter("specdec_failovers", "{failover}", "turns moved to another worker")
        self.rounds = counter(
            "specdec_rounds",
            "{round}",
            "verification rounds, by how their block was drafted (label block: alone (nothing "
            "drafted: k = 0), fresh, ahead, piped, branch, branch+piped, rescue)",
        )
        self.draft_tokens = counter("specdec_draft_tokens", "{token}", "draft tokens verified")
        self.accepted_tokens = counter(
            "specdec_accepted_tokens", "{token}", "draft tokens the oracle accepted"
        )
        self.accepted_per_position = counter(
            "specdec_accepted_tokens_per_position",
            "{token}",
            "accepted draft tokens by their position in the block (0 = first)",
        )
        self.drafted_per_position = counter(
            "specdec_draft_tokens_per_position",
            "{token}",
            "draft tokens by their position in the block (0 = first)",
        )
        self.accepted_length = histogram(
            "specdec_accepted_length",
            "{token}",
            "draft tokens accepted per round",
            explicit_bucket_boundaries_advisory=LENGTH_BUCKETS,
        )
        self.output_tokens = counter("specdec_output_tokens", "{token}", "tokens generated")
        self.prompt_tokens = counter("specdec_prompt_tokens", "{token}", "prompt tokens received")
        self.ttft = self._seconds("specdec_time_to_first_token_seconds", "request to first token")
        self.itl = self._seconds(
            "specdec_inter_token_latency_seconds", "a round's gap since the previous / its tokens"
        )
        self.request_duration = self._seconds(
            "specdec_request_duration_seconds", "request to last token"
        )
        self.round_trip = self._seconds(
            "specdec_round_trip_seconds", "block sent to verdict received (verify+queue+network)"
        )
        self.round_draft = self._seconds("specdec_round_draft_seconds", "draft compute per round")
        self.round_verify = self._seconds("specdec_round_verify_seconds", "verify compute, a round")
        self.round_network = self._seconds(
            "specdec_round_network_seconds", "round trip minus verify and queueing"
        )
        self.round_queue = self._seconds(
            "specdec_round_queue_seconds", "time a block waited for the oracle's model"
        )
        # -- oracle --
        self.oracle_prefill = self._seconds("specdec_oracle_prefill_seconds", "OpenVerify prefill")
        self.oracle_verify = self._seconds("specdec_oracle_verify_seconds", "block verification")
        self.oracle_queue = self._seconds(
            "specdec_oracle_queue_seconds", "a request's wait for the model thread"
        )
        self.kv_rollback = counter(
            "specdec_kv_rollback_tokens", "{token}", "rejected draft tokens rolled back"
        )
        self.oracle_batch_size = histogram(
            "specdec_oracle_batch_size",
            "{block}",
            "blocks of different sessions verified together (one forward when batched)",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        # -- draft --
        self.draft_propose = self._seconds("specdec_draft_propose_seconds", "one block's drafting")
        self._observed: dict[str, Gauge] = {}
        self._prefill: dict[str, Gauge] = {}
        self._registered: set[str] = set()
        self._active: Any = None

    def _seconds(self, name: str, description: str) -> Any:
        return self.meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=LATENCY_BUCKETS
        )

    def observe(self, **values: Gauge) -> None:
        """Report ``values`` (names of ``OBSERVED``) at every scrape; a later call replaces."""
        for name, read in values.items():
            if name not in OBSERVED:
                raise ValueError(f"unknown observed metric {name!r}; one of {sorted(OBSERVED)}")
            self._observed[name] = read
            if name in self._registered:
                continue
            self._registered.add(name)
            kind, unit, description = OBSERVED[name]
            create = (
                self.meter.create_observable_gauge
                if kind == "gauge"
                else self.meter.create_observable_counter
            )
            create(f"specdec_{name}", [self._callback(name)], unit, description)

    @property
    def active(self) -> Any:
        """The gateway's count of turns in flight (created on first use: the oracle and the
        draft observe a gauge of the same name instead)."""
        if self._active is None:
            self._active = self.meter.create_up_down_counter(
                "specdec_active_sessions", "{session}", OBSERVED["active_sessions"][2]
            )
        return self._active

    def observe_prefill(self, cached: Gauge, computed: Gauge) -> None:
        """Cumulative prefill tokens found cached and computed (oracle)."""
        self._prefill = {"cached": cached, "computed": computed}
        if "prefill_tokens" in self._registered:
            return
        self._registered.add("prefill_tokens")

        def read(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(int(f()), {"source": s}) for s, f in self._prefill.items()]

        self.meter.create_observable_counter(
            "specdec_prefill_tokens", [read], "{token}", "prompt tokens at prefill, by source"
        )

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def read(options: CallbackOptions) -> Iterable[Observation]:
            try:  # runs in the scrape's thread, racing the event loop: skip a torn read
                return [Observation(float(self._observed[name]()))]
            except (RuntimeError, ValueError):
                return []

        return read
