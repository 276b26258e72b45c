"""Drafting ahead for the likely outcomes of a verification, not only for full acceptance.

While a block x_1..x_k drafted after context c is verified, the verdict will commit
x_1..x_j and one more token y: the correction (j < k, y != x_{j+1}) or the bonus
(j = k). A block drafted ahead is useful only if it was drafted after exactly that
outcome. Pipelining alone drafts after one outcome, full acceptance with y = the
draft's guess of the bonus. A greedy draft knows more: where the oracle rejects its
token, the oracle's token is most often the draft's second or third choice there.
With the draft's probabilities p_i of its token and r_i(y) of another token y at
position i,

    P(first rejection at j+1, correction = y) ≈ p_1 ··· p_j · r_{j+1}(y)

so the ``width`` likeliest corrections get a block too, among the two choices behind
the draft's token at each position (position k+1 stands for the bonus: all accepted,
and the bonus is another choice than the guess). Teacher-forced on the demo pair at
k = 4, the share of verdicts that some block drafted ahead extends is 45% for full
acceptance alone; 73% with 3 corrections, 78% with 5 and 81% with 8.

Drafting ahead is wasted once the verdict is in and none of the branches is its
outcome. The loop and the drafting thread share a ``BranchTicket``: the branches'
outcomes are published on it as soon as they are chosen (before any row is
drafted), and the loop cancels it on such a miss. The rows stop at their next
step, so the draft's block for the verdict starts a step later, not a whole
branch drafting later.

All branches are drafted together, one forward per step: they share the KV of
c + x_1..x_k, expanded to one row each, and row j masks the positions after its
branch point (an attention mask with a hole, its own position ids). A model whose
padded rows may differ from single ones (``batch_unsupported``) drafts only the
full-acceptance branch. None of this affects the output: the oracle verifies every
block against the tokens it really committed.

Sampled turns draft the same way when the draft races its distribution with the
oracle's noise (``Ranking``; ``specdec.core.sampling.race_scores``): the oracle's
token at a position is then its own race draw, which the draft's winner of the same
race guesses, and whose likeliest alternatives are the runners-up of that race.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from specdec.core.sampling import SamplingParams
from specdec.core.types import Branch, BranchTicket, DraftBlock, RunnerUps
from specdec.drafters import Drafter
from specdec.engine.batched import batch_unsupported
from specdec.engine.kv_cache import SequenceCache, dynamic_cache_of, forward_arguments
from specdec.engine.lean_forward import LeanCache, LeanRows

# How many of the draft's next choices behind its token may be a correction's guess.
CHOICES_BEHIND = 2

# logits [B, V] of rows predicting the tokens at absolute ``positions`` [B] -> [B, V]
# non-negative weights whose argmax is the draft's token there and whose order ranks its
# next choices (greedy: the softmax; sampled and coupled: the race scores).
Ranking = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def softmax_ranking(logits: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """The greedy ranking: the draft's own probabilities."""
    return logits.float().softmax(-1)


class BranchesCancelled(Exception):
    """The ticket was cancelled while the rows were drafted (internal to this module)."""


def full_acceptance_branch(
    drafter: Drafter,
    context: Sequence[int],
    block: DraftBlock,
    k: int,
    params: SamplingParams,
    ticket: BranchTicket | None = None,
) -> list[Branch]:
    """The one branch any drafter can draft: a guess of the bonus token, then k tokens."""
    proposal = drafter.propose([*context, *block.token_ids], k + 1, params)
    if len(proposal) < 2:
        return []
    branch = Branch((*block.token_ids, proposal.token_ids[0]), proposal.after_first())
    if ticket is not None:
        ticket.choose((branch.assumed,))
    return [branch]


def greedy_choices(logits: torch.Tensor) -> tuple[list[int], list[RunnerUps]]:
    """logits [B, V] -> per row the argmax id and the ``CHOICES_BEHIND`` ids behind it."""
    return top_choices(logits.float().softmax(-1))


def top_choices(weights: torch.Tensor) -> tuple[list[int], list[RunnerUps]]:
    """weights [B, V] (a ``Ranking``'s) -> per row the top id and the ``CHOICES_BEHIND``
    ids behind it, with their weights normalised to sum to 1 over the row."""
    assert weights.dim() == 2 and weights.shape[-1] > CHOICES_BEHIND, tuple(weights.shape)
    top = weights.topk(1 + CHOICES_BEHIND, dim=-1)  # [B, 1 + behind]
    total = weights.clamp(min=0).sum(-1, keepdim=True).clamp(min=1e-30)
    values, indices = (top.values / total).tolist(), top.indices.tolist()
    chosen = [int(row[0]) for row in indices]
    runner_ups = [
        RunnerUps(float(p[0]), tuple(int(i) for i in ids[1:]), tuple(float(q) for q in p[1:]))
        for ids, p in zip(indices, values, strict=True)
    ]
    return chosen, runner_ups


def likeliest_corrections(runner_ups: Sequence[RunnerUps], width: int) -> list[tuple[int, int]]:
    """The (position, token) corrections likeliest to be the verdict, most likely first:
    at most ``width``, each scored p_1 ··· p_j · r_{j+1} with r the draft's probability of
    that token at position j+1 (0-based positions; the last may be the bonus)."""
    scores: list[tuple[float, int, int]] = []
    reach = 1.0  # P(x_1..x_j all accepted)
    for j, behind in enumerate(runner_ups):
        for token, p in zip(behind.token_ids, behind.probs, strict=True):
            scores.append((reach * p, j, token))
        reach *= behind.p_chosen
    ranked = sorted(scores, key=lambda s: (-s[0], s[1]))[: max(0, width)]
    return [(j, token) for _, j, token in ranked]


@torch.inference_mode()
def draft_branches(
    cache: SequenceCache,
    context: Sequence[int],
    block: DraftBlock,
    k: int,
    width: int,
    ticket: BranchTicket | None = None,
    rank: Ranking = softmax_ranking,
) -> list[Branch]:
    """Blocks of up to k tokens (each the top of ``rank``) for the outcomes of verifying
    ``block`` after ``context``.

    First the full acceptance (assumed = block + the guessed bonus), then up to
    ``width`` likeliest corrections (assumed = block[:j] + y, y one of the draft's next
    choices at position j; j = k: behind the bonus). ``cache`` is the drafter's: it is
    left holding context + block; the branches run on copies. Empty when the draft's
    context has no room for another token, or when ``ticket`` is cancelled (the
    outcomes are published on it before the rows are drafted).
    """
    model = cache.model
    sequence = [*context, *block.token_ids]
    start, end = len(context), len(sequence)
    # The full-acceptance row feeds the bonus at position `end`, then k - 1 more tokens.
    k = min(k, model.max_context - end)
    if k < 1 or start == 0:
        return []
    # A block drafted elsewhere (the oracle's rescue block) has no runner-ups: its
    # positions are fed again to read the draft's choices there.
    rescore = not block.runner_ups and len(block) > 0
    reused = min(cache.sync(sequence), start - 1 if rescore else end - 1)
    cache.rollback(reused)
    keep = end - start + 1 if rescore else 1
    logits = cache.extend(sequence[reused:], logits_to_keep=keep)[-keep:]  # [keep, V]
    chosen, choices = top_choices(rank(logits, range(end - keep + 1, end + 1)))
    bonus, bonus_runner_up = chosen[-1], choices[-1]
    block_runner_ups = tuple(choices[:-1]) if rescore else (block.runner_ups or ())[: len(block)]

    kv = cache.layer_kv()
    # Position k is the bonus: full acceptance, then another choice instead of the guess.
    runner_ups = (*block_runner_ups, bonus_runner_up) if block_runner_ups else ()
    corrections: list[tuple[int, int]] = []
    if runner_ups and kv and (isinstance(cache, LeanCache) or batch_unsupported(model) is None):
        corrections = likeliest_corrections(runner_ups, width)
    # Row 0: the full acceptance; row 1 + i: the correction corrections[i] = (j, token).
    outcomes = (
        (*block.token_ids, bonus),
        *((*block.token_ids[:j], token) for j, token in corrections),
    )
    first_tokens = [bonus, *(token for _, token in corrections)]
    positions = [end, *(start + j for j, _ in corrections)]
    if ticket is not None:
        ticket.choose(outcomes)
    try:
        rows = _draft_rows(cache, kv or [], first_tokens, positions, k, ticket, rank)
    except BranchesCancelled:
        return []
    return [Branch(assumed, drafted) for assumed, drafted in zip(outcomes, rows, strict=True)]


def _draft_rows(
    cache: SequenceCache,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    first_tokens: list[int],
    positions: list[int],
    k: int,
    ticket: BranchTicket | None = None,
    rank: Ranking = softmax_ranking,
) -> list[DraftBlock]:
    """k tokens per row, each the top of ``rank``: row b feeds first_tokens[b] at
    positions[b], seeing the cached tokens before positions[b] only; one batched forward
    per step. Raises BranchesCancelled at the first step after ``ticket`` is cancelled."""
    if len(first_tokens) == 1:  # no hole needed: plain decoding on the cache itself
        return [_draft_alone(cache, first_tokens[0], k, ticket, rank)]
    step = (
        LeanRows(cache, positions, k).step
        if isinstance(cache, LeanCache)
        else _hf_rows(cache, kv, positions)
    )
    drafted: list[list[int]] = [[] for _ in first_tokens]
    runner_ups: list[list[RunnerUps]] = [[] for _ in first_tokens]
    tokens = first_tokens
    for fed in range(k):
        _check(ticket)
        predicted = [position + 1 + fed for position in positions]
        tokens, seconds = top_choices(rank(step(tokens), predicted))  # [B, V] -> B ids
        for b, (token, second) in enumerate(zip(tokens, seconds, strict=True)):
            drafted[b].append(token)
            runner_ups[b].append(second)
    return [
        DraftBlock(tuple(ids), None, tuple(seconds))
        for ids, seconds in zip(drafted, runner_ups, strict=True)
    ]


def _hf_rows(
    cache: SequenceCache, kv: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int]
) -> Callable[[list[int]], torch.Tensor]:
    """The rows of ``_draft_rows`` on HF's forward: a step function, tokens -> logits [B, V]."""
    model = cache.model
    device = model.device
    rows, end = len(positions), len(cache)
    layers = [
        (keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) for keys, values in kv
    ]  # [B, H, end, D] views: the first step's concatenation copies them
    past: Any = dynamic_cache_of(layers)
    mask = torch.ones(rows, end, dtype=torch.long, device=device)  # [B, end]
    for b, branch_point in enumerate(positions):
        mask[b, branch_point:] = 0  # the hole: the proposal's tokens after the branch point
    position = torch.tensor(positions, dtype=torch.long, device=device)  # [B]
    cache_argument, has_logits_to_keep = forward_arguments(model)
    extra: dict[str, Any] = {"logits_to_keep": 1} if has_logits_to_keep else {}

    def step(tokens: list[int]) -> torch.Tensor:
        nonlocal mask, position
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)  # [B, end + step + 1]
        output = model.model(
            input_ids=torch.tensor(tokens, dtype=torch.long, device=device)[:, None],
            position_ids=position[:, None],
            attention_mask=mask,
            use_cache=True,
            **{cache_argument: past},
            **extra,
        )
        position = position + 1
        return output.logits[:, -1]  # [B, V]

    return step


def _draft_alone(
    cache: SequenceCache,
    first: int,
    k: int,
    ticket: BranchTicket | None = None,
    rank: Ranking = softmax_ranking,
) -> DraftBlock:
    """k tokens after the cached tokens + ``first``, each the top of ``rank``, on the
    cache itself (a cancelled ticket leaves it holding what was fed: the next sync drops
    that)."""
    tokens: list[int] = []
    runner_ups: list[RunnerUps] = []
    feed = first
    for _ in range(k):
        _check(ticket)
        position = len(cache) + 1  # where the token predicted after ``feed`` goes
        (token,), (second,) = top_choices(rank(cache.extend([feed])[-1:], [position]))
        tokens.append(token)
        runner_ups.append(second)
        feed = token
    return DraftBlock(tuple(tokens), None, tuple(runner_ups))


def _check(ticket: BranchTicket | None) -> None:
    if ticket is not None and ticket.cancelled:
        raise BranchesCancelled
