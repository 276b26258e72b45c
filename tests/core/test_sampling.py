"""Tests of specdec.core.sampling: parameter validation, logits -> probs, seeds, sparse q."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import (
    MAX_NEW_TOKENS_LIMIT,
    SamplingParams,
    SparseDist,
    logits_to_probs,
    mix_seed,
    position_generator,
    race_draw,
    race_times,
    resolve_seed,
    sample_from_probs,
    sample_sparse,
    sparse_prob,
    sparse_to_dense,
    truncate_to_sparse,
    uniform,
    validate_sparse,
    validate_token_ids,
)

# ---------------------------------------------------------------------------
# SamplingParams.validate
# ---------------------------------------------------------------------------


def test_default_and_typical_params_are_valid() -> None:
    SamplingParams().validate()
    SamplingParams(
        temperature=0.7, top_k=50, top_p=0.9, seed=2**64 - 1, max_new_tokens=MAX_NEW_TOKENS_LIMIT
    ).validate()
    SamplingParams(seed=0, stop=("\n\n",), stop_token_ids=(0, 2)).validate()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),  # at most 20 alternatives, as OpenAI
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**kwargs).validate()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# logits_to_probs
# ---------------------------------------------------------------------------

BASE = torch.tensor([0.5, 0.3, 0.15, 0.05])  # distinct, so top-k/top-p have no ties


def probs_of(p: torch.Tensor, **kw: float | int) -> torch.Tensor:
    return logits_to_probs(torch.log(p), SamplingParams(temperature=1.0, **kw))  # type: ignore[arg-type]


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 3.0]])
    out = logits_to_probs(logits, SamplingParams(temperature=0.5))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(logits / 0.5, dim=-1))


def test_shape_and_dtype_preserved_for_batch_dims() -> None:
    logits = torch.randn(2, 3, 11, dtype=torch.bfloat16)
    out = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=4, top_p=0.8))
    assert out.shape == (2, 3, 11) and out.dtype == torch.float32
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))
    assert bool(((out > 0).sum(-1) <= 4).all())


def test_greedy_params_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature"):
        logits_to_probs(torch.zeros(3), SamplingParams())


def test_top_k_keeps_k_most_likely() -> None:
    torch.testing.assert_close(probs_of(BASE, top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(probs_of(BASE, top_k=1), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # k >= V and k = 0 are no-ops.
    torch.testing.assert_close(probs_of(BASE, top_k=4), BASE)
    torch.testing.assert_close(probs_of(BASE, top_k=0), BASE)


def test_top_k_keeps_ties_at_the_threshold() -> None:
    p = torch.tensor([0.4, 0.2, 0.2, 0.2])
    torch.testing.assert_close(probs_of(p, top_k=2), p)


def test_top_p_keeps_smallest_prefix_reaching_top_p() -> None:
    # Mass before each sorted token: 0, .5, .8, .95. Keep while that mass < top_p.
    torch.testing.assert_close(probs_of(BASE, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(probs_of(BASE, top_p=0.45), torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(probs_of(BASE, top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(probs_of(BASE, top_p=1.0), BASE)


def test_top_p_always_keeps_one_token() -> None:
    out = probs_of(torch.tensor([0.1, 0.6, 0.3]), top_p=1e-9)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.0]))


def test_top_k_is_applied_before_top_p() -> None:
    # After top-k=3 the mass is [.526, .316, .158]: before-mass .842 > .83, so 2 tokens stay.
    # (top-p first would keep 3: before-mass on the raw p is .8 < .83.)
    out = probs_of(BASE, top_k=3, top_p=0.83)
    torch.testing.assert_close(out, torch.tensor([0.625, 0.375, 0.0, 0.0]))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)]
)
def test_matches_hf_logits_warpers(temperature: float, top_k: int, top_p: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(logits_to_probs(logits, params), torch.softmax(scores, -1))


# ---------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------


def draws(gen: torch.Generator, n: int = 4) -> list[float]:
    return [uniform(gen) for _ in range(n)]


def test_position_generator_is_deterministic_and_separates_inputs() -> None:
    assert draws(position_generator(5, 10)) == draws(position_generator(5, 10, 0))
    seen = {
        tuple(draws(position_generator(s, pos, st)))
        for s, pos, st in [(5, 10, 0), (6, 10, 0), (5, 11, 0), (5, 10, 1), (2**64 - 1, 0, 0)]
    }
    assert len(seen) == 5
    assert all(0.0 <= u < 1.0 for u in draws(position_generator(2**64 - 1, 2**40)))


def test_mix_seed_avalanches() -> None:
    # Neighbouring inputs give unrelated 64-bit seeds: about half the bits differ.
    flips = [bin(mix_seed(1, p) ^ mix_seed(1, p + 1)).count("1") for p in range(200)]
    assert 26 < sum(flips) / len(flips) < 38
    assert len({mix_seed(s, p) for s in range(30) for p in range(30)}) == 900


def test_resolve_seed() -> None:
    assert resolve_seed(123) == 123
    assert resolve_seed(0) == 0
    picked = {resolve_seed(None) for _ in range(10)}
    assert len(picked) > 1 and all(0 <= s < 2**63 for s in picked)


def test_sample_from_probs_never_picks_zero_mass() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    picks = [sample_from_probs(probs, position_generator(1, i)) for i in range(2000)]
    assert set(picks) == {1, 3}
    assert 0.70 < picks.count(3) / len(picks) < 0.80  # binomial sd ~ 0.01


def test_sample_from_probs_inverts_the_cdf() -> None:
    # The same u decides: u < .25 -> 1, else 3 (unnormalised input is fine).
    probs = torch.tensor([0.0, 1.0, 0.0, 3.0])
    for i in range(50):
        u = uniform(position_generator(9, i))
        assert sample_from_probs(probs, position_generator(9, i)) == (1 if u < 0.25 else 3)


def test_the_race_draw_is_a_function_of_seed_and_position() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    draws = [race_draw(probs, seed, 9) for seed in range(300)]
    assert draws == [race_draw(probs, seed, 9) for seed in range(300)]  # reproducible
    assert 1 not in draws and set(draws) == {0, 2, 3}  # zero mass never wins
    assert draws != [race_draw(probs, seed, 10) for seed in range(300)]  # per position
    # The race is the Gumbel-max trick: argmax p_a / E_a = argmax log p_a - log E_a.
    times = race_times(4, 9, 4)
    gumbel = torch.log(probs.double()) - torch.log(times)
    assert race_draw(probs, 4, 9) == int(gumbel.argmax())


def test_sample_from_probs_rejects_all_zero() -> None:
    with pytest.raises(ValueError):
        sample_from_probs(torch.zeros(3), position_generator(0, 0))


# ---------------------------------------------------------------------------
# sparse distributions
# ---------------------------------------------------------------------------


def sparse(ids: list[int], probs: list[float]) -> SparseDist:
    return SparseDist(torch.tensor(ids, dtype=torch.int64), torch.tensor(probs))


def test_truncate_to_sparse_keeps_top_support_renormalised() -> None:
    probs = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    q = truncate_to_sparse(probs, 2)
    assert q.token_ids.tolist() == [1, 3] and q.token_ids.dtype == torch.int64
    torch.testing.assert_close(q.probs, torch.tensor([4 / 7, 3 / 7]))
    # A cap above the nonzero count keeps the nonzero support only.
    q = truncate_to_sparse(probs, 10)
    assert sorted(q.token_ids.tolist()) == [0, 1, 3, 4]
    validate_sparse(q, 5)
    with pytest.raises(InvalidArgument, match="max_support"):
        truncate_to_sparse(probs, 0)


def test_sparse_helpers() -> None:
    q = sparse([4, 1], [0.75, 0.25])
    assert sparse_prob(q, 4) == 0.75 and sparse_prob(q, 2) == 0.0
    torch.testing.assert_close(sparse_to_dense(q, 5), torch.tensor([0, 0.25, 0, 0, 0.75]))
    picks = {sample_sparse(q, position_generator(3, i)) for i in range(100)}
    assert picks == {1, 4}


def test_validate_sparse_accepts_float32_rounding() -> None:
    validate_sparse(sparse([0, 3], [0.5, 0.5004]), 4)


@pytest.mark.parametrize(
    ("dist", "message"),
    [
        (sparse([0, 1], [0.5, math.nan]), "NaN"),
        (sparse([0, 1], [math.inf, 0.5]), "inf"),
        (sparse([0, 1], [1.5, -0.5]), "negative"),
        (sparse([0, 1], [0.5, 0.4]), "sum to 1"),
        (sparse([2, 2], [0.5, 0.5]), "distinct"),
        (sparse([0, 9], [0.5, 0.5]), r"\[0, 9\)"),
        (sparse([-1, 0], [0.5, 0.5]), r"\[0, 9\)"),
        (sparse([], []), "non-empty"),
        (SparseDist(torch.tensor([0, 1]), torch.tensor([1.0])), "equal length"),
        (SparseDist(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])), "integers"),
    ],
)
def test_validate_sparse_rejects(dist: SparseDist, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_sparse(dist, 9)


def test_validate_token_ids() -> None:
    validate_token_ids([0, 5, 9], 10)
    validate_token_ids(torch.tensor([1, 2]), 10)
    validate_token_ids([], 10, "draft", allow_empty=True)
    with pytest.raises(InvalidArgument, match="prompt_token_ids must not be empty"):
        validate_token_ids([], 10)
    with pytest.raises(InvalidArgument, match=r"prompt_token_ids\[1\] = 10"):
        validate_token_ids([3, 10], 10)
    with pytest.raises(InvalidArgument, match=r"ids\[0\] = -1"):
        validate_token_ids([-1], 10, "ids")
    with pytest.raises(InvalidArgument):
        validate_token_ids([1.0], 10)  # type: ignore[list-item]
