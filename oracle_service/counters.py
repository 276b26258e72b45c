"""The oracle engine's counters since start, its metrics, and what GetInfo reports of them."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.telemetry.setup import metrics


@dataclass
class BatchCounters:
    """Totals since start (the event loop updates them after each batch).

    batches: batches taken from the queue (one lane job each).
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

    def count_batch(self, blocks: int, verified: int, forward_rows: int, compute_ns: int) -> None:
        """A batch of ``blocks`` ran: ``verified`` of them reached the model, ``forward_rows``
        in one batched forward (0: one by one), in ``compute_ns`` of lane time."""
        self.batches += 1
        self.busy_ns += compute_ns
        self.blocks += blocks
        self.verified += verified
        if forward_rows > 1:
            self.batched_forwards += 1
            self.batched_rows += forward_rows
            self.largest_forward = max(self.largest_forward, forward_rows)
        recorder = metrics()
        if recorder is not None and verified:
            recorder.oracle_batch_size.record(verified)

    def count_skipped(self, blocks: int) -> None:
        """``blocks`` stale pipelined blocks were answered without the model."""
        self.blocks += blocks


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
