"""Drafters: n-gram prompt lookup on hand-built contexts, and the model drafter's blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import BranchTicket, RunnerUps
from specdec.core.verifier import validate_block
from specdec.drafters.branches import likeliest_corrections
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.engine.oracle import Oracle

GREEDY = SamplingParams()


def ngram(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    block = NgramDrafter(max_ngram, min_ngram).propose(context, k, GREEDY)
    assert block.q is None  # token-only
    return list(block.token_ids)


# --------------------------------------------------------------------------- n-gram


def test_ngram_no_match() -> None:
    # No token of the tail occurs earlier.
    assert ngram([1, 2, 3, 4], k=3) == []
    # Too short to have an earlier occurrence.
    assert ngram([1], k=3) == []
    assert ngram([], k=3) == []


def test_ngram_unigram_match() -> None:
    # Last token 2 occurred at index 1; what followed is [3, 4, 2].
    assert ngram([1, 2, 3, 4, 2], k=3) == [3, 4, 2]


def test_ngram_prefers_longest_ngram() -> None:
    # 1-gram [3] last seen at index 5 (followed by 9); the 2-gram [2, 3] at index 1-2
    # (followed by 4): the longer match wins.
    assert ngram([1, 2, 3, 4, 7, 3, 9, 2, 3], k=2, max_ngram=3) == [4, 7]
    # With max_ngram = 1 only the unigram is tried: most recent 3 is at index 5.
    assert ngram([1, 2, 3, 4, 7, 3, 9, 2, 3], k=2, max_ngram=1) == [9, 2]


def test_ngram_no_match_for_4gram_but_match_for_3gram() -> None:
    # 4-gram [9, 1, 2, 3] never occurred before; 3-gram [1, 2, 3] did, at index 0.
    assert ngram([1, 2, 3, 5, 6, 9, 1, 2, 3], k=2, max_ngram=4) == [5, 6]


def test_ngram_most_recent_occurrence_wins() -> None:
    # [5, 6] occurs at 0 (then 7) and 4 (then 8): the most recent is used.
    assert ngram([5, 6, 7, 9, 5, 6, 8, 5, 6], k=2) == [8, 5]


def test_ngram_truncated_at_context_end() -> None:
    # The docstring example: the continuation runs into the end of the context.
    assert ngram([1, 2, 3, 4, 2, 3], k=4, max_ngram=3, min_ngram=2) == [4, 2, 3]


def test_ngram_min_ngram_respected() -> None:
    # Only a unigram matches (4 at index 1), but min_ngram = 2 forbids it.
    assert ngram([1, 4, 6, 4], k=2, min_ngram=2) == []
    assert ngram([1, 4, 6, 4], k=2, min_ngram=1) == [6, 4]


def test_ngram_overlapping_repeat() -> None:
    # A run of one token: the tail [7, 7, 7] matches at index 1, followed by [7].
    assert ngram([7, 7, 7, 7, 7], k=4) == [7]


def test_ngram_k_caps_and_zero() -> None:
    assert ngram([1, 2, 3, 4, 5, 1], k=2) == [2, 3]
    assert ngram([1, 2, 3, 4, 5, 1], k=0) == []


def test_ngram_records_history() -> None:
    drafter = NgramDrafter()
    drafter.propose([1, 2, 3, 1], 2, GREEDY)
    drafter.update(1)
    drafter.propose([1, 2, 3], 2, GREEDY)
    drafter.update(0)
    assert drafter.history == [(2, 1), (0, 0)]


def test_ngram_bad_sizes() -> None:
    with pytest.raises(InvalidArgument):
        NgramDrafter(max_ngram=2, min_ngram=3)
    with pytest.raises(InvalidArgument):
        NgramDrafter(max_ngram=2, min_ngram=0)


# --------------------------------------------------------------------------- model drafter


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_block_is_the_drafts_own_greedy_continuation(
    arch: str, loaded: Callable[..., Any]
) -> None:
    draft = loaded(arch, "draft")
    context = [5, 9, 14, 3, 22]
    block = ModelDrafter(draft).propose(context, 6, GREEDY)
    assert block.q is None
    expected = draft.model.generate(
        torch.tensor([context]), do_sample=False, max_new_tokens=6, eos_token_id=None
    )[0, len(context) :].tolist()
    assert list(block.token_ids) == expected


def test_greedy_blocks_after_partial_acceptance_match_a_fresh_drafter(
    loaded: Callable[..., Any],
) -> None:
    # Rounds leave the drafter's cache holding rejected tokens; the next proposal must
    # equal that of a drafter that never saw them.
    draft = loaded("qwen2", "draft")
    drafter = ModelDrafter(draft)
    context = [5, 9, 14]
    for accepted, correction in [(2, 40), (0, 41), (4, 42), (1, 43)]:
        block = drafter.propose(context, 4, GREEDY)
        drafter.update(accepted)
        fresh = ModelDrafter(draft).propose(context, 4, GREEDY)
        assert block == fresh
        context = [*context, *block.token_ids[:accepted], correction]
    assert drafter.history == [(4, 2), (4, 0), (4, 4), (4, 1)]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.7, top_k=10, seed=4),
        SamplingParams(temperature=1.3, top_p=0.8, seed=5),
    ],
)
def test_sampled_block_is_valid(params: SamplingParams, loaded: Callable[..., Any]) -> None:
    draft = loaded("llama", "draft")
    drafter = ModelDrafter(draft, max_support=16, seed=params.seed, coupled=False)
    block = drafter.propose([5, 9, 14, 3], 5, params)
    assert len(block.token_ids) == 5
    assert block.q is not None and len(block.q) == 5
    for token, q in zip(block.token_ids, block.q, strict=True):
        assert 1 <= q.token_ids.numel() <= 16
        assert abs(float(q.probs.sum()) - 1.0) < 1e-5
        assert bool((q.probs > 0).all())
        assert token in q.token_ids.tolist()
        if params.top_k:
            assert q.token_ids.numel() <= params.top_k
    validate_block(block, draft.vocab_size)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.7, top_k=10, seed=4),
        SamplingParams(temperature=1.3, top_p=0.8, seed=5),
    ],
)
def test_a_coupled_draft_that_is_the_oracle_is_always_accepted(
    params: SamplingParams, loaded: Callable[..., Any]
) -> None:
    # A coupled block is token-only: each token the winner of the draft's race with the
    # oracle's noise at its position. A draft identical to the oracle therefore proposes
    # exactly the oracle's own draws, which it accepts in full.
    oracle_model = loaded("llama", "oracle")
    oracle = Oracle(oracle_model)
    context = [5, 9, 14, 3]
    assert params.seed is not None
    drafter = ModelDrafter(oracle_model, seed=params.seed)
    for _ in range(4):
        block = drafter.propose(context, 5, params)
        assert block.q is None and block.runner_ups is not None and len(block) == 5
        validate_block(block, oracle_model.vocab_size)
        verdict = oracle.verify(oracle.new_cache(), context, block, params, params.seed)
        assert verdict.num_accepted == 5 and verdict.is_bonus
        # Its runners-up are other tokens, ranked by their weight in the race.
        for token, ups in zip(block.token_ids, block.runner_ups, strict=True):
            assert token not in ups.token_ids and ups.p_chosen >= max(ups.probs)
        context = [*context, *block.token_ids, verdict.next_token]


def test_sampled_blocks_depend_only_on_seed_and_context(loaded: Callable[..., Any]) -> None:
    draft = loaded("gpt2", "close_draft")
    params = SamplingParams(temperature=1.0)
    context = [5, 9, 14, 3]
    first = ModelDrafter(draft, seed=11).propose(context, 4, params)
    # Same seed, a drafter whose cache went elsewhere first: same block.
    other = ModelDrafter(draft, seed=11)
    other.propose([7, 7, 7, 7, 7, 7], 3, params)
    assert other.propose(context, 4, params).token_ids == first.token_ids
    # reset(seed) gives the same stream again; another seed (almost surely) another block.
    other.reset(11)
    assert other.propose(context, 4, params).token_ids == first.token_ids
    blocks = {ModelDrafter(draft, seed=s).propose(context, 4, params).token_ids for s in range(8)}
    assert len(blocks) > 1


def test_drafter_stops_at_its_context_limit(loaded: Callable[..., Any]) -> None:
    draft = loaded("llama", "draft")
    drafter = ModelDrafter(draft)
    # One free position: x_0 is fed there, x_1 is never fed; so at most 2 tokens.
    context = [5] * (draft.max_context - 1)
    assert len(drafter.propose(context, 4, GREEDY).token_ids) == 2
    assert len(drafter.propose([5] * draft.max_context, 4, GREEDY).token_ids) == 1
    with pytest.raises(InvalidArgument):
        drafter.propose([], 4, GREEDY)


# --------------------------------------------------------------------------- branches


@pytest.mark.parametrize(
    ("arch", "lean"), [("llama", True), ("llama", False), ("gpt2", False), ("qwen2", True)]
)
def test_branches_are_the_drafts_greedy_blocks_after_each_outcome(
    arch: str, lean: bool, loaded: Callable[..., Any]
) -> None:
    # All branches come from one batched pass over a shared cache with holes in the mask
    # (HF's forward or the lean one); each must be exactly what the draft drafts alone
    # after the outcome it assumes.
    draft = loaded(arch, "draft")
    drafter = ModelDrafter(draft, lean=lean)
    context = [5, 9, 14, 3, 22, 7]
    block = drafter.propose(context, 5, GREEDY)
    assert block.runner_ups is not None and len(block.runner_ups) == 5
    assert all(
        len(r.token_ids) == 2 and t not in r.token_ids
        for r, t in zip(block.runner_ups, block.token_ids, strict=True)
    )
    # Every choice is a likely correction here (width 12): 2 behind each of the 5
    # positions of the block and behind the bonus.
    branches = drafter.branch(context, block, 4, GREEDY, width=12)
    assert len(branches) == 13
    full, *corrections = branches
    assert full.assumed[:-1] == block.token_ids  # full acceptance, then the guessed bonus
    bonus = full.assumed[-1]
    after_block = ModelDrafter(draft).propose([*context, *block.token_ids], 1, GREEDY)
    assert after_block.token_ids == (bonus,) and after_block.runner_ups is not None
    runner_ups = (*block.runner_ups, *after_block.runner_ups)  # position 5: the bonus
    picks = likeliest_corrections(runner_ups, 12)
    assert sorted(picks) == sorted((j, t) for j, r in enumerate(runner_ups) for t in r.token_ids)
    for branch, (j, token) in zip(corrections, picks, strict=True):
        assert branch.assumed == (*block.token_ids[:j], token)
    for branch in branches:
        alone = ModelDrafter(draft, lean=lean).propose([*context, *branch.assumed], 4, GREEDY)
        assert branch.block.token_ids == alone.token_ids, branch.assumed
    # The drafter's own cache is left consistent: its next proposal is unchanged.
    assert drafter.propose(context, 5, GREEDY) == block


class CancelledAfter(BranchTicket):
    """A ticket the loop cancels after the drafting thread has looked at it ``reads`` times
    (it looks once before each step)."""

    def __init__(self, reads: int) -> None:
        super().__init__()
        self.reads = reads

    @property  # type: ignore[override]
    def cancelled(self) -> bool:
        self.reads -= 1
        return self.reads < 0

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        pass


@pytest.mark.parametrize("width", [0, 3])
@pytest.mark.parametrize("lean", [True, False])
def test_a_cancelled_ticket_stops_the_branches_and_leaves_the_cache_sane(
    width: int, lean: bool, loaded: Callable[..., Any]
) -> None:
    # The ticket shows the outcomes before any row is drafted; cancelled, the drafting
    # stops after the step in progress and drafts nothing, and the drafter's next block
    # is the one a fresh drafter drafts (width 0 drafts on the drafter's own cache).
    draft = loaded("llama", "draft")
    context = [5, 9, 14, 3, 22, 7]
    drafter = ModelDrafter(draft, lean=lean)
    block = drafter.propose(context, 4, GREEDY)
    ticket = BranchTicket()
    branches = drafter.branch(context, block, 4, GREEDY, width, ticket)
    assert len(branches) == 1 + width
    assert ticket.outcomes == tuple(branch.assumed for branch in branches)
    for steps in (0, 1, 3):
        stopped = CancelledAfter(steps)
        assert drafter.branch(context, block, 4, GREEDY, width, stopped) == []
        assert stopped.outcomes == ticket.outcomes and stopped.reads < 0
        after = [*context, block.token_ids[0], 40 + steps]  # a correction at position 1
        fresh = ModelDrafter(draft, lean=lean).propose(after, 4, GREEDY)
        assert drafter.propose(after, 4, GREEDY) == fresh


def test_likeliest_corrections_follow_the_drafts_probabilities() -> None:
    # P(first rejection at j, correction y) ≈ p_1 ... p_{j-1} r_j(y).
    ups = [
        RunnerUps(0.9, (1, 11), (0.05, 0.01)),
        RunnerUps(0.5, (2, 12), (0.4, 0.05)),
        RunnerUps(0.6, (3, 13), (0.3, 0.1)),
    ]
    # scores: 0.05, 0.01; 0.9 * 0.4 = 0.36, 0.045; 0.45 * 0.3 = 0.135, 0.045
    assert likeliest_corrections(ups, 4) == [(1, 2), (2, 3), (0, 1), (1, 12)]
    assert likeliest_corrections(ups, 1) == [(1, 2)]
    assert likeliest_corrections(ups, 0) == []


def test_sampled_and_context_limited_branches(loaded: Callable[..., Any]) -> None:
    draft = loaded("llama", "draft")
    sampled = SamplingParams(temperature=1.0, seed=3)
    # Blocks that carry q: a correction is a draw from the residual, nothing to guess.
    drafter = ModelDrafter(draft, seed=3, coupled=False)
    block = drafter.propose([5, 9, 14], 3, sampled)
    assert block.runner_ups is None
    branches = drafter.branch([5, 9, 14], block, 3, sampled, width=3)
    assert len(branches) == 1 and branches[0].assumed[:-1] == block.token_ids  # no corrections
    # Coupled blocks: the race's runners-up are the likely corrections, as when greedy.
    drafter = ModelDrafter(draft, seed=3)
    block = drafter.propose([5, 9, 14], 3, sampled)
    branches = drafter.branch([5, 9, 14], block, 3, sampled, width=3)
    assert len(branches) == 4 and branches[0].assumed[:-1] == block.token_ids
    # Each branch's first token is the winner of the race at its position after it.
    for branch in branches:
        context = [5, 9, 14, *branch.assumed]
        alone = ModelDrafter(draft, seed=3).propose(context, 1, sampled)
        assert branch.block.token_ids[0] == alone.token_ids[0]
    # No room after the block for the bonus and a token: nothing to draft ahead.
    context = [5] * (draft.max_context - 3)
    block = drafter.propose(context, 3, GREEDY)
    assert drafter.branch(context, block, 3, GREEDY, width=3) == []
