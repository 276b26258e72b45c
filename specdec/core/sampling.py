"""Sampling parameters and the maths of turning logits into a distribution.

Everything here is pure (no model, no I/O):

* ``SamplingParams``: what a request asks for (temperature 0 = greedy).
* ``logits_to_probs``: temperature, then top-k, then top-p, exactly as plain
  sampling does; speculative verification applies the *same* function to the
  oracle's logits, so the output distribution equals plain sampling.
* ``SparseDist``: a distribution given by its support (ids + probabilities);
  the draft's q travels in this form, never as a full vocabulary vector.
* ``position_generator``: the random stream used to decide the token at one
  absolute position, derived from (seed, position) so the outcome does not
  depend on how positions were grouped into rounds, nor on which replica ran.
* ``sample_from_probs`` / ``sample_sparse``: one inverse-CDF draw.
* ``race_draw`` / ``race_scores``: the Gumbel-max draw (an exponential race) with the
  noise of (seed, position): the oracle's own draw at a position, which a draft that
  knows the seed can aim at with its own distribution (``race_scores``).
* validation helpers raising ``InvalidArgument`` with a message naming the field.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specdec.core.errors import InvalidArgument
from specdec.core.types import TokenLogprob

MAX_NEW_TOKENS_LIMIT = 1 << 20
# Most alternatives a token's logprobs may list (OpenAI's limit).
MAX_LOGPROBS = 20
_MASK64 = (1 << 64) - 1
# |sum(q) - 1| tolerated for a SparseDist that crossed the wire as float32.
SPARSE_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    temperature: 0 means greedy (argmax); > 0 scales logits before softmax.
    top_k: keep the k most likely tokens (0 = no limit).
    top_p: keep the smallest set whose mass reaches top_p (1.0 = no limit).
    seed: seeds every random draw; None means "pick one at random".
    max_new_tokens: hard cap on generated tokens.
    stop_token_ids: generation ends right after one of these (EOS included by the caller).
    stop: generation ends right after the token that completes one of these strings.
    logprobs: None = none; n in [0, MAX_LOGPROBS]: each committed token comes with its
        log-probability under the oracle and the n likeliest tokens' (``token_logprobs``).
        Reporting only: no token changes for asking.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = field(default=())
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ``InvalidArgument`` naming the first bad field and its allowed range."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InvalidArgument(
                f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidArgument(
                f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}"
            )
        p = self.top_p
        if (
            isinstance(p, bool)
            or not isinstance(p, (int, float))
            or not math.isfinite(p)
            or not 0.0 < p <= 1.0
        ):
            raise InvalidArgument(f"top_p must be in (0, 1] (1 = no limit), got {p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MASK64):
            raise InvalidArgument(
                f"seed must be None or an integer in [0, 2^64-1], got {self.seed!r}"
            )
        m = self.max_new_tokens
        if not _is_int(m) or not 1 <= m <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument(
                f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {m!r}"
            )
        for tid in self.stop_token_ids:
            if not _is_int(tid) or tid < 0:
                raise InvalidArgument(f"stop_token_ids must be integers >= 0, got {tid!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidArgument(f"stop strings must be non-empty strings, got {s!r}")
        n = self.logprobs
        if n is not None and (not _is_int(n) or not 0 <= n <= MAX_LOGPROBS):
            raise InvalidArgument(
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (the likeliest "
                f"tokens listed beside each token's own), got {n!r}"
            )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SparseDist:
    """A distribution over a few token ids; every id outside ``token_ids`` has probability 0.

    token_ids: [n] int64, distinct; probs: [n] float32, non-negative, summing to 1.
    """

    token_ids: torch.Tensor
    probs: torch.Tensor


# ---------------------------------------------------------------------------
# logits -> probabilities
# ---------------------------------------------------------------------------


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k and top-p.

    The order and tie rules are those of HF's TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper. Must not be called with temperature 0 (greedy never needs probabilities).
    """
    if params.temperature <= 0:
        raise ValueError("logits_to_probs needs temperature > 0; greedy uses argmax")
    # z = logits / T, in float32 whatever the model's dtype.
    z = logits.to(torch.float32) / params.temperature
    if bool(torch.isposinf(z).any()):
        # T so small (subnormal) that a logit / T overflowed: softmax would compute
        # inf - inf = NaN. Softmax and the top-k/top-p orders are shift invariant, so
        # z = (logits - max) / T is the same distribution without the overflow: the
        # limit T -> 0 is greedy, the argmax (ties shared) with probability 1.
        shifted = logits.to(torch.float32)
        z = (shifted - shifted.amax(dim=-1, keepdim=True)) / params.temperature
    vocab = z.shape[-1]
    if 0 < params.top_k < vocab:
        z = _mask_top_k(z, params.top_k)
    probs = torch.softmax(z, dim=-1)
    if params.top_p < 1.0:
        probs = _mask_top_p(probs, params.top_p)
    return probs


def token_logprobs(
    logits: torch.Tensor, token_ids: Sequence[int], params: SamplingParams
) -> tuple[TokenLogprob, ...]:
    """logits [n, V] (row i predicts token_ids[i]) -> each token's ``TokenLogprob``.

    The distribution is the oracle's under the request's temperature T, before top-k and
    top-p: log p(y) = log_softmax(logits / T)[y] for T > 0, and log_softmax(logits)[y]
    when greedy (T = 0: the model's own distribution, whose argmax greedy takes). The
    masks are left out so that the values do not depend on where a cut falls and the
    alternatives listed stay finite. Computed in float32, with the ``params.logprobs``
    likeliest ids and their log-probabilities (likeliest first).
    """
    z = logits.to(torch.float32)
    z = z - z.amax(dim=-1, keepdim=True)  # shift invariant; no overflow for a tiny T
    if params.temperature > 0:
        z = z / params.temperature
    lp = torch.log_softmax(z, dim=-1)  # [n, V]
    ids = torch.tensor(list(token_ids), dtype=torch.int64, device=lp.device)
    chosen: list[float] = lp.gather(1, ids[:, None])[:, 0].tolist()
    n = min(params.logprobs or 0, lp.shape[-1])
    if not n:
        return tuple(TokenLogprob(c) for c in chosen)
    top = torch.topk(lp, n, dim=-1)
    top_ids: list[list[int]] = top.indices.tolist()
    top_values: list[list[float]] = top.values.tolist()
    return tuple(
        TokenLogprob(c, tuple(i), tuple(v))
        for c, i, v in zip(chosen, top_ids, top_values, strict=True)
    )


def _mask_top_k(z: torch.Tensor, k: int) -> torch.Tensor:
    # Keep z_j >= the k-th largest value (ties at the threshold are all kept, as in HF);
    # the rest get -inf so that softmax renormalises over the kept set.
    kth = torch.topk(z, k, dim=-1).values[..., -1:]  # [..., 1]
    return z.masked_fill(z < kth, float("-inf"))


def _mask_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # Sort descending; keep token j iff the mass strictly before it, c_{j-1}, is < top_p:
    # that is the smallest prefix whose mass reaches top_p, and always >= 1 token
    # (c_{-1} = 0 < top_p). Renormalise over the kept set.
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # [..., V]
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    # Steele, Lea & Flood 2014 finaliser: a bijective 64-bit mix with full avalanche.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, position: int, stream: int = 0) -> int:
    """The 64-bit seed of the draw at (seed, position, stream): chained splitmix64."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (position & _MASK64))
    return _splitmix64(h ^ (stream & _MASK64))


def position_generator(seed: int, position: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for the draw at absolute ``position`` of a sequence.

    ``stream`` separates independent uses (0 = oracle verification, 1 = draft proposal).
    """
    if position < 0 or stream < 0:
        raise ValueError(f"position and stream must be >= 0, got {position}, {stream}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(seed, position, stream))
    return gen


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random 63-bit one when it gave none."""
    return secrets.randbits(63) if seed is None else seed


def uniform(generator: torch.Generator) -> float:
    """One U[0, 1) draw (53-bit float64) from ``generator``."""
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw an index from probs [V] (any device, need not sum exactly to 1) by inverse CDF.

    One uniform u from the CPU ``generator``; return the first j with C_j > u * C_{V-1},
    where C is the cumulative sum. A zero-probability j has C_j == C_{j-1}, so it is never hit.
    """
    assert probs.dim() == 1, f"probs must be [V], got {tuple(probs.shape)}"
    u = uniform(generator)
    cdf = torch.cumsum(probs.to(torch.float64), dim=0)  # [V]
    target = torch.tensor([u], dtype=torch.float64, device=cdf.device) * cdf[-1]
    j = int(torch.searchsorted(cdf, target, right=True))
    if j < probs.shape[0]:
        return j
    # u * C_{V-1} rounded up to C_{V-1} (or all mass is 0): j fell past the last token with
    # mass; that token is the one whose interval the exact u would have hit.
    nonzero = torch.nonzero(probs > 0)
    if nonzero.numel() == 0:
        raise ValueError("cannot sample from an all-zero distribution")
    return int(nonzero[-1, 0])


def sample_sparse(dist: SparseDist, generator: torch.Generator) -> int:
    """Draw a token id from a SparseDist with one uniform from ``generator``."""
    return int(dist.token_ids[sample_from_probs(dist.probs, generator)])


# Random stream of the race noise: 0 is the oracle's rejection ladder, 1 the draft's q draws.
RACE_STREAM = 2


def race_times(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """E [V] float64, i.i.d. Exp(1), of (seed, position): E_a = -log(1 - u_a)."""
    u = torch.rand(vocab_size, generator=position_generator(seed, position, RACE_STREAM),
                   dtype=torch.float64)  # fmt: skip
    return -torch.log1p(-u)


def race_scores(probs: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """[..., V] probs, [..., V] race times -> p_a / E_a (-1 where p_a = 0), float64.

    argmax_a p_a / E_a = argmax_a (log p_a + G_a) with G_a = -log E_a i.i.d. Gumbel: the
    Gumbel-max trick, an exact draw from p (the first of independent exponential clocks
    of rates p_a to ring). Two distributions raced with the same E draw the same token
    with a probability close to sum_a min(p_a, q_a) when they are close.
    """
    scores = probs.to(torch.float64) / times.to(probs.device)
    return scores.masked_fill(probs <= 0, -1.0)


def race_draw(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token at ``position`` drawn from probs [V] with the race noise of (seed,
    position): a deterministic function of (seed, position, probs), distributed as probs."""
    assert probs.dim() == 1, f"probs must be [V], got {tuple(probs.shape)}"
    return int(race_scores(probs, race_times(seed, position, probs.shape[0])).argmax())


# ---------------------------------------------------------------------------
# sparse distributions
# ---------------------------------------------------------------------------


def truncate_to_sparse(probs: torch.Tensor, max_support: int) -> SparseDist:
    """probs [V] -> the SparseDist of its <= max_support most likely nonzero tokens, renormalised.

    A drafter must sample its token from the returned q itself (not from ``probs``): the
    verifier's acceptance test min(1, p/q) is lossless only for the q the token came from.
    Ids are ordered by descending probability.
    """
    assert probs.dim() == 1, f"probs must be [V], got {tuple(probs.shape)}"
    if not _is_int(max_support) or max_support < 1:
        raise InvalidArgument(f"max_support must be an integer >= 1, got {max_support!r}")
    p = probs.detach().to(device="cpu", dtype=torch.float32)
    n = min(max_support, int((p > 0).sum()))
    if n == 0:
        raise InvalidArgument("cannot build a sparse distribution from all-zero probabilities")
    top = torch.topk(p, n)
    return SparseDist(token_ids=top.indices.to(torch.int64), probs=top.values / top.values.sum())


def sparse_to_dense(
    dist: SparseDist, vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """SparseDist -> [V] float32 vector with q(x) at its ids and 0 elsewhere."""
    dense = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    ids = dist.token_ids.to(device=device, dtype=torch.int64)
    return dense.scatter(0, ids, dist.probs.to(device=device, dtype=torch.float32))


def sparse_prob(dist: SparseDist, token_id: int) -> float:
    """q(token_id): its probability in ``dist``, 0.0 when outside the support."""
    ids: list[int] = dist.token_ids.tolist()
    return float(dist.probs[ids.index(token_id)]) if token_id in ids else 0.0


def validate_sparse(dist: SparseDist, vocab_size: int, what: str = "q") -> None:
    """Raise ``InvalidArgument`` unless ``dist`` is a distribution over [0, vocab_size)."""
    ids, probs = dist.token_ids, dist.probs
    if ids.dim() != 1 or probs.dim() != 1 or ids.shape != probs.shape or ids.numel() == 0:
        raise InvalidArgument(
            f"{what}: token_ids and probs must be non-empty 1-D tensors of equal length, "
            f"got {tuple(ids.shape)} and {tuple(probs.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise InvalidArgument(f"{what}: token_ids must be integers, got dtype {ids.dtype}")
    if not probs.dtype.is_floating_point:
        raise InvalidArgument(f"{what}: probs must be floating point, got dtype {probs.dtype}")
    # NaN fails every comparison, so (p >= 0) & (p < inf) is false for NaN, inf and p < 0.
    if not bool(((probs >= 0) & (probs < float("inf"))).all()):
        raise InvalidArgument(f"{what}: probs must be finite and >= 0 (no NaN, inf or negatives)")
    total = float(probs.sum(dtype=torch.float64))
    if abs(total - 1.0) > SPARSE_SUM_TOLERANCE:
        raise InvalidArgument(
            f"{what}: probs must sum to 1 (within {SPARSE_SUM_TOLERANCE}), got {total:.6g}"
        )
    sorted_ids = torch.sort(ids).values  # [n]
    lo, hi = int(sorted_ids[0]), int(sorted_ids[-1])
    if lo < 0 or hi >= vocab_size:
        raise InvalidArgument(f"{what}: token ids must be in [0, {vocab_size}), got {lo}..{hi}")
    if bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
        raise InvalidArgument(f"{what}: token_ids must be distinct")


def validate_token_ids(
    ids: Sequence[int] | torch.Tensor,
    vocab_size: int,
    what: str = "prompt_token_ids",
    *,
    allow_empty: bool = False,
) -> None:
    """Raise ``InvalidArgument`` unless every id is an integer in [0, vocab_size)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if not values and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    for i, t in enumerate(values):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise InvalidArgument(f"{what}[{i}] = {t!r} is not a token id in [0, {vocab_size})")
