"""The speculation controller: pick k per round, k = 0 included, for the most tokens per second.

Leviathan et al. 2023 (arXiv 2211.17192), with per-token acceptance rate a and
a block of k drafted tokens, expect

    E(k) = (1 - a^(k+1)) / (1 - a)          tokens committed per round

and, extended with the network round trip of a remote oracle, a round costs

    T(k) = k * t_draft + t_verify(k+1) + rtt

so the controller picks k = argmax E(k) / T(k) over [0, k_max], k = 0 being the
oracle alone's plain step (nothing drafted, nothing drafted ahead, no rescue).
Three refinements make the choice hold up on real text and real services:

* Acceptance is not i.i.d.: easy stretches (boilerplate, code) are accepted in
  long runs, hard ones fail early. E(k) is taken from the measured acceptance
  *per block position*, c_i = P(token i accepted | tokens 0..i-1 were),

      E(k) = 1 + c_0 + c_0 c_1 + ... + c_0 ... c_(k-1)

  with the i.i.d. maximum-likelihood a as the prior of every c_i (a round that
  accepted m of k tokens gives m successes and, if m < k, one failure).
* A round's cost depends on whether its block was *ready* when the verdict before
  it came (drafted ahead, during that verification, for the outcome it turned out
  to be: a hit) or had to be drafted after it (a miss: drafted fresh, or rescued by
  the oracle's own draft). Each kind is fitted to the measured wall time of its
  rounds, T_kind(k) = c0 + c1 k: c1 = the exposed draft time per token of that kind
  + the slope of t_verify(n) = v0 + v1 n over blocks (n >= 2: on a CPU a second row
  costs a third of a row alone, each further one far less), c0 = the mean of
  (wall - c1 k). The next block is ready with probability

      P_ready(k) = P_full(k) g_full + (1 - P_full(k)) g_part,   P_full(k) = c_0 ... c_(k-1)

  g_full (g_part) being the measured share of rounds after a fully accepted (a
  rejected) block whose block was ready: the bonus guess (a branch, for a
  correction) came true. So for k >= 1

      T(k) = P_ready(k) T_hit(k) + (1 - P_ready(k)) T_miss(k)

  and whatever a miss wastes (drafting ahead for nothing, which slows the oracle on
  shared cores; branches; the rescue draft; the verification of k + 1 rows) is in
  these wall times. T(0) is the wall time of rounds that drafted nothing, measured
  in such rounds; until there are some, the misses' c0, which also pays for catching
  the draft up and for verifying a second row (on a CPU that costs a third of a
  row alone more than each row after it): an estimate that errs towards speculating.
  While speculating and unsure (1 / T(0) would win were T(0) up to ``UNSURE`` times
  smaller) without a measured T(0), the controller takes a plain step at once, then
  one every ``EXPLORE_EVERY`` rounds until it has a measurement.
* Not speculating is a state, left only on evidence. Speculation stops when
  1 / T(0) beats the best E(k) / T(k) by ``HYSTERESIS``, and resumes when the
  best E(k) / T(k) beats 1 / T(0) by as much just after an accepted probe (the
  costs of drafting are not measured meanwhile: a load that slows the plain steps
  alone must not bring back a draft whose tokens are still all rejected).
  Speculation also stops when the best block is expected to commit less than
  ``NOTHING_TO_GAIN`` more tokens than a plain step, whatever its measured cost:
  misses the oracle's rescue blocks follow at once cost about a plain step each, so
  the costs alone would keep a useless draft (and the rescue drafting) going.
  Meanwhile the controller probes: one
  block of ``PROBE_K`` token(s) every ``probe_every`` plain rounds, drafted fresh
  (nothing is drafted ahead or branched while not speculating). The interval
  doubles from ``PROBE_MIN`` to ``PROBE_MAX`` while probes are rejected and falls
  back to ``PROBE_MIN`` when one is accepted, and the acceptance evidence fades by
  ``FADE`` per plain round, so that a few accepted probes (a boilerplate stretch)
  bring speculation back.

Every estimate is an exponentially weighted mean over the session's rounds.
``fork`` starts a new turn from what earlier turns learnt (costs barely change
between turns of one draft-oracle pair), down-weighted so the new turn's own
rounds soon dominate; it keeps whether the pair was speculating, so a draft that
does not pay costs later turns only their probes. T(0) is inherited whole: a plain
step costs what it did, and a turn that had to measure it again (``KNOWN``) would
spend a plain step, and the drafting ahead it breaks, on every turn.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from specdec.core.types import RoundReport

DECAY = 0.9  # weight of the past in every estimate, per round
MIN_ALPHA, MAX_ALPHA = 0.01, 0.99
PRIOR_ROUNDS = 2.0  # pseudo-rounds of the i.i.d. prior behind each position's acceptance
FORK_ROUNDS = 4.0  # what a new turn inherits weighs at most this many rounds
HYSTERESIS = 0.05  # speculating and not must beat each other by this much to take over
PROBE_K = 1  # tokens of a probe while not speculating
PROBE_MIN, PROBE_MAX = 4, 32  # plain rounds between probes: after an accepted one, at most
FADE = 0.97  # weight the acceptance evidence keeps per plain round while not speculating
UNSURE = 1.0  # T(0) may be this much below its estimate before it is measured
EXPLORE_EVERY = 16  # rounds between plain steps taken to measure T(0), while unsure
KNOWN = 0.25  # weight of the measured T(0) below which it counts as unknown
NOTHING_TO_GAIN = 0.1  # E(k) below 1 + this: a block commits about what a plain step does
MAX_ROW_SHARE = 0.25  # a further row of a block costs at most this share of its mean row


_Key = TypeVar("_Key", bound=Hashable)


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


@dataclass
class _RoundCost:
    """T(k) = c0 + c1 k for one kind of round (a hit or a miss), from its wall times."""

    draft: _Ewma  # exposed draft time per drafted token
    fixed: _Ewma  # wall time minus the per-token part

    def observe(self, k: int, wall_ns: float, draft_ns: float, verify_slope: float) -> None:
        self.draft.add(draft_ns / k)
        self.fixed.add(wall_ns - (self.draft.mean + verify_slope) * k)

    def model(self, verify_slope: float) -> tuple[float, float]:
        """(c0, c1) in ns."""
        return max(self.fixed.mean, 1.0), self.draft.mean + verify_slope

    def estimates(self) -> list[_Ewma]:
        return [self.draft, self.fixed]


def _cost() -> _RoundCost:
    return _RoundCost(_Ewma(), _Ewma())


class AdaptiveK:
    """A ``KPolicy``: starts at ``k_start`` and follows argmax E(k)/T(k), k = 0 included,
    once it has data (see the module doc)."""

    def __init__(self, k_max: int, k_start: int | None = None, warmup_rounds: int = 2) -> None:
        self.k_max = k_max
        self.k = min(k_start if k_start is not None else 4, k_max)
        self._warmup = warmup_rounds
        self._successes = _Ewma()  # i.i.d. maximum likelihood: accepted tokens ...
        self._trials = _Ewma()  # ... over accepted tokens + failed rounds
        self._reached: list[_Ewma] = []  # per block position: rounds that drafted it
        self._taken: list[_Ewma] = []  # ... and accepted it, given all before it were
        self._hit = _cost()  # rounds whose block was drafted ahead, for their verdict
        self._miss = _cost()  # ... drafted after it (by the draft or the oracle's rescue)
        self._alone = _Ewma()  # wall time of rounds that drafted nothing
        # P(the next round's block is ready | this block was fully accepted / rejected).
        self._ready_after_full = _Ewma()
        self._ready_after_part = _Ewma()
        self._last_full: bool | None = None  # the last speculating round's outcome
        # Weighted least squares of verify time against block width n = k + 1.
        self._n, self._v, self._nn, self._nv, self._w = 0.0, 0.0, 0.0, 0.0, 0.0
        self.rounds = 0
        self.alone_rounds = 0  # rounds that drafted nothing
        self._speculating = True
        self._since_probe = 0
        self.probe_every = PROBE_MIN
        self._probe_accepted = False  # the last probe had a token accepted
        self._explore = False  # the next round is a plain step, to measure T(0)
        self._since_explore = EXPLORE_EVERY  # the first time unsure: at once

    # -- estimates -----------------------------------------------------------------

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
        """(v0, v1) of t_verify(n) = v0 + v1 * n over blocks; flat until two widths were
        seen, and 0 <= v1 <= ``MAX_ROW_SHARE`` * t_verify(n) / n at the mean n: a busy
        machine makes the verify times noisy, and a slope fitted over the few widths
        one policy uses swings with them."""
        if self._w == 0:
            return 0.0, 0.0
        mean_n, mean_v = self._n / self._w, self._v / self._w
        var_n = self._nn / self._w - mean_n**2
        if var_n < 1e-6:
            return mean_v, 0.0
        slope = (self._nv / self._w - mean_n * mean_v) / var_n
        slope = min(max(0.0, slope), MAX_ROW_SHARE * mean_v / mean_n)
        return mean_v - slope * mean_n, slope

    def cost_model(self) -> tuple[float, float]:
        """(c0, c1) of a round whose block is drafted after the verdict before it (a
        miss; a hit's where no miss was seen yet), in ns."""
        kind = self._miss if self._miss.fixed.weight or not self._hit.fixed.weight else self._hit
        return kind.model(self.verify_model()[1])

    def round_cost(self, k: int, full: float) -> float:
        """T(k) in ns for k >= 1, ``full`` = P(all k accepted): the hit and miss costs
        weighted by the chance that the next block is ready."""
        slope = self.verify_model()[1]
        miss = self.cost_model()
        if not self._hit.fixed.weight:
            return miss[0] + miss[1] * k
        hit = self._hit.model(slope)
        after_full = self._ready_after_full.mean if self._ready_after_full.weight else 0.0
        after_part = self._ready_after_part.mean if self._ready_after_part.weight else 0.0
        ready = full * after_full + (1 - full) * after_part
        if not self._miss.fixed.weight:
            ready = 1.0
        return ready * (hit[0] + hit[1] * k) + (1 - ready) * (miss[0] + miss[1] * k)

    def plain_cost(self) -> float:
        """T(0) in ns: measured in rounds that drafted nothing, else the misses' c0."""
        return self._alone.mean if self._alone.weight else self.cost_model()[0]

    def rates(self) -> list[float]:
        """E(k) / T(k) in tokens per ns for k in [0, k_max]."""
        conditional = self.conditional_acceptance()
        rates = [1.0 / max(self.plain_cost(), 1.0)]
        full = 1.0
        for k in range(1, self.k_max + 1):
            full *= conditional[k - 1]
            tokens = expected_tokens_by_position(conditional, k)
            rates.append(tokens / max(self.round_cost(k, full), 1.0))
        return rates

    # -- observing -----------------------------------------------------------------

    def observe(self, report: RoundReport) -> None:
        self.rounds += 1
        k = report.proposed
        if k:  # T(0) is measured whole: the slope is that of blocks (n >= 2 rows)
            n = k + 1
            for name, x in (("_n", n), ("_v", report.verify_ns), ("_nn", n * n)):
                setattr(self, name, DECAY * getattr(self, name) + x)
            self._nv = DECAY * self._nv + n * report.verify_ns
            self._w = DECAY * self._w + 1
        # Unknown wall time (a report rebuilt elsewhere): the sum of the measured parts.
        wall = report.wall_ns or (
            report.draft_ns + report.verify_ns + report.network_ns + report.queue_ns
        )
        if k == 0:
            self._observe_alone(wall)
        else:
            self._observe_block(report, k, wall)
        if self.rounds >= self._warmup and (self._miss.fixed.weight or self._hit.fixed.weight):
            self._decide()

    def _observe_alone(self, wall: float) -> None:
        self.alone_rounds += 1
        self._alone.add(wall)
        self._explore, self._since_explore = False, 0
        self._last_full = None  # the next block cannot have been drafted ahead
        if not self._speculating:
            self._since_probe += 1
            for estimate in self._acceptance():
                estimate.scale(FADE)

    def _observe_block(self, report: RoundReport, k: int, wall: float) -> None:
        self._since_explore += 1
        accepted = report.accepted
        failed = 1.0 if accepted < k else 0.0
        self._successes.add(accepted)
        self._trials.add(accepted + failed)
        self._observe_positions(k, accepted)
        ready = report.drafted_ahead
        if self._last_full is not None:
            after = self._ready_after_full if self._last_full else self._ready_after_part
            after.add(float(ready))
        kind = self._hit if ready else self._miss
        kind.observe(k, wall, report.draft_ns, self.verify_model()[1])
        if self._speculating:
            self._last_full = accepted == k
        else:  # a probe: drafted fresh, nothing ahead of it or after it
            self._last_full = None
            self._since_probe = 0
            self._probe_accepted = accepted > 0
            self.probe_every = PROBE_MIN if accepted else min(2 * self.probe_every, PROBE_MAX)

    def _observe_positions(self, k: int, accepted: int) -> None:
        while len(self._reached) < k:
            self._reached.append(_Ewma())
            self._taken.append(_Ewma())
        # Position i was reached if every token before it was accepted.
        for i in range(min(k, accepted + 1)):
            self._reached[i].add(1.0)
            self._taken[i].add(1.0 if i < accepted else 0.0)

    def _acceptance(self) -> list[_Ewma]:
        return [self._successes, self._trials, *self._reached, *self._taken]

    # -- choosing ------------------------------------------------------------------

    def _decide(self) -> None:
        rates = self.rates()
        best = max(range(1, self.k_max + 1), key=lambda k: (rates[k], -k), default=0)
        if not best:
            return
        self.k = best
        plain, drafting = rates[0], rates[best]
        gain = expected_tokens_by_position(self.conditional_acceptance(), best) - 1
        if not self._speculating:
            self._speculating = (
                self._probe_accepted
                and gain >= NOTHING_TO_GAIN
                and drafting > (1 + HYSTERESIS) * plain
            )
            self._probe_accepted = False
        elif plain > (1 + HYSTERESIS) * drafting or gain < NOTHING_TO_GAIN:
            self._speculating, self._since_probe = False, 0
            self.probe_every = PROBE_MIN
        elif self._alone.weight < KNOWN and (1 + UNSURE) * plain > drafting:
            self._explore = self._since_explore >= EXPLORE_EVERY

    def choose(self) -> int:
        """argmax over [0, k_max] of E(k) / T(k) (without the hysteresis of ``next_k``)."""
        rates = self.rates()
        return max(range(self.k_max + 1), key=lambda k: (rates[k], -k))

    def speculating(self) -> bool:
        """False while plain steps pay better than drafting: only probes are drafted."""
        return self._speculating

    def next_k(self) -> int:
        if self._speculating:
            return 0 if self._explore else self.k
        return min(PROBE_K, self.k_max) if self._since_probe >= self.probe_every else 0

    def fork(self, k_max: int) -> AdaptiveK:
        """A policy for a new turn that starts from what this one learnt (see module doc)."""
        child = copy.deepcopy(self)
        child.k_max = k_max
        factor = min(1.0, FORK_ROUNDS / max(self._w, 1e-9))
        estimates = [
            *child._acceptance(),
            *child._hit.estimates(),
            *child._miss.estimates(),
            child._ready_after_full,
            child._ready_after_part,
        ]
        for estimate in estimates:
            estimate.scale(factor)
        for name in ("_n", "_v", "_nn", "_nv", "_w"):
            setattr(child, name, getattr(child, name) * factor)
        learnt = bool(self._miss.fixed.weight or self._hit.fixed.weight)
        child.rounds = child._warmup if learnt else 0
        child.alone_rounds = 0
        child._last_full = None
        child._explore = False
        child.k = min(self.k, k_max)
        if learnt:
            child._decide()
        return child


class AdaptiveMemory:
    """What earlier turns learnt, per key (a drafter and oracle pair) and per session:
    a new turn forks its session's last turn under the key, else the key's last turn."""

    MAX_KEYS = 256
    MAX_SESSIONS = 1024

    def __init__(self) -> None:
        self._last: OrderedDict[str, AdaptiveK] = OrderedDict()
        self._sessions: OrderedDict[tuple[str, str], AdaptiveK] = OrderedDict()

    def policy(self, key: str, k_max: int, session_id: str = "") -> AdaptiveK:
        """A policy for a new turn: a fork of the last finished one, or a fresh one."""
        last = self._sessions.get((key, session_id)) if session_id else None
        last = last or self._last.get(key)
        return last.fork(k_max) if last is not None else AdaptiveK(k_max)

    def remember(self, key: str, policy: AdaptiveK, session_id: str = "") -> None:
        """``policy``'s turn has ended; later turns under ``key`` start from it."""
        if not policy.rounds:
            return
        _put(self._last, key, policy, self.MAX_KEYS)
        if session_id:
            _put(self._sessions, (key, session_id), policy, self.MAX_SESSIONS)


class DraftTurns:
    """Across turns, per draft-oracle pair: whether an adaptive turn goes to the draft.

    Inside a turn the controller's plain step still travels oracle -> draft -> oracle (the
    draft owns the turn), one hop more than the oracle alone's turn, which the gateway
    runs on its own link. So when a pair's last draft turn committed under
    1 + NOTHING_TO_GAIN tokens a round over at least MIN_ROUNDS rounds (drafting did not
    pay), its next adaptive turns run as the oracle alone at the gateway, and every
    PROBE_TURNS-th goes back to the draft, whose controller probes from where it stopped.
    """

    MIN_ROUNDS = 16
    PROBE_TURNS = 8
    MAX_PAIRS = 256

    def __init__(self) -> None:
        self._plain: OrderedDict[str, int] = OrderedDict()  # pair -> plain turns since

    def use_draft(self, pair: str) -> bool:
        """Whether the pair's next adaptive turn goes to the draft (counts it if not)."""
        since = self._plain.get(pair)
        if since is None or since + 1 >= self.PROBE_TURNS:
            return True
        self._plain[pair] = since + 1
        return False

    def record(self, pair: str, rounds: int, tokens: int) -> None:
        """A draft turn of the pair ended after ``rounds`` rounds committing ``tokens``."""
        if rounds < self.MIN_ROUNDS:
            return
        self._plain.pop(pair, None)
        if tokens < (1 + NOTHING_TO_GAIN) * rounds:
            self._plain[pair] = 0
            while len(self._plain) > self.MAX_PAIRS:
                self._plain.popitem(last=False)


def _put(table: OrderedDict[_Key, AdaptiveK], key: _Key, policy: AdaptiveK, limit: int) -> None:
    """Store ``policy`` as the newest entry of an LRU ``table`` of at most ``limit``."""
    table.pop(key, None)
    table[key] = policy
    while len(table) > limit:
        table.popitem(last=False)
