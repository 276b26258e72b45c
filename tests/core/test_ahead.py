"""Drafting during verification (``specdec.core.ahead``): the next block is drafted while
this one is verified, used only when its guess came true, and given up when it does not pay.

Over the round-trip link of ``test_pipeline`` where the block drafted ahead must be
ready before the verdict.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from specdec.core.loop import run_turn
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import StopChecker
from specdec.core.types import Branch, BranchTicket, DraftBlock, Turn
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.proposers import ThreadProposer
from specdec.engine.oracle import Oracle
from specdec.generate import speculative_generate
from tests.core.test_pipeline import RoundTripLink, generate
from tests.core.test_round import run_with


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_drafting_during_verification_changes_nothing(
    arch: str, loaded: Callable[..., Any]
) -> None:
    # The block drafted ahead is used only when the whole previous block and the guessed
    # bonus were right; draws are per position, so even sampled output is identical.
    oracle = Oracle(loaded(arch, "oracle"))
    prompt = [1, 5, 9, 12, 7]
    for params in (
        SamplingParams(max_new_tokens=48),
        SamplingParams(max_new_tokens=48, temperature=1.0, top_k=20, seed=3),
    ):
        runs = [
            speculative_generate(
                prompt, oracle, ModelDrafter(loaded(arch, "close_draft")), params, 3,
                draft_ahead=ahead,
            )
            for ahead in (False, True)
        ]  # fmt: skip
        assert runs[0].tokens == runs[1].tokens
        assert runs[0].stats.ahead_hits == 0
        if params.greedy:
            # Sampled bonus tokens rarely match the draft's guess; greedy ones often do.
            assert runs[1].stats.ahead_hits > 0  # blocks drafted ahead were really used
            assert runs[1].tokens == speculative_generate(prompt, oracle, None, params, 0).tokens


class CountingDrafter:
    """A real drafter, counting the tokens it is asked for."""

    def __init__(self, drafter: Any) -> None:
        self.drafter, self.asked = drafter, 0

    def propose(self, context: list[int], k: int, params: SamplingParams) -> DraftBlock:
        self.asked += k
        block: DraftBlock = self.drafter.propose(context, k, params)
        return block

    def update(self, num_accepted: int) -> None:
        self.drafter.update(num_accepted)


def test_drafting_ahead_backs_off_while_its_guesses_fail(loaded: Callable[..., Any]) -> None:
    # Sampled with a far draft, the guessed bonus is almost never drawn: drafting ahead
    # would double the drafting for nothing, so the loop mostly stops doing it. Greedy
    # with a close draft the guesses come true and it keeps drafting ahead every round.
    oracle = Oracle(loaded("llama", "oracle"))
    sampled = SamplingParams(max_new_tokens=64, temperature=1.0, seed=5)
    far = CountingDrafter(ModelDrafter(loaded("llama", "draft")))
    run, _ = generate(oracle, far, sampled, 3, 2, 0.002)
    alone = speculative_generate([1, 5, 9, 12, 7], oracle, None, sampled, 0)
    assert len(run.tokens) == len(alone.tokens) == 64
    # Every round drafts its own 3 tokens (or takes them from ahead); ahead proposals (4
    # tokens each) come on top: at most the first few rounds and one probe in 4 round
    # indices (blocks sent ahead and skipped have indices too).
    ahead_tokens = far.asked - 3 * run.stats.rounds
    indices = run.stats.rounds + run.stats.skipped_blocks
    assert ahead_tokens <= 4 * (6 + indices // 4), (far.asked, run.stats.rounds, indices)

    greedy = SamplingParams(max_new_tokens=64)
    close = CountingDrafter(ModelDrafter(loaded("llama", "close_draft")))
    run, _ = generate(oracle, close, greedy, 3, 2, 0.002)
    assert run.stats.ahead_hits > run.stats.rounds // 3


class SlowAhead(ThreadProposer):
    """The real drafter in its own thread, drafting ahead as slowly as a loaded edge CPU:
    its branches are chosen (and shown on the ticket) as the real drafter chooses them,
    but their blocks come ``ahead_s`` later, unless the ticket is cancelled first."""

    def __init__(self, drafter: ModelDrafter, executor: ThreadPoolExecutor, ahead_s: float):
        super().__init__(drafter, executor)
        self.ahead_s = ahead_s
        self.cancelled = self.finished = 0

    async def branch(
        self,
        context: list[int],
        block: DraftBlock,
        k: int,
        params: SamplingParams,
        width: int,
        ticket: BranchTicket | None = None,
    ) -> list[Branch]:
        branches = await super().branch(context, block, k, params, width, ticket)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ahead_s
        while loop.time() < deadline:
            if ticket is not None and ticket.cancelled:
                self.cancelled += 1
                return []
            await asyncio.sleep(0.001)
        self.finished += 1
        return branches


def test_a_miss_stops_the_drafting_ahead_instead_of_waiting_for_it(
    loaded: Callable[..., Any],
) -> None:
    # Every verdict comes back while the blocks drafted ahead for it are still being
    # drafted. When none of their outcomes is the verdict, the loop must stop that
    # drafting and draft the next block at once, not wait for blocks it cannot use.
    oracle = Oracle(loaded("llama", "oracle"))
    params = SamplingParams(max_new_tokens=40)
    prompt = [1, 5, 9, 12, 7]
    alone = speculative_generate(prompt, oracle, None, params, 0)
    drafter = ModelDrafter(loaded("llama", "close_draft"))
    drafter.reset(0)
    turn = Turn(
        context=prompt, prompt_tokens=len(prompt), params=params, seed=0, k=4,
        stop=StopChecker(params, (), None), max_context=oracle.max_context,
        draft_ahead=True, branches=3,
    )  # fmt: skip
    ahead_s = 0.2
    with ThreadPoolExecutor(max_workers=1) as executor:
        proposer = SlowAhead(drafter, executor, ahead_s)
        tokens, _, _, rounds = run_with(run_turn, RoundTripLink(oracle, 0.002), proposer, turn)
    assert tokens == alone.tokens
    assert proposer.cancelled > 0 and proposer.finished > 0  # misses, and hits waited for
    fresh = [r for r in rounds[1:] if r.block_origin == "fresh"]
    assert len(fresh) >= proposer.cancelled
    assert max(r.draft_ns for r in fresh) < ahead_s / 2 * 1e9


def test_drafting_ahead_dropped_while_it_waits_for_the_thread_is_not_drafted(
    loaded: Callable[..., Any],
) -> None:
    # One model thread serves every session of a draft service: drafting ahead may
    # still be queued when its verdict proves it useless. It must then not run a
    # forward, nor move the drafter's cache off the block it holds.
    drafter = ModelDrafter(loaded("llama", "close_draft"))
    params = SamplingParams(max_new_tokens=8)
    gate = threading.Event()

    async def main(executor: ThreadPoolExecutor) -> list[Branch]:
        proposer = ThreadProposer(drafter, executor)
        block = await proposer.propose([1, 5, 9], 3, params)
        cached = list(drafter.cache.tokens)
        loop = asyncio.get_running_loop()
        busy = loop.run_in_executor(executor, gate.wait, 10)  # another session's job
        ticket = BranchTicket()
        queued = asyncio.ensure_future(proposer.branch([1, 5, 7], block, 3, params, 3, ticket))
        await asyncio.sleep(0.05)
        ticket.cancelled = True  # the verdict came: a miss
        gate.set()
        await busy
        branches = await queued
        assert drafter.cache.tokens == cached
        return branches

    with ThreadPoolExecutor(max_workers=1) as executor:
        try:
            assert asyncio.run(main(executor)) == []
        finally:
            gate.set()
