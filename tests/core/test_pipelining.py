"""Pipelining: blocks sent before the verdict they depend on change nothing in the output.

The in-process tests put a round trip on the link to the oracle (each verify waits
for the previous one, as the oracle's stream does, and answers after ``rtt_s``),
so that a block drafted ahead is ready before the verdict and goes out pipelined.
The oracle's side of the protocol (a pipelined block whose assumed tokens were not
committed is skipped, not refused) is tested in test_oracle_service.py.
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
from specdec.core.types import Branch, BranchTicket, DraftBlock, RoundReport, Turn, VerifyResult
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.proposers import ThreadProposer
from specdec.engine.oracle import Oracle
from specdec.generate import LocalOracleLink, speculative_generate


class RoundTripLink(LocalOracleLink):
    """The in-process oracle behind a round trip: FIFO like a Verify stream, rtt_s late."""

    def __init__(self, oracle: Oracle, rtt_s: float) -> None:
        super().__init__(oracle)
        self.rtt_s = rtt_s
        self._previous: asyncio.Future[None] | None = None
        self.skipped = 0

    async def verify(
        self,
        round_index: int,
        base_length: int,
        block: DraftBlock,
        draft_ns: int,
        assumed: tuple[int, ...] = (),
        last_alternative: bool = False,
    ) -> VerifyResult:
        previous, done = self._previous, asyncio.get_running_loop().create_future()
        self._previous = done
        await asyncio.sleep(self.rtt_s / 2)  # on its way to the oracle
        if previous is not None:
            await previous  # the oracle answers a stream's blocks in order
        try:
            result = await super().verify(round_index, base_length, block, draft_ns, assumed)
        finally:
            done.set_result(None)
        self.skipped += result.verdict is None
        await asyncio.sleep(self.rtt_s / 2)  # and back
        return result


def generate(
    oracle: Oracle,
    drafter: Any,
    params: SamplingParams,
    k: int,
    depth: int,
    rtt_s: float,
    prompt: tuple[int, ...] = (1, 5, 9, 12, 7),
    **options: Any,
) -> tuple[Any, RoundTripLink]:
    link = RoundTripLink(oracle, rtt_s)
    result = speculative_generate(
        list(prompt), oracle, drafter, params, k,
        draft_ahead=True, pipeline_depth=depth, link=link, **options,
    )  # fmt: skip
    return result, link


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pipelined_greedy_output_is_the_oracles(arch: str, loaded: Callable[..., Any]) -> None:
    oracle = Oracle(loaded(arch, "oracle"))
    params = SamplingParams(max_new_tokens=64)
    alone = speculative_generate([1, 5, 9, 12, 7], oracle, None, params, 0)
    for k in (1, 3, 6):
        run, link = generate(oracle, ModelDrafter(loaded(arch, "close_draft")), params, k, 2, 0.01)
        assert run.tokens == alone.tokens, k
        stats = run.stats
        assert stats.pipelined_rounds > 0, k  # blocks really went out before their verdict
        assert stats.skipped_blocks == link.skipped  # the loop and the oracle agree
        assert stats.output_tokens == 64


def test_wrong_guesses_are_skipped_and_redrafted(loaded: Callable[..., Any]) -> None:
    # A far draft guesses wrong often: skipped blocks must happen, and cost nothing in output.
    oracle = Oracle(loaded("llama", "oracle"))
    params = SamplingParams(max_new_tokens=48)
    alone = speculative_generate([1, 5, 9, 12, 7], oracle, None, params, 0)
    run, link = generate(oracle, ModelDrafter(loaded("llama", "draft")), params, 2, 2, 0.01)
    assert run.tokens == alone.tokens
    assert run.stats.skipped_blocks > 0 and link.skipped == run.stats.skipped_blocks


@pytest.mark.parametrize("seed", [3, 11])
def test_pipelined_sampling_draws_the_same_tokens(seed: int, loaded: Callable[..., Any]) -> None:
    # Draws are per position, so pipelining (which regroups positions) changes no token.
    oracle = Oracle(loaded("qwen2", "oracle"))
    params = SamplingParams(max_new_tokens=48, temperature=1.0, top_k=20, seed=seed)
    runs = [
        generate(oracle, ModelDrafter(loaded("qwen2", "close_draft")), params, 3, depth, 0.01)[0]
        for depth in (1, 2)
    ]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].stats.pipelined_rounds == 0


def test_ngram_and_stop_conditions_with_pipelining(loaded: Callable[..., Any]) -> None:
    oracle = Oracle(loaded("llama", "oracle"))
    prompt = (1, 5, 9, 12, 7, 1, 5, 9)
    for params in (SamplingParams(max_new_tokens=7), SamplingParams(max_new_tokens=40)):
        alone = speculative_generate(list(prompt), oracle, None, params, 0)
        run, _ = generate(oracle, NgramDrafter(), params, 4, 2, 0.005, prompt)
        assert run.tokens == alone.tokens  # never past max_new_tokens
    # A stop token in the middle of a block ends the turn there, blocks in flight or not.
    params = SamplingParams(max_new_tokens=40)
    full = speculative_generate(list(prompt), oracle, None, params, 0).tokens
    eos = full[len(full) // 2]
    drafter = ModelDrafter(loaded("llama", "close_draft"))
    run, _ = generate(oracle, drafter, params, 4, 2, 0.005, prompt, eos_token_ids=[eos])
    assert run.tokens == full[: full.index(eos) + 1]
    assert run.finish_reason.name == "EOS"


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


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_blocks_drafted_for_corrections_change_no_token(
    depth: int, loaded: Callable[..., Any]
) -> None:
    # The close draft errs in about half its rounds: blocks drafted for its likely
    # corrections must get used (pipelined when depth > 1), the wrong ones skipped, and
    # the output stay the oracle's.
    oracle = Oracle(loaded("llama", "oracle"))
    params = SamplingParams(max_new_tokens=64)
    alone = speculative_generate([1, 5, 9, 12, 7], oracle, None, params, 0)
    drafter = ModelDrafter(loaded("llama", "close_draft"))
    run, link = generate(oracle, drafter, params, 4, depth, 0.01, branches=3)
    assert run.tokens == alone.tokens
    stats = run.stats
    assert stats.branch_rounds > 0  # some verdicts were corrections guessed ahead
    assert stats.skipped_blocks == link.skipped
    if depth > 1:
        assert stats.pipelined_rounds > 0 and stats.skipped_blocks > 0
    # Without branches no round is one, and fewer rounds find their block drafted ahead.
    drafter = ModelDrafter(loaded("llama", "close_draft"))
    plain, _ = generate(oracle, drafter, params, 4, depth, 0.01)
    assert plain.tokens == alone.tokens and plain.stats.branch_rounds == 0
    assert plain.stats.ahead_hits < stats.ahead_hits


def test_sampled_turns_draft_no_correction_branches(loaded: Callable[..., Any]) -> None:
    # A sampled correction is a draw from norm(max(0, p - q)), not the draft's runner-up:
    # branches are greedy only, and asking for them changes no sampled token.
    oracle = Oracle(loaded("qwen2", "oracle"))
    params = SamplingParams(max_new_tokens=32, temperature=1.0, seed=7)
    runs = [
        generate(oracle, ModelDrafter(loaded("qwen2", "close_draft")), params, 3, 2, 0.005,
                 branches=width)[0]
        for width in (0, 3)
    ]  # fmt: skip
    assert runs[0].tokens == runs[1].tokens
    assert runs[1].stats.branch_rounds == 0


def test_a_long_round_trip_with_branches_changes_no_token(loaded: Callable[..., Any]) -> None:
    # Blocks pipelined across a round trip longer than a verification: same output.
    oracle = Oracle(loaded("llama", "oracle"))
    params = SamplingParams(max_new_tokens=40)
    alone = speculative_generate([1, 5, 9, 12, 7], oracle, None, params, 0)
    run, link = generate(
        oracle, ModelDrafter(loaded("llama", "close_draft")), params, 4, 2, 0.06, branches=3
    )
    assert run.tokens == alone.tokens
    assert run.stats.skipped_blocks == link.skipped and run.stats.pipelined_rounds > 0


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
    tokens: list[int] = []
    rounds: list[RoundReport] = []

    async def on_commit(new: list[int], report: RoundReport) -> None:
        tokens.extend(new)
        rounds.append(report)

    ahead_s = 0.2
    with ThreadPoolExecutor(max_workers=1) as executor:
        proposer = SlowAhead(drafter, executor, ahead_s)
        asyncio.run(run_turn(RoundTripLink(oracle, 0.002), proposer, turn, on_commit))
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
