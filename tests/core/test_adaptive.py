"""Adaptive draft length: the formula, the estimator, and losslessness when k varies."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest

from specdec.core.adaptive import (
    PROBE_MAX,
    PROBE_MIN,
    AdaptiveK,
    AdaptiveMemory,
    DraftTurns,
    best_k,
    expected_tokens,
)
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


def test_policy_stops_speculating_for_a_useless_draft() -> None:
    # Nothing is ever accepted: a plain step (k = 0) costs the verify of one row and
    # commits as much as any block. After the warm-up rounds the policy stops drafting
    # and only probes, ever more rarely while the probes fail.
    policy = AdaptiveK(k_max=8, k_start=8)
    ks = []
    for _ in range(200):
        k = policy.next_k()
        ks.append(k)
        verify = 10_000_000 + 1_000_000 * k
        policy.observe(report(k, 0, 5_000_000 * k, verify, 0))
    assert ks[:2] == [8, 8] and not policy.speculating()
    probes = [i for i, k in enumerate(ks) if i > 2 and k]
    assert all(ks[i] == 1 for i in probes)  # a probe is one token, drafted fresh
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] == PROBE_MAX + 1, gaps
    assert policy.alone_rounds == 200 - 2 - len(probes)


class CyclingK:
    """A KPolicy that changes k every round, to exercise varying block sizes."""

    def __init__(self, ks: list[int]) -> None:
        self.ks, self.i = ks, 0

    def next_k(self) -> int:
        return self.ks[self.i % len(self.ks)]

    def speculating(self) -> bool:
        return True

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

    def speculating(self) -> bool:
        return self.k > 0

    def observe(self, report: RoundReport) -> None:
        pass


@pytest.mark.parametrize(
    ("regimes", "c0", "c1"),
    [([0.97, 0.3], 40e6, 2e6),  # bursty: long runs of easy tokens
     ([0.6], 20e6, 4e6),  # i.i.d., expensive drafting
     ([0.99, 0.5, 0.5], 60e6, 1e6),  # a large fixed cost per round
     ([0.9, 0.2], 10e6, 3e6),  # cheap rounds, costly drafting
     ([0.9, 0.0], 20e6, 3e6)],  # stretches the draft gets all wrong: plain steps there
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

    fixed = {k: total(functools.partial(FixedK, k)) for k in range(13)}
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


def test_later_turns_of_a_good_pair_take_no_plain_step() -> None:
    # The first turn takes one plain step to measure T(0); turns after it inherit that
    # measurement and speculate all the way (a plain step, and the drafting ahead it
    # breaks, on every turn would cost a few percent of a good pair's speed).
    memory = AdaptiveMemory()
    plain = []
    for turn in range(6):
        policy = memory.policy("pair", 12, session_id=f"s{turn}")
        throughput(policy, [0.8] * 300, 128, 20e6, 2e6, turn)
        plain.append(policy.alone_rounds)
        memory.remember("pair", policy, session_id=f"s{turn}")
    assert plain[0] <= 1 and plain[1:] == [0] * 5, plain


def test_a_useless_draft_costs_almost_nothing() -> None:
    # Rounds that draft cost more than plain steps and gain nothing: the policy must come
    # within a few percent of the oracle alone, probes and warm-up included.
    alphas = [0.0] * 700
    alone = throughput(FixedK(0), alphas, 600, 20e6, 3e6, 0)
    adaptive = throughput(AdaptiveK(k_max=8), alphas, 600, 20e6, 3e6, 0)
    assert adaptive >= 0.97 * alone, adaptive / alone


def test_a_useless_draft_is_given_up_when_its_misses_cost_a_plain_step() -> None:
    # Rescue blocks follow every miss at once, so a round that drafts costs what a plain
    # step does: the costs say nothing, but a block commits no more than a plain step.
    policy = AdaptiveK(k_max=8)
    ks = []
    for _ in range(60):
        k = policy.next_k()
        ks.append(k)
        r = report(k, 0, 0, 20 * MS, 0)
        policy.observe(dataclasses.replace(r, wall_ns=20 * MS))
    assert not policy.speculating()
    assert sum(k == 0 for k in ks[10:]) >= 0.8 * len(ks[10:]), ks


def test_a_good_draft_is_never_given_up() -> None:
    policy = AdaptiveK(k_max=8)
    throughput(policy, [0.8] * 700, 600, 20e6, 2e6, 0)
    # At most one plain step, taken early (while unsure) to measure what one costs.
    assert policy.speculating() and policy.alone_rounds <= 1


def test_speculation_resumes_when_the_text_turns_easy() -> None:
    # 200 tokens the draft gets wrong, then boilerplate it gets right: the probes notice
    # within a few dozen tokens, and speculation pays again.
    policy = AdaptiveK(k_max=8)
    rng = random.Random(0)
    alphas = [0.0] * 200 + [0.95] * 600
    position, ks = 0, []
    while position < 700:
        k = policy.next_k()
        accepted = 0
        while accepted < k and rng.random() < alphas[position + accepted]:
            accepted += 1
        r = report(k, accepted, 3_000_000 * k, 1_000_000, 0)
        policy.observe(dataclasses.replace(r, wall_ns=20_000_000 + 3_000_000 * k))
        ks.append((position, k))
        position += accepted + 1
    hard = [k for p, k in ks if 20 <= p < 200]
    assert sum(k == 0 for k in hard) >= 0.9 * len(hard)
    resumed = next(p for p, k in ks if p >= 200 and k > 1)
    assert resumed < 200 + PROBE_MAX + 16, resumed
    assert policy.speculating() and policy.next_k() >= 4


MS = 1_000_000


def ahead_report(k: int, accepted: int, ready: bool) -> RoundReport:
    """A round whose block was drafted ahead (ready: the verify of k + 1 rows is paid,
    22 + 0.5 k ms) or after the verdict (drafting 10 ms a token, a catch-up, too)."""
    wall = (22 + k // 2) * MS if ready else (30 + 10 * k + k // 2) * MS
    r = report(k, accepted, 0 if ready else 10 * MS * k, (22 + k // 2) * MS, 0)
    return dataclasses.replace(r, drafted_ahead=ready, wall_ns=wall)


@pytest.mark.parametrize("guesses_come_true", [True, False])
def test_what_drafting_ahead_hides_is_in_the_cost(guesses_come_true: bool) -> None:
    # The same acceptance (0.7 per token), and a plain step costs 20 ms. A miss costs
    # the drafting on top of the verify: misses alone lose to the oracle alone (about
    # 43 against 50 tokens a second), though their cost alone does not show it (T(0) is
    # not known until the controller takes a plain step). When the guesses drafted
    # ahead come true after a full acceptance, the next block is ready and costs only
    # its verify: speculating pays (about 61 tokens a second, short blocks).
    policy = AdaptiveK(k_max=8)
    rng = random.Random(1)
    previous_full = False
    for _ in range(300):
        k = policy.next_k()
        if k == 0:
            policy.observe(dataclasses.replace(report(0, 0, 0, 20 * MS, 0), wall_ns=20 * MS))
            previous_full = False
            continue
        accepted = 0
        while accepted < k and rng.random() < 0.7:
            accepted += 1
        ready = guesses_come_true and previous_full and policy.speculating()
        policy.observe(ahead_report(k, accepted, ready))
        previous_full = accepted == k
    assert policy.speculating() == guesses_come_true
    if guesses_come_true:
        assert 1 <= policy.next_k() <= 3  # a long block is seldom accepted in full


def test_memory_is_per_session_then_per_pair() -> None:
    memory = AdaptiveMemory()
    useless = memory.policy("pair", 8, "s1")
    simulate(useless, 0.0, 20e6, 3e6, 40)
    memory.remember("pair", useless, "s1")
    good = memory.policy("pair", 8, "s2")
    simulate(good, 0.9, 20e6, 3e6, 40)
    memory.remember("pair", good, "s2")
    # s1's next turn starts where s1 left off: not speculating, probing now and then.
    again = memory.policy("pair", 8, "s1")
    assert not again.speculating() and again.next_k() in (0, 1)
    assert again.probe_every > PROBE_MIN
    # A new session starts from the pair's last turn (s2's).
    fresh = memory.policy("pair", 8, "s3")
    assert fresh.speculating() and fresh.next_k() > 1


def test_a_slower_oracle_does_not_bring_back_a_useless_draft() -> None:
    # Not speculating, the controller measures only plain steps: when they slow down (a
    # busier oracle), the costs it learnt for drafting grow stale and look cheap. Only an
    # accepted probe may bring drafting back.
    policy = AdaptiveK(k_max=8)
    for plain_ms in (20, 60):
        for _ in range(150):
            k = policy.next_k()
            wall = (plain_ms + 8 * k) * MS
            policy.observe(dataclasses.replace(report(k, 0, 3 * MS * k, wall, 0), wall_ns=wall))
        assert not policy.speculating()
    assert policy.rates()[1] > 1.05 * policy.rates()[0]  # stale: drafting looks cheaper


def test_a_pair_whose_drafting_did_not_pay_runs_plain_turns_and_probes_every_eighth() -> None:
    turns = DraftTurns()
    assert turns.use_draft("p")  # nothing known: the draft
    turns.record("p", rounds=DraftTurns.MIN_ROUNDS - 1, tokens=DraftTurns.MIN_ROUNDS - 1)
    assert turns.use_draft("p")  # too short a turn to judge
    turns.record("p", rounds=40, tokens=41)  # 1.025 tokens a round: drafting did not pay
    routed = [turns.use_draft("p") for _ in range(2 * DraftTurns.PROBE_TURNS)]
    assert routed[: DraftTurns.PROBE_TURNS - 1] == [False] * (DraftTurns.PROBE_TURNS - 1)
    assert routed[DraftTurns.PROBE_TURNS - 1]  # the probe turn goes to the draft
    assert turns.use_draft("q")  # other pairs are unaffected
    turns.record("p", rounds=40, tokens=120)  # the probe turn found drafting pays again
    assert all(turns.use_draft("p") for _ in range(DraftTurns.PROBE_TURNS))
