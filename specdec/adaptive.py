"""Adaptive draft length: pick k per round to maximise expected tokens per second.

Leviathan et al. 2023 (arXiv 2211.17192), with per-token acceptance rate a and
a block of k drafted tokens, expect

    E(k) = (1 - a^(k+1)) / (1 - a)          tokens committed per round

and, extended with the network round trip of a remote oracle, a round costs

    T(k) = k * t_draft + t_verify(k+1) + rtt

so the policy picks k = argmax E(k) / T(k) over [0, k_max] (k = 0: E = 1, no
drafting). a, t_draft, t_verify and rtt are exponentially weighted estimates
from the session's own rounds; t_verify(n) = v0 + v1 * n is fitted because a
wider block costs more on a GPU that is not overhead-bound.

a is estimated by maximum likelihood under the i.i.d. model: a round that
accepted m of k tokens contributes m successes and, if m < k, one failure;
so a = successes / (successes + failures).
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.turn import RoundReport

DECAY = 0.9  # weight of the past in every estimate, per round
MIN_ALPHA, MAX_ALPHA = 0.01, 0.99


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - a^(k+1)) / (1 - a): accepted tokens plus the one correction/bonus."""
    alpha = min(max(alpha, MIN_ALPHA), MAX_ALPHA)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def round_time(k: int, t_draft: float, v0: float, v1: float, rtt: float) -> float:
    """T(k) = k * t_draft + t_verify(k+1) + rtt, in any time unit."""
    return k * t_draft + v0 + v1 * (k + 1) + rtt


def best_k(alpha: float, t_draft: float, v0: float, v1: float, rtt: float, k_max: int) -> int:
    """argmax_k E(k) / T(k) over [0, k_max] (ties go to the smaller k)."""
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

    @property
    def mean(self) -> float:
        return self.value / self.weight if self.weight else 0.0


class AdaptiveK:
    """A ``KPolicy``: starts at ``k_start`` and follows argmax E(k)/T(k) once it has data."""

    def __init__(self, k_max: int, k_start: int | None = None, warmup_rounds: int = 2) -> None:
        self.k_max = k_max
        self.k = min(k_start if k_start is not None else 4, k_max)
        self._warmup = warmup_rounds
        self._successes = _Ewma()
        self._trials = _Ewma()
        self._t_draft = _Ewma()
        self._rtt = _Ewma()
        # Weighted least squares of verify time against block width n = k + 1.
        self._n, self._v, self._nn, self._nv, self._w = 0.0, 0.0, 0.0, 0.0, 0.0
        self.rounds = 0

    @property
    def alpha(self) -> float:
        return self._successes.value / self._trials.value if self._trials.value else 0.5

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

    def observe(self, report: RoundReport) -> None:
        self.rounds += 1
        if report.proposed:
            failed = 1.0 if report.accepted < report.proposed else 0.0
            self._successes.add(report.accepted)
            self._trials.add(report.accepted + failed)
            self._t_draft.add(report.draft_ns / report.proposed)
        self._rtt.add(report.network_ns + report.queue_ns)
        n = report.proposed + 1
        for name, x in (("_n", n), ("_v", report.verify_ns), ("_nn", n * n)):
            setattr(self, name, DECAY * getattr(self, name) + x)
        self._nv = DECAY * self._nv + n * report.verify_ns
        self._w = DECAY * self._w + 1
        if self.rounds >= self._warmup and self._t_draft.weight:
            v0, v1 = self.verify_model()
            self.k = best_k(self.alpha, self._t_draft.mean, v0, v1, self._rtt.mean, self.k_max)
            # Never settle at 0 for long: keep a probe of 1 so acceptance stays measured.
            self.k = max(self.k, 1)

    def next_k(self) -> int:
        return self.k
