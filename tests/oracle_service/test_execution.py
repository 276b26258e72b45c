"""A batch's run: admit each block, verify the admitted ones in one forward, commit, answer.

``oracle_service.execution.BatchRunner`` on real sessions of a tiny llama (caches
prefilled by the real oracle), its lane job called directly and through a real lane;
verdicts checked against HF greedy generate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import torch

from oracle_service.counters import BatchCounters
from oracle_service.execution import BatchRunner
from oracle_service.lanes import Lanes
from oracle_service.scheduler import BlockQueue, PendingBlock
from oracle_service.sessions import Lease, SessionStore
from specdec.core.errors import FailedPrecondition, InvalidArgument
from specdec.core.types import DraftBlock, Verdict, VerifyResult
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle

PROMPTS = {"a": [1, 5, 17, 33, 60, 8], "b": [1, 9, 9, 30], "c": [1, 40, 41], "d": [1, 70, 3]}


class Rig:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.oracle = Oracle(model)
        self.store = SessionStore(
            self.oracle.new_cache,
            budget_bytes=64 << 20,
            max_cached_sessions=16,
            max_active_streams=16,
        )
        self.lanes = Lanes(1, lambda lane: None, self.store, lambda: None)
        self.queue = BlockQueue(8)
        self.counters = BatchCounters()
        self.runner = BatchRunner(
            self.oracle, self.store, self.lanes, self.queue, self.counters, None
        )

    def opened(self, session_id: str, tokens: list[int]) -> Lease:
        lease = self.store.admit(session_id)
        self.oracle.prefill(lease.session.cache, tokens)
        lease.session.committed = list(tokens)
        return lease

    def next_tokens(self, tokens: list[int], n: int) -> list[int]:
        output = self.model.model.generate(
            torch.tensor([tokens]), max_new_tokens=n, do_sample=False, pad_token_id=2
        )
        return list(output[0, len(tokens) :].tolist())


@pytest.fixture
def rig(loaded: Callable[[str, str], LoadedModel]) -> Iterator[Rig]:
    made = Rig(loaded("llama", "oracle"))
    yield made
    made.lanes.shutdown()


def pending(
    lease: Lease, base_length: int, tokens: tuple[int, ...] = (), assumed: tuple[int, ...] = ()
) -> PendingBlock:
    future: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
    return PendingBlock(lease, base_length, DraftBlock(tokens), assumed, future, 0)


async def test_admitted_blocks_share_a_forward_and_refused_ones_change_nothing(rig: Rig) -> None:
    a, b, c, d = (rig.opened(name, tokens) for name, tokens in PROMPTS.items())
    ref_a, ref_d = rig.next_tokens(PROMPTS["a"], 3), rig.next_tokens(PROMPTS["d"], 1)
    wrong = (ref_a[0] + 1) % rig.model.vocab_size
    batch = [
        pending(a, 6, (ref_a[0], wrong)),  # one accepted, then corrected
        pending(b, 5),  # extends a length b does not have: refused
        pending(c, 3, (4,), assumed=(40, 42)),  # pipelined on a wrong guess: skipped
        pending(d, 3),
    ]
    run = rig.runner.verify(batch)
    assert run.outcomes[0] == (Verdict(1, ref_a[1], False), 8)
    assert isinstance(run.outcomes[1], FailedPrecondition)
    assert "stale, duplicated or out of order" in str(run.outcomes[1])
    assert run.outcomes[2] == (None, 3)
    assert run.outcomes[3] == (Verdict(0, ref_d[0], True), 4)
    assert (run.verified, run.forward_rows) == (2, 2)
    assert rig.store.get("a").committed == PROMPTS["a"] + ref_a[:2]  # type: ignore[union-attr]
    assert rig.store.get("b").committed == PROMPTS["b"]  # type: ignore[union-attr]
    assert rig.store.get("c").committed == PROMPTS["c"]  # type: ignore[union-attr]
    # b's stream was refused: its next block too, even one that would fit.
    assert b.refused
    (later,) = rig.runner.verify([pending(b, 4)]).outcomes
    assert isinstance(later, FailedPrecondition) and "open a new stream" in str(later)
    # a continues from its verdict: the commit kept the cache in step.
    (after,) = rig.runner.verify([pending(a, 8)]).outcomes
    assert after == (Verdict(0, ref_a[2], True), 9)


async def test_blocks_past_the_context_or_of_a_superseded_stream_are_refused(rig: Rig) -> None:
    near_full = [1] + [4] * (rig.model.max_context - 4)
    full = rig.opened("full", near_full)
    old = rig.opened("a", PROMPTS["a"])
    rig.store.admit("a")  # a newer stream of a: the old lease is stale
    long_block, stale_stream = rig.runner.verify(
        [pending(full, len(near_full), (4, 4, 4)), pending(old, 6)]
    ).outcomes
    assert isinstance(long_block, InvalidArgument) and "send at most 2 tokens" in str(long_block)
    assert isinstance(stale_stream, FailedPrecondition) and "reopened" in str(stale_stream)
    assert rig.store.get("full").committed == near_full  # type: ignore[union-attr]


async def test_a_run_in_its_lane_answers_every_block_and_counts_the_batch(rig: Rig) -> None:
    a, b = rig.opened("a", PROMPTS["a"]), rig.opened("b", PROMPTS["b"])
    waiting = pending(a, 7)  # a's next block, queued behind the batch
    rig.queue.put(waiting)
    batch = [pending(a, 6), pending(b, 9)]
    rig.lanes.take(0, [p.session for p in batch])
    await rig.runner.run(0, batch)
    verified = batch[0].future.result()
    assert verified.verdict is not None and verified.committed_length == 7
    assert verified.verify_ns > 0 and verified.queue_ns >= 0
    with pytest.raises(FailedPrecondition):
        batch[1].future.result()
    assert waiting.enqueued_ns > 0  # it could first run once a's block was verified
    counters = rig.counters
    assert (counters.batches, counters.blocks, counters.verified) == (1, 2, 1)
    assert counters.busy_ns > 0 and counters.batched_forwards == 0
    assert not a.session.busy and rig.lanes.free() == 0
