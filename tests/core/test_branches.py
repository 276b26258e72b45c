"""Branches, the loop's side (``specdec.core.branches``): blocks drafted ahead for the likely
corrections of a block in flight, not only for its full acceptance.

Through the whole loop over the round-trip link of ``test_pipeline``, then the rules
of ``Branches`` on plain data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from specdec.core.branches import Branches
from specdec.core.sampling import SamplingParams
from specdec.core.types import Branch, BranchTicket, DraftBlock
from specdec.drafters.model_drafter import ModelDrafter
from specdec.engine.oracle import Oracle
from specdec.generate import speculative_generate
from tests.core.test_pipeline import generate


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


# --------------------------------------------------------------------------- the rules

# Block (7, 8) is in flight after the committed [1, 2]. Drafted ahead for its outcomes:
FULL = Branch((7, 8, 9), DraftBlock((10, 11)))  # both accepted, 9 the guessed bonus
SECOND = Branch((7, 3), DraftBlock((12, 13)))  # 8 rejected, corrected to 3
FIRST = Branch((5,), DraftBlock((14,)))  # 7 rejected, corrected to 5
EMPTY = Branch((7, 6), DraftBlock(()))  # a branch the drafter had nothing for


async def drafted(
    branches: list[Branch], chosen: bool = True, prefix: tuple[int, ...] = ()
) -> Branches:
    """The drafting ahead after (7, 8) as the loop holds it, its blocks all drafted
    (``chosen``: its outcomes published on the ticket)."""
    loop = asyncio.get_running_loop()
    task: asyncio.Future[list[Branch]] = loop.create_future()
    task.set_result(branches)
    ticket, on_chosen = BranchTicket(), loop.create_future()
    if chosen:
        ticket.choose(tuple(branch.assumed for branch in branches))
        on_chosen.set_result(None)
    reach = 2 + len(prefix) + 2 + 1  # the committed tokens, (7, 8), one more
    return Branches(2, prefix, reach, task, ticket, on_chosen)


async def test_branches_go_on_the_wire_alternatives_first() -> None:
    ahead = await drafted([FULL, SECOND, FIRST, EMPTY])
    # No verdict yet: every branch with a block may apply; the full acceptance goes last,
    # so that the blocks drafted after it follow it.
    assert ahead.still_possible([1, 2]) == [
        (SECOND, True, 4, (7, 3)),
        (FIRST, True, 3, (5,)),
        (FULL, False, 5, (7, 8, 9)),
    ]
    # A committed 7 leaves those that assume it, and each assumes only what follows it.
    assert ahead.still_possible([1, 2, 7]) == [(SECOND, True, 4, (3,)), (FULL, False, 5, (8, 9))]


async def test_a_verdict_finds_the_branch_drafted_for_it() -> None:
    ahead = await drafted([FULL, SECOND, FIRST])
    # A correction guessed right: its block is the next one.
    committed = [1, 2, 7, 3]
    assert ahead.may_apply(committed)
    assert await ahead.block_for(committed) == (SECOND.block, True)
    assert ahead.missed(committed) == [(7, 8, 9), (5,)]
    # The full acceptance and its guessed bonus.
    assert await ahead.block_for([1, 2, 7, 8, 9]) == (FULL.block, False)
    # A miss: the bonus was not the guess. No branch applies; all were missed.
    committed = [1, 2, 7, 8, 4]
    assert not ahead.may_apply(committed) and await ahead.block_for(committed) is None
    assert len(ahead.missed(committed)) == 3
    # Part of a verdict known (a block before it in flight committed 7): still possible.
    assert ahead.may_apply([1, 2, 7]) and await ahead.block_for([1, 2, 7]) is None


async def test_before_the_branches_are_chosen_any_may_apply() -> None:
    ahead = await drafted([FULL, SECOND], chosen=False)
    assert ahead.may_apply([1, 2, 4])  # would be a miss, but nobody knows yet
    assert not ahead.may_apply([1, 2, 7, 8, 9, 1])  # past any outcome of (7, 8)
    assert ahead.missed([1, 2, 4]) == []
    # Drafted after a pipelined block that assumed (6,): a committed 5 there refutes all.
    ahead = await drafted([FULL], chosen=False, prefix=(6,))
    assert not ahead.may_apply([1, 2, 5])
    assert ahead.may_apply([1, 2, 6])


async def test_dropping_stops_the_drafting_at_its_next_step() -> None:
    ahead = await drafted([FULL], chosen=False)
    ahead.drop()
    assert ahead.ticket.cancelled
