"""Adaptive draft length: the formula, the estimator, and losslessness when k varies."""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable
from typing import Any

import pytest

from specdec.core.adaptive import AdaptiveK, AdaptiveMemory, best_k, expected_tokens
from specdec.core.sampling import SamplingParams
from specdec.core.types import RoundReport
from specdec.drafters.model_drafter import ModelDrafter
from specdec.engine.oracle import Oracle
from specdec.generate import speculative_generate


def report(k: int, accepted: int, draft_ns: int, verify_ns: int, network_ns: int) -> RoundReport:
    return RoundReport(
        round=0, k=k, proposed=k, accepted=accepted, is_bonus=accepted == k, committed=accepted + 1,
        committed_length=0, draft_ns=draft_ns, verify_ns=verify_ns, network_ns=network_ns,
        queue_ns=0,
    )  # fmt: skip


def test_expected_tokens_matches_leviathan() -> None:
    # E(k) = 1 + a + ... + a^k.
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(0.8, 0) == pytest.approx(1.0)


def brute_force(alpha: float, td: float, v0: float, v1: float, rtt: float, k_max: int) -> int:
    def rate(k: int) -> float:
        return sum(alpha**i for i in range(k + 1)) / (k * td + v0 + v1 * (k + 1) + rtt)

    return max(range(k_max + 1), key=lambda k: (rate(k), -k))


@pytest.mark.parametrize(
    ("alpha", "td", "v0", "v1", "rtt"),
    [(0.9, 1, 10, 0, 0), (0.5, 1, 10, 0, 0), (0.9, 1, 10, 0, 50), (0.3, 5, 10, 1, 0),
     (0.95, 0.1, 2, 2, 0), (0.0, 1, 10, 0, 0)],
)  # fmt: skip
def test_best_k_maximises_tokens_per_second(
    alpha: float, td: float, v0: float, v1: float, rtt: float
) -> None:
    assert best_k(alpha, td, v0, v1, rtt, 16) == brute_force(alpha, td, v0, v1, rtt, 16)


def test_longer_round_trip_means_longer_blocks() -> None:
    # The network cost is paid per round: amortise it over more tokens.
    assert best_k(0.8, 1, 10, 0, 100, 32) > best_k(0.8, 1, 10, 0, 0, 32)


def test_policy_learns_alpha_and_costs() -> None:
    rng = random.Random(0)
    alpha, td, v0, v1, rtt = 0.85, 2_000_000, 20_000_000, 500_000, 30_000_000
    policy = AdaptiveK(k_max=16, k_start=2)
    for _ in range(300):
        k = policy.next_k()
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        policy.observe(report(k, accepted, td * k, int(v0 + v1 * (k + 1)), rtt))
    assert policy.alpha == pytest.approx(alpha, abs=0.08)
    target = best_k(alpha, td, v0, v1, rtt, 16)
    assert abs(policy.next_k() - target) <= 2, (policy.next_k(), target)


def test_policy_shrinks_k_for_a_bad_draft() -> None:
    policy = AdaptiveK(k_max=8, k_start=8)
    for _ in range(30):
        policy.observe(report(policy.next_k(), 0, 5_000_000, 10_000_000, 0))
    assert policy.next_k() == 1  # never 0: keeps measuring acceptance


class CyclingK:
    """A KPolicy that changes k every round, to exercise varying block sizes."""

    def __init__(self, ks: list[int]) -> None:
        self.ks, self.i = ks, 0

    def next_k(self) -> int:
        return self.ks[self.i % len(self.ks)]

    def observe(self, report: RoundReport) -> None:
        self.i += 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_varying_k_is_still_exact(arch: str, loaded: Callable[..., Any]) -> None:
    oracle = Oracle(loaded(arch, "oracle"))
    params = SamplingParams(max_new_tokens=40)
    prompt = [1, 5, 9, 12, 7]
    alone = speculative_generate(prompt, oracle, None, params, 0)
    for policy in (CyclingK([1, 5, 2, 8, 3]), AdaptiveK(k_max=8, k_start=1, warmup_rounds=1)):
        drafter = ModelDrafter(loaded(arch, "close_draft"))
        result = speculative_generate(prompt, oracle, drafter, params, 8, policy=policy)
        assert result.tokens == alone.tokens
        if isinstance(policy, CyclingK):
            assert len({r.k for r in result.rounds}) > 2  # k really changed between rounds


def text_acceptance(regimes: list[float], tokens: int, seed: int) -> list[float]:
    """Per position of a text, the chance the draft's token is accepted: stretches of ~30
    tokens of one regime (boilerplate is easy, names and numbers are hard)."""
    rng = random.Random(seed)
    alphas: list[float] = []
    while len(alphas) < tokens + 64:
        alphas += [rng.choice(regimes)] * int(rng.expovariate(1 / 30) + 1)
    return alphas


def throughput(
    policy: Any, alphas: list[float], tokens: int, c0: float, c1: float, seed: int
) -> float:
    """Tokens per second of ``policy`` generating ``tokens`` tokens of the text."""
    rng = random.Random(seed)
    position, elapsed = 0, 0.0
    while position < tokens:
        k = policy.next_k()
        accepted = 0
        while accepted < k and rng.random() < alphas[position + accepted]:
            accepted += 1
        wall = c0 + c1 * k
        # The measured parts leave out a fixed cost per round only the wall time shows.
        r = report(k, accepted, int(c1 * k), 1_000_000, 0)
        policy.observe(dataclasses.replace(r, wall_ns=int(wall)))
        position += accepted + 1
        elapsed += wall
    return position / elapsed


class FixedK:
    def __init__(self, k: int) -> None:
        self.k = k

    def next_k(self) -> int:
        return self.k

    def observe(self, report: RoundReport) -> None:
        pass


@pytest.mark.parametrize(
    ("regimes", "c0", "c1"),
    [([0.97, 0.3], 40e6, 2e6),  # bursty: long runs of easy tokens
     ([0.6], 20e6, 4e6),  # i.i.d., expensive drafting
     ([0.99, 0.5, 0.5], 60e6, 1e6),  # a large fixed cost per round
     ([0.9, 0.2], 10e6, 3e6)],  # cheap rounds, costly drafting
)  # fmt: skip
def test_policy_is_within_five_percent_of_the_best_fixed_k(
    regimes: list[float], c0: float, c1: float
) -> None:
    # Each policy generates the same texts (same acceptance per position, same draws).
    def total(make: Callable[[], Any]) -> float:
        return sum(
            throughput(make(), text_acceptance(regimes, 600, seed), 600, c0, c1, seed)
            for seed in range(6)
        )

    fixed = {k: total(functools.partial(FixedK, k)) for k in range(1, 13)}
    adaptive = total(functools.partial(AdaptiveK, k_max=12))
    best = max(fixed, key=fixed.__getitem__)
    assert adaptive >= 0.95 * fixed[best], (adaptive / fixed[best], best)


def simulate(policy: AdaptiveK, alpha: float, c0: float, c1: float, rounds: int) -> None:
    throughput(policy, [alpha] * (rounds * 14), rounds, c0, c1, 0)


def test_wall_time_overhead_lengthens_blocks() -> None:
    # The same acceptance and parts, but rounds cost 50 ms more than their parts: with
    # the fixed cost per round that much higher, longer blocks pay.
    lean, heavy = AdaptiveK(k_max=16, k_start=2), AdaptiveK(k_max=16, k_start=2)
    simulate(lean, 0.8, 2e6, 2e6, 200)
    simulate(heavy, 0.8, 52e6, 2e6, 200)
    assert heavy.next_k() > lean.next_k()


def test_a_new_turn_starts_from_what_earlier_turns_learnt() -> None:
    memory = AdaptiveMemory()
    first = memory.policy("oracle-a", 12)
    assert first.next_k() == 4  # nothing known yet
    simulate(first, 0.95, 40e6, 1e6, 100)
    memory.remember("oracle-a", first)
    second = memory.policy("oracle-a", 12)
    assert second.next_k() == first.next_k() > 4  # no warm-up needed
    assert memory.policy("oracle-b", 12).next_k() == 4  # another oracle: nothing known
    # What was inherited weighs little: a much worse draft pulls k down within a few rounds.
    simulate(second, 0.2, 40e6, 1e6, 8)
    assert second.next_k() < first.next_k()
    assert memory.policy("oracle-a", 3).k_max == 3
