"""The plain round alone (``run_plain_turn``): propose, verify, commit, report, no strategy.

In process, over ``LocalOracleLink``, with the tiny models of ``tests/conftest.py``:
greedy output is HF ``generate`` of the oracle alone, token for token, each round's
report is what the round's maths says, and the full loop (``run_turn``), with every
strategy on, gives the same tokens as the plain round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from specdec.core.loop import run_turn
from specdec.core.protocols import OracleLink, Proposer
from specdec.core.round import run_plain_turn
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason, StopChecker
from specdec.core.types import RoundReport, Turn, TurnStats
from specdec.drafters.proposers import InlineProposer
from specdec.engine.oracle import Oracle
from specdec.generate import LocalOracleLink
from tests.conftest import EOS_ID
from tests.core.test_greedy_equivalence import MAX_NEW, hf_greedy, make_drafter, make_prompt


def run(
    runner: Any,
    oracle: Oracle,
    drafter: Any,
    params: SamplingParams,
    k: int,
    prompt: Sequence[int],
    eos: Sequence[int] = (EOS_ID,),
    **options: Any,
) -> tuple[list[int], FinishReason, TurnStats, list[RoundReport]]:
    """One turn of ``runner`` (``run_plain_turn`` or ``run_turn``): tokens, why it
    ended, its stats and its rounds."""
    turn = Turn(
        context=list(prompt), prompt_tokens=len(prompt), params=params, seed=params.seed or 0,
        k=k, stop=StopChecker(params, eos, None), max_context=oracle.max_context, **options,
    )  # fmt: skip
    if hasattr(drafter, "reset"):
        drafter.reset(turn.seed)  # as speculative_generate does: the draft's draws too
    proposer = InlineProposer(drafter) if drafter is not None else None
    return run_with(runner, LocalOracleLink(oracle), proposer, turn)


def run_with(
    runner: Any, link: OracleLink, proposer: Proposer | None, turn: Turn
) -> tuple[list[int], FinishReason, TurnStats, list[RoundReport]]:
    """``run`` over any link and proposer."""
    tokens: list[int] = []
    rounds: list[RoundReport] = []

    async def on_commit(new: list[int], report: RoundReport) -> None:
        tokens.extend(new)
        rounds.append(report)

    reason, stats = asyncio.run(runner(link, proposer, turn, on_commit))
    return tokens, reason, stats, rounds


@pytest.mark.parametrize(
    ("role", "k"), [("none", 0), ("ngram", 4), ("close_draft", 1), ("close_draft", 4), ("draft", 3)]
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plain_round_is_the_oracle_alone(
    arch: str, role: str, k: int, loaded: Callable[..., Any]
) -> None:
    prompt = make_prompt(17)
    expected = hf_greedy(loaded(arch, "oracle"), prompt)
    oracle = Oracle(loaded(arch, "oracle"))
    params = SamplingParams(max_new_tokens=MAX_NEW)
    drafter = make_drafter(loaded, arch, role)
    tokens, reason, stats, rounds = run(run_plain_turn, oracle, drafter, params, k, prompt)
    assert tokens == expected
    assert reason == (FinishReason.EOS if expected[-1] == EOS_ID else FinishReason.LENGTH)
    # Each round commits its accepted tokens and one more (the recovered or bonus
    # token); a block is proposed fresh after the verdict before it, never ahead.
    length = len(prompt)
    for r in rounds:
        assert r.block_origin == "fresh" and r.skipped_blocks == 0
        assert r.accepted <= r.proposed <= r.k <= k
        assert r.is_bonus == (r.accepted == r.proposed)
        assert r.committed == r.accepted + 1 or r is rounds[-1]
        length += r.committed
        assert r.committed_length == length
    assert stats.rounds == len(rounds) and stats.output_tokens == len(tokens)
    assert stats.accepted == sum(r.accepted for r in rounds)
    assert stats.ahead_hits == stats.pipelined_rounds == stats.rescued_rounds == 0


def test_plain_round_cuts_the_block_where_the_oracle_alone_stops(
    loaded: Callable[..., Any],
) -> None:
    # A stop token inside an accepted block: the round keeps the tokens up to it.
    prompt = make_prompt(5)
    model = loaded("llama", "oracle")
    full = hf_greedy(model, prompt)
    eos = full[6]
    expected = hf_greedy(model, prompt, eos=(eos,))
    oracle, params = Oracle(model), SamplingParams(max_new_tokens=30)
    drafter = make_drafter(loaded, "llama", "close_draft")
    tokens, reason, _, rounds = run(run_plain_turn, oracle, drafter, params, 8, prompt, (eos,))
    assert tokens == expected and reason == FinishReason.EOS
    assert sum(r.committed for r in rounds) == len(tokens)
    # max_new_tokens: k shrinks so that no round drafts past it.
    params = SamplingParams(max_new_tokens=3)
    tokens, reason, _, rounds = run(run_plain_turn, oracle, drafter, params, 8, prompt)
    assert tokens == full[:3] and reason == FinishReason.LENGTH
    assert rounds[0].k == 2


def test_plain_round_stops_at_the_context_limit(loaded: Callable[..., Any]) -> None:
    model = loaded("llama", "oracle")
    prompt = make_prompt(model.max_context - 5)
    expected = hf_greedy(model, prompt, max_new_tokens=5, eos=(96 - 1,))
    drafter = make_drafter(loaded, "llama", "close_draft")
    params = SamplingParams(max_new_tokens=50)
    tokens, reason, _, _ = run(run_plain_turn, Oracle(model), drafter, params, 8, prompt, ())
    assert tokens == expected and reason == FinishReason.CONTEXT_LIMIT


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_strategies_change_no_token_of_the_plain_round(
    temperature: float, loaded: Callable[..., Any]
) -> None:
    # Drafting ahead, pipelining and branches regroup positions into rounds; draws are
    # per position, so even sampled tokens are the plain round's.
    oracle = Oracle(loaded("qwen2", "oracle"))
    params = SamplingParams(max_new_tokens=40, temperature=temperature, top_k=20, seed=9)
    prompt = [1, 5, 9, 12, 7]
    plain = run(run_plain_turn, oracle, make_drafter(loaded, "qwen2", "close_draft"), params, 3,
                prompt)  # fmt: skip
    full = run(
        run_turn, oracle, make_drafter(loaded, "qwen2", "close_draft"), params, 3, prompt,
        draft_ahead=True, pipeline_depth=2, branches=3,
    )  # fmt: skip
    assert plain[0] == full[0] and plain[1] == full[1]
    if temperature == 0.0:
        assert full[2].ahead_hits > 0  # the strategies really ran
