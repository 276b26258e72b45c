"""Tests of specdec.core.verifier on hand-built logits: greedy rules, sampling, validation.

The distributional (lossless) property is tested in test_distribution.py.
"""

from __future__ import annotations

import pytest
import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams, SparseDist, position_generator, uniform
from specdec.core.types import MAX_SPECULATIVE_TOKENS, DraftBlock, Verdict, committed_tokens
from specdec.core.verifier import residual_distribution, validate_block, verify_block

V = 8
GREEDY = SamplingParams()
SAMPLE = SamplingParams(temperature=1.0)


def one_hot_logits(targets: list[int], vocab: int = V) -> torch.Tensor:
    """[len(targets), V] logits whose argmax in row i is targets[i] (others random but lower)."""
    g = torch.Generator().manual_seed(len(targets))
    logits = torch.randn(len(targets), vocab, generator=g)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 10.0
    return logits


def sparse(ids: list[int], probs: list[float]) -> SparseDist:
    return SparseDist(torch.tensor(ids, dtype=torch.int64), torch.tensor(probs))


# ---------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------


def test_greedy_all_accepted_gives_bonus_from_last_row() -> None:
    block = DraftBlock((3, 1, 4))
    verdict = verify_block(one_hot_logits([3, 1, 4, 7]), block, GREEDY, position=5, seed=0)
    assert verdict == Verdict(num_accepted=3, next_token=7, is_bonus=True)
    assert committed_tokens(block, verdict) == [3, 1, 4, 7]


@pytest.mark.parametrize("mismatch", [0, 1, 2])
def test_greedy_first_mismatch_is_recovered(mismatch: int) -> None:
    targets = [3, 1, 4, 7]
    draft = [3, 1, 4]
    draft[mismatch] = (targets[mismatch] + 1) % V
    block = DraftBlock(tuple(draft))
    verdict = verify_block(one_hot_logits(targets), block, GREEDY, position=0, seed=0)
    assert verdict == Verdict(num_accepted=mismatch, next_token=targets[mismatch], is_bonus=False)
    assert committed_tokens(block, verdict) == targets[: mismatch + 1]


def test_greedy_later_matches_after_a_mismatch_do_not_count() -> None:
    verdict = verify_block(one_hot_logits([3, 1, 4]), DraftBlock((0, 1)), GREEDY, 0, 0)
    assert verdict == Verdict(num_accepted=0, next_token=3, is_bonus=False)


def test_greedy_empty_block_is_a_plain_decode_step() -> None:
    verdict = verify_block(one_hot_logits([6]), DraftBlock(()), GREEDY, position=9, seed=1)
    assert verdict == Verdict(num_accepted=0, next_token=6, is_bonus=True)


def test_greedy_ignores_q_and_seed() -> None:
    # The draft proposed 2 though q prefers 5: greedy only compares with argmax.
    block = DraftBlock((2,), (sparse([2, 5], [0.1, 0.9]),))
    logits = one_hot_logits([2, 4])
    verdicts = {verify_block(logits, block, GREEDY, 0, seed) for seed in range(5)}
    assert verdicts == {Verdict(num_accepted=1, next_token=4, is_bonus=True)}


def test_greedy_ties_resolve_to_lowest_id_like_torch_argmax() -> None:
    logits = torch.zeros(2, V)
    logits[0, [2, 5]] = 1.0
    assert verify_block(logits, DraftBlock((5,)), GREEDY, 0, 0).next_token == 2
    assert verify_block(logits, DraftBlock((2,)), GREEDY, 0, 0).num_accepted == 1


# ---------------------------------------------------------------------------
# sampling edge cases
# ---------------------------------------------------------------------------


def test_token_excluded_by_top_k_is_always_rejected() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_k=2)
    for seed in range(50):
        verdict = verify_block(logits, DraftBlock((2,)), params, position=3, seed=seed)
        assert verdict.num_accepted == 0 and verdict.next_token in (0, 1)


def test_q_equal_to_p_is_always_accepted() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    q = sparse([0, 1, 2], [0.5, 0.25, 0.25])
    for seed in range(50):
        for x in range(3):
            verdict = verify_block(logits, DraftBlock((x,), (q,)), SAMPLE, 0, seed)
            assert verdict.num_accepted == 1 and verdict.is_bonus


def test_certain_token_is_accepted_in_token_only_mode() -> None:
    logits = torch.tensor([[-1e4, 30.0, -1e4], [0.0, 0.0, 0.0]])
    for seed in range(50):
        assert verify_block(logits, DraftBlock((1,)), SAMPLE, 0, seed).num_accepted == 1


def test_acceptance_uses_u_at_the_absolute_position() -> None:
    # p(x) = 0.3, q(x) = 0.6: accept iff u < 0.5 with u the first draw at `position`.
    logits = torch.log(torch.tensor([[0.3, 0.7], [0.5, 0.5]]))
    block = DraftBlock((0,), (sparse([0, 1], [0.6, 0.4]),))
    for seed in range(40):
        u = uniform(position_generator(seed, 17, 0))
        accepted = verify_block(logits, block, SAMPLE, position=17, seed=seed).num_accepted == 1
        assert accepted == (u < 0.5)


def test_recovered_token_comes_from_the_residual() -> None:
    # p = [.3, .7], q = [.6, .4]: residual max(0, p - q) = [0, .3] -> always token 1.
    logits = torch.log(torch.tensor([[0.3, 0.7], [0.5, 0.5]]))
    block = DraftBlock((0,), (sparse([0, 1], [0.6, 0.4]),))
    verdicts = [verify_block(logits, block, SAMPLE, 0, seed) for seed in range(60)]
    rejected = [v for v in verdicts if v.num_accepted == 0]
    assert rejected and all(v.next_token == 1 and not v.is_bonus for v in rejected)


def test_residual_distribution() -> None:
    p = torch.tensor([0.3, 0.7, 0.0])
    torch.testing.assert_close(
        residual_distribution(p, torch.tensor([0.6, 0.4, 0.0])), torch.tensor([0.0, 1.0, 0.0])
    )
    torch.testing.assert_close(
        residual_distribution(p, torch.tensor([0.0, 0.0, 1.0])), torch.tensor([0.3, 0.7, 0.0])
    )
    # p == q: no residual mass, fall back to p.
    assert residual_distribution(p, p.clone()) is p


def test_decision_at_a_position_does_not_depend_on_grouping() -> None:
    # The verdict at absolute position t depends on (seed, t, p_t, q_t, x_t) only, so a
    # 3-token block rejected at i gives the same tokens as verifying from position t + i.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    qs = tuple(sparse([j, (j + 1) % V, (j + 3) % V], [0.5, 0.3, 0.2]) for j in range(3))
    block = DraftBlock((0, 1, 2), qs)
    checked = 0
    for seed in range(200):
        full = verify_block(logits, block, SAMPLE, position=40, seed=seed)
        i = full.num_accepted
        tail = DraftBlock(block.token_ids[i:], qs[i:])
        part = verify_block(logits[i:], tail, SAMPLE, position=40 + i, seed=seed)
        assert part.is_bonus == full.is_bonus and part.num_accepted == 0
        assert part.next_token == full.next_token
        checked += i > 0
    assert checked > 0


def test_same_seed_same_verdict_different_seed_varies() -> None:
    logits = torch.zeros(3, V)
    block = DraftBlock((1, 2))
    one = {verify_block(logits, block, SAMPLE, 0, 7) for _ in range(5)}
    assert len(one) == 1
    many = {verify_block(logits, block, SAMPLE, 0, s) for s in range(40)}
    assert len(many) > 5


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def test_validate_block_accepts_good_blocks() -> None:
    validate_block(DraftBlock(()), V)
    validate_block(DraftBlock((0, 7)), V)
    validate_block(DraftBlock((1,), (sparse([1, 3], [0.5, 0.5]),)), V)
    validate_block(DraftBlock((0,) * MAX_SPECULATIVE_TOKENS), V)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (DraftBlock((0,) * (MAX_SPECULATIVE_TOKENS + 1)), "at most"),
        (DraftBlock((0, V)), "draft token_ids"),
        (DraftBlock((-1,)), "draft token_ids"),
        (DraftBlock((1, 2), (sparse([1], [1.0]),)), "one distribution per token"),
        (DraftBlock((1,), (sparse([1, 2], [0.5, 0.6]),)), "sum to 1"),
        (DraftBlock((1,), (sparse([1, 1], [0.5, 0.5]),)), "distinct"),
        (DraftBlock((1,), (sparse([2, 3], [0.5, 0.5]),)), "probability 0"),
        (DraftBlock((1,), (sparse([1, 3], [0.0, 1.0]),)), "probability 0"),
    ],
)
def test_bad_blocks_are_invalid_arguments(block: DraftBlock, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_block(block, V)
    logits = torch.zeros(len(block.token_ids) + 1, V)
    for params in (GREEDY, SAMPLE):
        with pytest.raises(InvalidArgument, match=message):
            verify_block(logits, block, params, 0, 0)


def test_validate_block_honours_a_smaller_max_k() -> None:
    with pytest.raises(InvalidArgument, match="at most 2"):
        validate_block(DraftBlock((0, 1, 2)), V, max_k=2)


def test_logits_rows_must_match_block() -> None:
    with pytest.raises(AssertionError, match="k\\+1"):
        verify_block(torch.zeros(2, V), DraftBlock((1, 2)), GREEDY, 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logits_give_the_cpu_verdicts() -> None:
    # Oracle logits live on the GPU; q and the generators stay on the CPU. Same draws, so
    # the same verdicts (up to float rounding at a boundary, which 200 seeds do not hit).
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 1000, generator=g) * 2
    qs = tuple(
        SparseDist(torch.tensor([j, j + 1, j + 2]), torch.tensor([0.5, 0.3, 0.2])) for j in range(3)
    )
    block = DraftBlock((0, 1, 2), qs)
    for params in (GREEDY, SAMPLE, SamplingParams(temperature=0.8, top_k=20, top_p=0.9)):
        for mode in (block, DraftBlock(block.token_ids)):
            for seed in range(200):
                cpu = verify_block(logits, mode, params, position=3, seed=seed)
                gpu = verify_block(logits.cuda(), mode, params, position=3, seed=seed)
                assert cpu == gpu
