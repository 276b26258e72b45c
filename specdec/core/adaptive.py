"""Adaptive draft length: pick k per round to maximise expected tokens per second.

Leviathan et al. 2023 (arXiv 2211.17192), with per-token acceptance rate a and
a block of k drafted tokens, expect

    E(k) = (1 - a^(k+1)) / (1 - a)          tokens committed per round

and, extended with the network round trip of a remote oracle, a round costs

    T(k) = k * t_draft + t_verify(k+1) + rtt

so the policy picks k = argmax E(k) / T(k) over [1, k_max]. Two refinements
make the choice hold up on real text and real services:

* Acceptance is not i.i.d.: easy stretches (boilerplate, code) are accepted
  in long runs, hard ones fail early. E(k) is therefore taken from the measured
  acceptance *per block position*, c_i = P(token i accepted | tokens 0..i-1 were),

      E(k) = 1 + c_0 + c_0 c_1 + ... + c_0 ... c_(k-1)

  with the i.i.d. maximum-likelihood a as the prior of every c_i (a round that
  accepted m of k tokens gives m successes and, if m < k, one failure). Positions
  never drafted yet fall back to a.
* A round costs more than its parts: gRPC, commits and scheduling add a fixed
  cost per round, and drafting during verification (and pipelining) hides some
  of the draft and of the round trip. So T(k) = c0 + c1 * k is fitted to the
  measured wall time of rounds: c1 = the exposed draft time per token + the
  slope of t_verify(n) = v0 + v1 * n, and c0 = the mean of (wall - c1 * k).

Every estimate is an exponentially weighted mean over the session's rounds.
``fork`` starts a new turn from what earlier turns learnt (costs barely change
between turns of one draft-oracle pair), down-weighted so the new turn's own
rounds soon dominate.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from specdec.core.types import RoundReport

DECAY = 0.9  # weight of the past in every estimate, per round
MIN_ALPHA, MAX_ALPHA = 0.01, 0.99
PRIOR_ROUNDS = 2.0  # pseudo-rounds of the i.i.d. prior behind each position's acceptance
FORK_ROUNDS = 4.0  # what a new turn inherits weighs at most this many rounds


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - a^(k+1)) / (1 - a): accepted tokens plus the one correction/bonus."""
    alpha = min(max(alpha, MIN_ALPHA), MAX_ALPHA)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_tokens_by_position(conditional: Sequence[float], k: int) -> float:
    """E(k) = sum_{j=0..k} prod_{i<j} c_i, with c_i the acceptance at position i given i-1."""
    total, reach = 1.0, 1.0
    for i in range(k):
        reach *= conditional[i]
        total += reach
    return total


def round_time(k: int, t_draft: float, v0: float, v1: float, rtt: float) -> float:
    """T(k) = k * t_draft + t_verify(k+1) + rtt, in any time unit."""
    return k * t_draft + v0 + v1 * (k + 1) + rtt


def best_k(alpha: float, t_draft: float, v0: float, v1: float, rtt: float, k_max: int) -> int:
    """argmax_k E(k) / T(k) over [0, k_max] under i.i.d. acceptance (ties: the smaller k)."""
    rates = [
        expected_tokens(alpha, k) / max(round_time(k, t_draft, v0, v1, rtt), 1e-9)
        for k in range(k_max + 1)
    ]
    return max(range(k_max + 1), key=lambda k: (rates[k], -k))


@dataclass
class _Ewma:
    value: float = 0.0
    weight: float = 0.0

    def add(self, x: float, w: float = 1.0) -> None:
        self.value = DECAY * self.value + w * x
        self.weight = DECAY * self.weight + w

    def scale(self, factor: float) -> None:
        self.value *= factor
        self.weight *= factor

    @property
    def mean(self) -> float:
        return self.value / self.weight if self.weight else 0.0


class AdaptiveK:
    """A ``KPolicy``: starts at ``k_start`` and follows argmax E(k)/T(k) once it has data."""

    def __init__(self, k_max: int, k_start: int | None = None, warmup_rounds: int = 2) -> None:
        self.k_max = k_max
        self.k = min(k_start if k_start is not None else 4, k_max)
        self._warmup = warmup_rounds
        self._successes = _Ewma()  # i.i.d. maximum likelihood: accepted tokens ...
        self._trials = _Ewma()  # ... over accepted tokens + failed rounds
        self._reached: list[_Ewma] = []  # per block position: rounds that drafted it
        self._taken: list[_Ewma] = []  # ... and accepted it, given all before it were
        self._t_draft = _Ewma()  # exposed draft time per drafted token
        self._fixed = _Ewma()  # wall time of a round minus its per-token part
        # Weighted least squares of verify time against block width n = k + 1.
        self._n, self._v, self._nn, self._nv, self._w = 0.0, 0.0, 0.0, 0.0, 0.0
        self.rounds = 0

    @property
    def alpha(self) -> float:
        return self._successes.value / self._trials.value if self._trials.value else 0.5

    def conditional_acceptance(self) -> list[float]:
        """c_i for i in [0, k_max): measured per position, shrunk towards the i.i.d. alpha."""
        alpha = min(max(self.alpha, MIN_ALPHA), MAX_ALPHA)
        rates = []
        for i in range(self.k_max):
            taken = self._taken[i].value if i < len(self._taken) else 0.0
            reached = self._reached[i].value if i < len(self._reached) else 0.0
            rates.append((taken + PRIOR_ROUNDS * alpha) / (reached + PRIOR_ROUNDS))
        return rates

    def verify_model(self) -> tuple[float, float]:
        """(v0, v1) of t_verify(n) = v0 + v1 * n; v1 >= 0, flat until two widths were seen."""
        if self._w == 0:
            return 0.0, 0.0
        mean_n, mean_v = self._n / self._w, self._v / self._w
        var_n = self._nn / self._w - mean_n**2
        if var_n < 1e-6:
            return mean_v, 0.0
        slope = max(0.0, (self._nv / self._w - mean_n * mean_v) / var_n)
        return mean_v - slope * mean_n, slope

    def cost_model(self) -> tuple[float, float]:
        """(c0, c1) of T(k) = c0 + c1 * k, in ns."""
        c1 = self._t_draft.mean + self.verify_model()[1]
        return max(self._fixed.mean, 1.0), c1

    def observe(self, report: RoundReport) -> None:
        self.rounds += 1
        k = report.proposed
        if k:
            failed = 1.0 if report.accepted < k else 0.0
            self._successes.add(report.accepted)
            self._trials.add(report.accepted + failed)
            self._t_draft.add(report.draft_ns / k)
            self._observe_positions(k, report.accepted)
        n = k + 1
        for name, x in (("_n", n), ("_v", report.verify_ns), ("_nn", n * n)):
            setattr(self, name, DECAY * getattr(self, name) + x)
        self._nv = DECAY * self._nv + n * report.verify_ns
        self._w = DECAY * self._w + 1
        # Unknown wall time (a report rebuilt elsewhere): the sum of the measured parts.
        wall = report.wall_ns or (
            report.draft_ns + report.verify_ns + report.network_ns + report.queue_ns
        )
        self._fixed.add(wall - (self._t_draft.mean + self.verify_model()[1]) * k)
        if self.rounds >= self._warmup and self._t_draft.weight:
            self.k = self.choose()

    def _observe_positions(self, k: int, accepted: int) -> None:
        while len(self._reached) < k:
            self._reached.append(_Ewma())
            self._taken.append(_Ewma())
        # Position i was reached if every token before it was accepted.
        for i in range(min(k, accepted + 1)):
            self._reached[i].add(1.0)
            self._taken[i].add(1.0 if i < accepted else 0.0)

    def choose(self) -> int:
        """argmax over [1, k_max] of E(k) / T(k) (never 0: keep measuring acceptance)."""
        rates = self.conditional_acceptance()
        c0, c1 = self.cost_model()
        return max(
            range(1, self.k_max + 1),
            key=lambda k: (expected_tokens_by_position(rates, k) / (c0 + c1 * k), -k),
        )

    def next_k(self) -> int:
        return self.k

    def fork(self, k_max: int) -> AdaptiveK:
        """A policy for a new turn that starts from what this one learnt (see module doc)."""
        child = copy.deepcopy(self)
        child.k_max = k_max
        factor = min(1.0, FORK_ROUNDS / max(self._w, 1e-9))
        estimates = [child._successes, child._trials, child._t_draft, child._fixed]
        for estimate in [*estimates, *child._reached, *child._taken]:
            estimate.scale(factor)
        for name in ("_n", "_v", "_nn", "_nv", "_w"):
            setattr(child, name, getattr(child, name) * factor)
        child.rounds = child._warmup if self._t_draft.weight else 0
        child.k = child.choose() if self._t_draft.weight else min(self.k, k_max)
        return child


class AdaptiveMemory:
    """What earlier turns learnt, per key (a drafter and oracle pair): new turns fork it."""

    MAX_KEYS = 256

    def __init__(self) -> None:
        self._last: dict[str, AdaptiveK] = {}

    def policy(self, key: str, k_max: int) -> AdaptiveK:
        """A policy for a new turn: a fork of the last finished one under ``key``, or fresh."""
        last = self._last.get(key)
        return last.fork(k_max) if last is not None else AdaptiveK(k_max)

    def remember(self, key: str, policy: AdaptiveK) -> None:
        """``policy``'s turn has ended; later turns under ``key`` start from it."""
        if not policy.rounds:
            return
        self._last.pop(key, None)
        self._last[key] = policy
        while len(self._last) > self.MAX_KEYS:
            del self._last[next(iter(self._last))]
