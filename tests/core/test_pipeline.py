"""Pipelining (``specdec.core.pipeline``): blocks sent before the verdict they depend on
change nothing in the output.

The in-process tests put a round trip on the link to the oracle (each verify waits
for the previous one, as the oracle's stream does, and answers after ``rtt_s``),
so that a block drafted ahead is ready before the verdict and goes out pipelined.
``RoundTripLink`` and ``generate`` serve the tests of drafting ahead and branches too.
The oracle's side of the protocol (a pipelined block whose assumed tokens were not
committed is skipped, not refused) is tested in test_oracle_service.py. The queue's
rules are tested on plain data at the end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from specdec.core.pipeline import drop_stale, levels, pipeline_depth, tail
from specdec.core.round import Origin, Sent
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import StopChecker
from specdec.core.types import MAX_PIPELINE_DEPTH, DraftBlock, RoundReport, Turn, VerifyResult
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.ngram import NgramDrafter
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


# --------------------------------------------------------------------------- the queue's rules


class Skips:
    """A round observer that keeps the rounds it is told were skipped."""

    def __init__(self) -> None:
        self.skipped: list[int] = []

    def round_started(self, round_index: int, k: int, draft_ns: int) -> None:
        pass

    def round_finished(self, report: RoundReport) -> None:
        pass

    def round_skipped(self, round_index: int) -> None:
        self.skipped.append(round_index)


def sent(round_index: int, start: int, assumed: tuple[int, ...] = (), branch: bool = False) -> Sent:
    """A block of two tokens in flight after committed[:start] + assumed."""
    future: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
    origin = Origin(drafted_ahead=bool(assumed), pipelined=bool(assumed), branch=branch)
    return Sent(round_index, 2, DraftBlock((7, 8)), start, assumed, 0, 0, future, origin)


async def test_a_verdict_drops_the_blocks_it_refutes() -> None:
    committed = [1, 2, 3, 4]  # the verdict just committed 3, 4 after [1, 2]
    exact = sent(0, 4)  # sent after the verdict: extends the committed tokens as they are
    further = sent(1, 2, (3, 4, 5))  # assumes more, agreeing so far: waits for the next verdict
    refuted = sent(2, 2, (3, 9))  # assumed 9 where 4 was committed
    outrun = sent(3, 2, (3,))  # assumed the verdict stops after 3: it went on
    skips = Skips()
    kept, stale = drop_stale(deque([exact, further, refuted, outrun]), committed, skips)
    assert list(kept) == [exact, further] and stale == 2
    assert skips.skipped == [2, 3]
    # None of those left extends the committed tokens: they would wait for nothing.
    kept, stale = drop_stale(deque([further, refuted]), committed, skips)
    assert not kept and stale == 2


async def test_levels_count_the_alternatives_for_one_verdict_once() -> None:
    head = sent(0, 4)
    alternatives = [sent(1, 4, (7, 3), branch=True), sent(2, 4, (7, 8, 5), branch=True)]
    full = sent(3, 4, (7, 8, 9))  # the full acceptance goes last: drafted after it next
    assert levels(deque([head])) == 1 and tail(deque([head])) is head
    assert levels(deque([head, *alternatives, full])) == 2
    assert tail(deque([head, *alternatives, full])) is full
    # Only alternatives behind the head: the next blocks are drafted after the head.
    assert tail(deque([head, *alternatives])) is head


def test_pipeline_depth_needs_drafting_ahead_and_is_bounded() -> None:
    params = SamplingParams()
    turn = Turn([1], 1, params, 0, 4, StopChecker(params, (), None), 64, draft_ahead=True)
    assert [pipeline_depth(replace(turn, pipeline_depth=d)) for d in (0, 1, 3, 99)] == [
        1, 1, 3, MAX_PIPELINE_DEPTH
    ]  # fmt: skip
    assert pipeline_depth(replace(turn, pipeline_depth=3, draft_ahead=False)) == 1
