"""Verification of a drafted block against the oracle: one block in, one verdict out.

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", arXiv 2211.17192; Chen et al. 2023, "Accelerating Large Language
Model Decoding with Speculative Sampling", arXiv 2302.01318). Letters follow Leviathan:
p is the oracle's (target's) distribution, q the draft's.

A draft proposes k tokens x_0..x_{k-1}, x_i ~ q_i. The oracle scores the context plus the
block in one forward pass, giving k+1 rows of logits; row i is the oracle's distribution
p_i for block position i (row k is the position after the whole block).

Terms used throughout (as in vLLM's rejection_sampler.py):

* accepted tokens: the longest prefix x_0..x_{n-1} of the block that passes the test.
  Greedy: x_i == argmax p_i. Sampling: u_i < min(1, p_i(x_i) / q_i(x_i)), u_i ~ U[0, 1).
* recovered token: emitted at the first rejected position n < k in place of x_n.
  Greedy: argmax p_n. Sampling: a draw from the residual norm(max(0, p_n - q_n)).
* bonus token: emitted when all k are accepted, drawn from the extra row p_k
  (argmax when greedy), so every round commits at least one token.

Why this is lossless (Leviathan, Theorem 1): for x ~ q,
P(emit a) = q(a) min(1, p(a)/q(a)) + P(reject) * max(0, p(a) - q(a)) / sum_b max(0, p(b) - q(b))
          = min(p(a), q(a)) + max(0, p(a) - q(a)) = p(a),
because P(reject) = 1 - sum_b min(p(b), q(b)) = sum_b max(0, p(b) - q(b)).

* p gets temperature, top-k and top-p exactly as plain sampling (``logits_to_probs``), so
  the emitted tokens follow the distribution plain sampling from the oracle would give.
* Token-only mode (``block.q is None``): the oracle draws its own token at each position,
  y_i = ``race_draw(p_i, seed, t_i)`` (the Gumbel-max draw with the noise of (seed, t_i),
  an exact draw from p_i), and accepts x_i iff x_i == y_i; the first y_i that differs is
  the recovered token. The emitted tokens are then exactly the oracle alone's draws with
  the same seed, whatever was proposed: lossless for *any* proposer. A proposer that
  knows nothing of the noise is accepted with probability p(x), as in the point-mass
  ladder (u < p(x), then the residual p without x); one that races its own q with the
  same noise (``specdec.drafters.model_drafter``, coupled) is accepted about as often as
  sum_a min(p_a, q_a), and can guess the bonus and the likely corrections ahead.
* Randomness: every draw deciding absolute position t comes from
  ``position_generator(seed, t, 0)`` (first draw: the accept test u_t; second: the recovered
  token) or is the race draw at t (token-only blocks, and the bonus of every block). So the
  tokens depend only on (seed, positions, distributions), not on how positions were
  grouped into rounds.
"""

from __future__ import annotations

import dataclasses

import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import (
    SamplingParams,
    SparseDist,
    logits_to_probs,
    position_generator,
    race_draw,
    sample_from_probs,
    sparse_prob,
    sparse_to_dense,
    token_logprobs,
    uniform,
    validate_sparse,
    validate_token_ids,
)
from specdec.core.types import MAX_SPECULATIVE_TOKENS, DraftBlock, Verdict, committed_tokens

# Random stream of the oracle's verification draws (1 is the draft's proposal stream).
VERIFY_STREAM = 0


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def validate_block(block: DraftBlock, vocab_size: int, max_k: int = MAX_SPECULATIVE_TOKENS) -> None:
    """Raise ``InvalidArgument`` unless ``block`` can be verified against a vocab of ``vocab_size``.

    Checks k <= max_k, ids in [0, vocab_size), one well-formed q per token, and q_i(x_i) > 0
    (a token its own q gives probability 0 cannot have been sampled from it, and would
    divide by zero in p/q).
    """
    k = len(block.token_ids)
    if k > max_k:
        raise InvalidArgument(f"a draft block holds at most {max_k} tokens, got {k}")
    validate_token_ids(block.token_ids, vocab_size, "draft token_ids", allow_empty=True)
    if block.q is None:
        return
    if len(block.q) != k:
        raise InvalidArgument(
            f"draft q must have one distribution per token: {len(block.q)} != {k}"
        )
    for i, (x, q) in enumerate(zip(block.token_ids, block.q, strict=True)):
        validate_sparse(q, vocab_size, what=f"q[{i}]")
        if sparse_prob(q, x) <= 0.0:
            raise InvalidArgument(
                f"draft token {x} at block position {i} has probability 0 under its own q[{i}]; "
                "sample each draft token from the q you send"
            )


# ---------------------------------------------------------------------------
# greedy: exact match against argmax
# ---------------------------------------------------------------------------


def verify_greedy(logits: torch.Tensor, block: DraftBlock) -> Verdict:
    """logits [k+1, V]: accept while x_i == argmax p_i; then argmax at the mismatch, or row k."""
    return greedy_verdict(logits.argmax(dim=-1).tolist(), block)


def greedy_verdict(target: list[int], block: DraftBlock) -> Verdict:
    """target[i] = argmax p_i for i in [0, k] (more entries are ignored) -> the verdict."""
    k = len(block.token_ids)
    n = 0
    while n < k and block.token_ids[n] == target[n]:
        n += 1
    return Verdict(num_accepted=n, next_token=int(target[n]), is_bonus=n == k)


# ---------------------------------------------------------------------------
# sampling: the rejection-sampling ladder
# ---------------------------------------------------------------------------


def draft_prob(q: tuple[SparseDist, ...], block: DraftBlock, i: int) -> float:
    """q_i(x_i): the sparse q's value at x_i."""
    return sparse_prob(q[i], block.token_ids[i])


def accepts(u: float, p_x: float, q_x: float) -> bool:
    """u < min(1, p(x)/q(x)), written u * q(x) < p(x) (q(x) > 0; p(x) = 0 never accepts)."""
    return u * q_x < p_x


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p, q [V] -> norm(max(0, p - q)) [V]; falls back to p if the residual has no mass.

    A rejection at x has probability sum_b max(0, p(b) - q(b)), so an all-zero residual
    (p == q up to rounding) is reached only through rounding; p is then the right answer.
    """
    r = torch.clamp(p - q, min=0.0)  # [V]
    total = r.sum()
    if float(total) <= 0.0:
        return p
    return r / total


def verify_raced(probs: torch.Tensor, block: DraftBlock, position: int, seed: int) -> Verdict:
    """probs [k+1, V], a token-only block: accept x_i while it is the oracle's race draw
    at its position; the first draw that differs (or the one after the block) follows."""
    k = len(block.token_ids)
    for i in range(k):
        drawn = race_draw(probs[i], seed, position + i)
        if drawn != block.token_ids[i]:
            return Verdict(num_accepted=i, next_token=drawn, is_bonus=False)
    return Verdict(
        num_accepted=k, next_token=race_draw(probs[k], seed, position + k), is_bonus=True
    )


def verify_sampled(probs: torch.Tensor, block: DraftBlock, position: int, seed: int) -> Verdict:
    """probs [k+1, V] (the oracle's p after temperature/top-k/top-p) -> Verdict."""
    q = block.q
    if q is None:
        return verify_raced(probs, block, position, seed)
    k = len(block.token_ids)
    vocab_size = probs.shape[-1]
    # p_i(x_i) for every block position in one gather: [k].
    ids = torch.tensor(block.token_ids, dtype=torch.int64, device=probs.device)
    p_x: list[float] = probs[:k].gather(1, ids[:, None])[:, 0].tolist()
    for i in range(k):
        gen = position_generator(seed, position + i, VERIFY_STREAM)
        u = uniform(gen)  # first draw at this position: the accept test
        if accepts(u, p_x[i], draft_prob(q, block, i)):
            continue
        q_i = sparse_to_dense(q[i], vocab_size, probs.device)
        recovered = sample_from_probs(residual_distribution(probs[i], q_i), gen)  # second draw
        return Verdict(num_accepted=i, next_token=recovered, is_bonus=False)
    return Verdict(
        num_accepted=k, next_token=race_draw(probs[k], seed, position + k), is_bonus=True
    )


def with_logprobs(
    verdict: Verdict, logits: torch.Tensor, block: DraftBlock, params: SamplingParams
) -> Verdict:
    """``verdict`` with its committed tokens' logprobs when ``params.logprobs`` asks for
    them: the accepted x_0..x_{n-1}, then y, predicted by rows 0..n of the same logits
    [k+1, V] the verdict was judged on. Nothing is computed otherwise."""
    if params.logprobs is None:
        return verdict
    tokens = committed_tokens(block, verdict)
    logprobs = token_logprobs(logits[: len(tokens)], tokens, params)
    return dataclasses.replace(verdict, logprobs=logprobs)


def verify_block(
    logits: torch.Tensor, block: DraftBlock, params: SamplingParams, position: int, seed: int
) -> Verdict:
    """logits: [k+1, V] oracle logits; row i predicts the token after block position i-1.

    ``position`` is the absolute index in the sequence of the first drafted token.
    Raises ``InvalidArgument`` for a malformed block (see ``validate_block``).
    """
    k = len(block.token_ids)
    assert logits.dim() == 2 and logits.shape[0] == k + 1, (
        f"logits must be [k+1={k + 1}, V], got {tuple(logits.shape)}"
    )
    validate_block(block, logits.shape[-1])
    if params.greedy:
        return verify_greedy(logits, block)
    return verify_sampled(logits_to_probs(logits, params), block, position, seed)
