"""Statistical tests that speculative verification is lossless (Leviathan et al. 2023, Thm 1).

For small vocabularies we draw the draft token x ~ q, run ``verify_block`` over many seeds
and compare the emitted tokens with the exact reference distribution by a chi-square test.
Every trial uses a fixed seed, so the tests are deterministic. Each correct configuration
must give a p-value > 1e-4; deliberately broken verifiers (monkeypatched pieces of the
real ladder) must give < 1e-6 on the same data sizes, which shows the test can fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch

from specdec.core import verifier
from specdec.core.sampling import (
    RACE_STREAM,
    SamplingParams,
    SparseDist,
    logits_to_probs,
    position_generator,
    race_scores,
    race_times,
    truncate_to_sparse,
)
from specdec.core.types import DraftBlock, committed_tokens
from specdec.core.verifier import verify_block

V = 6
TRIALS = 10_000
P_OK = 1e-4
P_WRONG = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # Thousands of tiny-tensor ops: intra-op threads only add barrier waits, which turn
    # into long stalls when the 2 cores are shared with other processes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# chi-square, independent of the code under test
# ---------------------------------------------------------------------------


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi2(df): the regularised upper incomplete gamma Q(df/2, stat/2)."""
    a = torch.tensor(df / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(stat / 2.0, dtype=torch.float64)))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of counts [C] to probs [C].

    Any count in a cell of probability 0 is an impossible outcome: p-value 0. Cells with an
    expected count < 5 are pooled (smallest first) so the chi-square approximation holds.
    """
    counts = counts.to(torch.float64)
    probs = probs.to(torch.float64) / probs.sum()
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    n = float(counts.sum())
    exp_t, obs_t = (probs * n)[probs > 0], counts[probs > 0]
    order = torch.argsort(exp_t)
    exp: list[float] = exp_t[order].tolist()
    obs: list[float] = obs_t[order].tolist()
    # Walk cells by increasing expected count, closing a bin once it expects >= 5.
    cells: list[tuple[float, float]] = []
    pool_e = pool_o = 0.0
    for e, o in zip(exp, obs, strict=True):
        pool_e, pool_o = pool_e + e, pool_o + o
        if pool_e >= 5.0:
            cells.append((pool_e, pool_o))
            pool_e = pool_o = 0.0
    if pool_e > 0 and cells:  # a leftover small bin joins the last (largest) one
        e, o = cells.pop()
        cells.append((e + pool_e, o + pool_o))
    if len(cells) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for e, o in cells)
    return chi2_sf(stat, len(cells) - 1)


def test_chi2_sf_known_values() -> None:
    # Textbook 5% critical values of chi2(1) and chi2(5), and chi2(2) sf = exp(-x/2).
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(11.070497693516351, 5) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(7.0, 2) == pytest.approx(math.exp(-3.5), rel=1e-9)


def test_chi2_pvalue_detects_a_biased_die() -> None:
    g = torch.Generator().manual_seed(0)
    fair = torch.full((6,), 1 / 6)
    counts = torch.bincount(torch.multinomial(fair, 6000, True, generator=g), minlength=6)
    assert chi2_pvalue(counts, fair) > P_OK
    loaded = torch.tensor([0.2, 0.16, 0.16, 0.16, 0.16, 0.16])
    counts = torch.bincount(torch.multinomial(loaded, 20_000, True, generator=g), minlength=6)
    assert chi2_pvalue(counts, fair) < P_WRONG
    assert chi2_pvalue(torch.tensor([5, 5, 1]), torch.tensor([0.5, 0.5, 0.0])) == 0.0


# ---------------------------------------------------------------------------
# exact references, computed without the code under test
# ---------------------------------------------------------------------------


def reference_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] logits -> [V] float64 target distribution: temperature, top-k, top-p (plain loops)."""
    z = [float(v) / params.temperature for v in logits.tolist()]
    keep = list(range(len(z)))
    if 0 < params.top_k < len(z):
        kth = sorted(z, reverse=True)[params.top_k - 1]
        keep = [i for i in keep if z[i] >= kth]
    m = max(z[i] for i in keep)
    w = {i: math.exp(z[i] - m) for i in keep}
    total = sum(w.values())
    p = {i: w[i] / total for i in keep}
    if params.top_p < 1.0:
        mass, kept = 0.0, {}
        for i in sorted(p, key=lambda i: -p[i]):
            if mass >= params.top_p:
                break
            kept[i] = p[i]
            mass += p[i]
        total = sum(kept.values())
        p = {i: v / total for i, v in kept.items()}
    return torch.tensor([p.get(i, 0.0) for i in range(len(z))], dtype=torch.float64)


def dense_q(q: SparseDist | None, x: int, vocab: int) -> torch.Tensor:
    """The distribution the verifier must assume for x: the sparse q, or a point mass at x."""
    out = torch.zeros(vocab, dtype=torch.float64)
    if q is None:
        out[x] = 1.0
    else:
        out[q.token_ids] = q.probs.to(torch.float64)
    return out


# ---------------------------------------------------------------------------
# draft-side distributions
# ---------------------------------------------------------------------------


def random_sparse_q(g: torch.Generator, vocab: int, support: int) -> SparseDist:
    """A q on a random subset of ``support`` ids with random (Dirichlet-like) weights."""
    ids = torch.randperm(vocab, generator=g)[:support]
    w = -torch.log(torch.rand(support, generator=g))
    return SparseDist(token_ids=ids.to(torch.int64), probs=(w / w.sum()).to(torch.float32))


def truncated_q(g: torch.Generator, vocab: int, support: int) -> SparseDist:
    """What the model drafter sends: its softmax truncated to the top ``support`` ids."""
    return truncate_to_sparse(torch.softmax(torch.randn(vocab, generator=g) * 1.5, 0), support)


def draw_proposals(
    g: torch.Generator, mode: str, n: int, vocab: int
) -> tuple[torch.Tensor, SparseDist | None]:
    """n draft tokens [n] and the q they were drawn from (None in token-only mode).

    Token-only mode draws from an arbitrary proposer r that the verifier never sees.
    """
    if mode == "token_only":
        r = torch.softmax(torch.randn(vocab, generator=g) * 3.0, 0)
        return torch.multinomial(r, n, True, generator=g), None
    q = random_sparse_q(g, vocab, 4) if mode == "sparse" else truncated_q(g, vocab, 3)
    idx = torch.multinomial(q.probs, n, True, generator=g)
    return q.token_ids[idx], q


# ---------------------------------------------------------------------------
# first emitted token ~ p
# ---------------------------------------------------------------------------


def first_token_counts(
    logits: torch.Tensor, xs: torch.Tensor, q: SparseDist | None, params: SamplingParams
) -> torch.Tensor:
    """Run verify_block on a 1-token block per trial; count the first emitted token [V]."""
    qs = None if q is None else (q,)
    counts = torch.zeros(logits.shape[-1], dtype=torch.int64)
    for seed, x in enumerate(xs.tolist()):
        block = DraftBlock(token_ids=(x,), q=qs)
        verdict = verify_block(logits, block, params, position=7, seed=seed)
        counts[committed_tokens(block, verdict)[0]] += 1
    return counts


CASES = [
    # (draft mode, oracle params, torch seed)
    ("sparse", SamplingParams(temperature=1.0), 1),
    ("truncated", SamplingParams(temperature=0.7, top_k=4, top_p=0.9), 2),
    ("token_only", SamplingParams(temperature=1.3, top_k=3), 7),
    ("token_only", SamplingParams(temperature=1.0, top_p=0.75), 4),
    ("sparse", SamplingParams(temperature=1.0, top_p=0.8), 5),
]


def make_case(mode: str, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, SparseDist | None]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, V, generator=g) * 1.5  # rows: p_0 (verified) and p_1 (bonus)
    xs, q = draw_proposals(g, mode, n, V)
    return logits, xs, q


@pytest.mark.parametrize(("mode", "params", "seed"), CASES)
def test_first_emitted_token_follows_p(mode: str, params: SamplingParams, seed: int) -> None:
    logits, xs, q = make_case(mode, seed, TRIALS)
    counts = first_token_counts(logits, xs, q, params)
    p = reference_p(logits[0], params)
    assert chi2_pvalue(counts, p) > P_OK, (counts.tolist(), (p * TRIALS).tolist())


def _residual_is_p(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p


def _always_accept(u: float, p_x: float, q_x: float) -> bool:
    return True


def _probs_without_filters(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return torch.softmax(logits.float() / params.temperature, dim=-1)


def _race_with_uniform_times(probs: torch.Tensor, seed: int, position: int) -> int:
    """The race with U[0, 1) clocks instead of Exp(1) ones: not a draw from p."""
    gen = position_generator(seed, position, RACE_STREAM)
    u = torch.rand(probs.shape[0], generator=gen, dtype=torch.float64)
    return int((probs.double() / u).argmax())


def _race_without_noise(probs: torch.Tensor, seed: int, position: int) -> int:
    return int(probs.argmax())


@pytest.mark.parametrize(
    ("name", "broken", "case"),
    [
        ("residual_distribution", _residual_is_p, 0),  # recovered token drawn from p
        ("race_draw", _race_with_uniform_times, 2),  # token-only: a biased race
        ("race_draw", _race_without_noise, 3),  # token-only: the oracle's argmax
        ("accepts", _always_accept, 1),  # every draft token accepted
        ("logits_to_probs", _probs_without_filters, 2),  # oracle ignores top-k/top-p
    ],
)
def test_broken_verifier_is_detected(
    monkeypatch: pytest.MonkeyPatch, name: str, broken: Callable[..., object], case: int
) -> None:
    mode, params, seed = CASES[case]
    monkeypatch.setattr(verifier, name, broken)
    logits, xs, q = make_case(mode, seed, TRIALS)
    counts = first_token_counts(logits, xs, q, params)
    assert chi2_pvalue(counts, reference_p(logits[0], params)) < P_WRONG


def test_a_proposal_raced_with_the_oracles_noise_changes_nothing() -> None:
    # A draft that races its own q with the oracle's noise (the coupled drafter) is
    # accepted far more often than one that does not, yet every emitted token is the
    # oracle's own race draw: the output follows p, whatever q is.
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(2, V, generator=g) * 1.5
    draft_logits = logits + 0.5 * torch.randn(2, V, generator=g)  # a close, imperfect draft
    q = logits_to_probs(draft_logits[0], params)
    counts = torch.zeros(V, dtype=torch.int64)
    accepted, trials = 0, TRIALS // 2
    for seed in range(trials):
        x = int(race_scores(q, race_times(seed, 7, V)).argmax())
        verdict = verify_block(logits, DraftBlock((x,)), params, position=7, seed=seed)
        accepted += verdict.num_accepted
        counts[committed_tokens(DraftBlock((x,)), verdict)[0]] += 1
        alone = verify_block(logits[:1], DraftBlock(()), params, position=7, seed=seed)
        assert committed_tokens(DraftBlock((x,)), verdict)[0] == alone.next_token
    p = reference_p(logits[0], params)
    assert chi2_pvalue(counts, p) > P_OK
    overlap = float(torch.minimum(p, q.double()).sum())
    independent = float((p * q.double()).sum())
    assert accepted / trials > (overlap + independent) / 2, (accepted / trials, overlap)


# ---------------------------------------------------------------------------
# a 2-token block: the joint law of what is emitted
# ---------------------------------------------------------------------------

V2 = 5
PAIR_PARAMS = SamplingParams(temperature=1.0, top_k=4)


def pair_outcome_probs(p: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor) -> torch.Tensor:
    """Exact law of the outcome cells of a 2-token block with fixed rows p [3, V].

    Cell a (a < V): x_0 rejected, recovered token a:   max(0, p_0 - q_0)(a).
    Cell V + a*V + b: x_0 = a accepted, then the second emitted token (x_1 accepted or
    rescued) is b:  min(p_0, q_0)(a) * p_1(b)  (the second emitted token ~ p_1 by the
    one-step identity, independently of the first step).
    """
    v = p.shape[-1]
    rejected0 = torch.clamp(p[0] - q0, min=0.0)
    accepted0 = torch.minimum(p[0], q0)
    assert torch.allclose(rejected0.sum() + accepted0.sum(), torch.tensor(1.0, dtype=p.dtype))
    del q1  # the second step's q does not change the law of the second emitted token
    return torch.cat([rejected0, (accepted0[:, None] * p[1][None, :]).reshape(v * v)])


def run_pairs(
    monkeypatch: pytest.MonkeyPatch | None, broken: Callable[..., object] | None
) -> tuple[float, float]:
    """p-values of (outcome cells vs exact law, bonus token given both accepted vs p_2)."""
    if monkeypatch is not None and broken is not None:
        monkeypatch.setattr(verifier, "residual_distribution", broken)
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, V2, generator=g) * 1.5
    q0, q1 = random_sparse_q(g, V2, 3), truncated_q(g, V2, 4)
    x0 = q0.token_ids[torch.multinomial(q0.probs, TRIALS, True, generator=g)].tolist()
    x1 = q1.token_ids[torch.multinomial(q1.probs, TRIALS, True, generator=g)].tolist()
    cells = torch.zeros(V2 + V2 * V2, dtype=torch.int64)
    bonus = torch.zeros(V2, dtype=torch.int64)
    for seed, (a, b) in enumerate(zip(x0, x1, strict=True)):
        block = DraftBlock(token_ids=(a, b), q=(q0, q1))
        verdict = verify_block(logits, block, PAIR_PARAMS, position=100, seed=seed)
        out = committed_tokens(block, verdict)
        if verdict.num_accepted == 0:
            cells[out[0]] += 1
        else:
            cells[V2 + out[0] * V2 + out[1]] += 1
        if verdict.is_bonus:
            bonus[out[2]] += 1
    p = torch.stack([reference_p(row, PAIR_PARAMS) for row in logits])
    law = pair_outcome_probs(p, dense_q(q0, 0, V2), dense_q(q1, 0, V2))
    return chi2_pvalue(cells, law), chi2_pvalue(bonus, p[2])


def test_two_token_block_joint_law() -> None:
    p_cells, p_bonus = run_pairs(None, None)
    assert p_cells > P_OK
    assert p_bonus > P_OK


def test_two_token_block_detects_wrong_residual(monkeypatch: pytest.MonkeyPatch) -> None:
    p_cells, _ = run_pairs(monkeypatch, _residual_is_p)
    assert p_cells < P_WRONG
