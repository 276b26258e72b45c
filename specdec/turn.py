"""One turn of speculative decoding over any transport: draft, verify, commit, repeat.

The draft service (model drafter, oracle over gRPC), the gateway (oracle
alone or n-gram, oracle over gRPC) and the in-process loop run this same
code; only the ``OracleLink`` differs. A round is:

    block   = propose(committed, k)                 # k drafted tokens (k may be 0)
    verdict = verify(len(committed), block)         # one oracle forward over k+1 positions
    new     = block[:verdict.num_accepted] + [verdict.next_token]
    keep    = stop.feed(new)                        # cut exactly where the oracle alone stops
    committed += new[:keep]

Timing of a round as the drafting side sees it: the round trip is measured
from sending the block to receiving the verdict; network = round trip -
verify compute - queueing at the oracle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from specdec.drafters import Drafter
from specdec.errors import InvalidArgument
from specdec.sampling import SamplingParams
from specdec.stopping import FinishReason, StopChecker
from specdec.verifier import MAX_SPECULATIVE_TOKENS, DraftBlock, Verdict, committed_tokens


@dataclass(frozen=True)
class OpenResult:
    """The oracle's answer to opening a turn: how much of the context it had cached."""

    cached_tokens: int
    computed_tokens: int
    prefill_ns: int
    oracle_id: str = ""


@dataclass(frozen=True)
class VerifyResult:
    """A verdict and what it cost at the oracle."""

    verdict: Verdict
    committed_length: int
    verify_ns: int
    queue_ns: int = 0


class OracleLink(Protocol):
    """How the loop reaches an oracle (in process, or a gRPC Verify stream)."""

    async def open(self, tokens: list[int], params: SamplingParams, seed: int) -> OpenResult: ...

    async def verify(
        self, round_index: int, base_length: int, block: DraftBlock, draft_ns: int
    ) -> VerifyResult: ...


class Proposer(Protocol):
    """An async drafter: the Drafter interface with propose awaitable (run off the loop)."""

    async def propose(self, context: list[int], k: int, params: SamplingParams) -> DraftBlock: ...

    def update(self, num_accepted: int) -> None: ...


class KPolicy(Protocol):
    """Chooses the draft length of the next round from what the previous rounds showed."""

    def next_k(self) -> int: ...

    def observe(self, report: RoundReport) -> None: ...


@dataclass(frozen=True)
class RoundReport:
    """One verified round."""

    round: int
    k: int  # tokens asked of the drafter
    proposed: int  # tokens it actually proposed
    accepted: int
    is_bonus: bool
    committed: int  # tokens this round added to the output (after stop truncation)
    committed_length: int  # sequence length after the round
    draft_ns: int
    verify_ns: int
    network_ns: int
    queue_ns: int
    drafted_ahead: bool = False  # the block was drafted during the previous verification


@dataclass
class TurnStats:
    """Totals of one turn; ``add`` folds in a round."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    rejected_rounds: int = 0  # rounds that rejected a drafted token
    ahead_hits: int = 0  # rounds whose block was drafted during the previous verification
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    prefill_ns: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    network_ns: int = 0
    total_ns: int = 0
    time_to_first_token_ns: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)

    def add(self, report: RoundReport) -> None:
        self.rounds += 1
        self.proposed += report.proposed
        self.accepted += report.accepted
        self.rejected_rounds += int(report.accepted < report.proposed)
        self.ahead_hits += int(report.drafted_ahead)
        self.output_tokens += report.committed
        self.draft_ns += report.draft_ns
        self.verify_ns += report.verify_ns
        self.network_ns += report.network_ns
        grow = report.proposed - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(report.proposed):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += int(i < report.accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


OnCommit = Callable[[list[int], RoundReport], Awaitable[None]]
OnOpen = Callable[[OpenResult], Awaitable[None]]


class RoundObserver(Protocol):
    """Optional hooks around each round (tracing): called on the event loop, must be cheap.

    ``round_started`` comes just before the drafter is asked for k tokens,
    ``round_finished`` once the verdict is in and the round is folded into the stats.
    """

    def round_started(self, round_index: int, k: int) -> None: ...

    def round_finished(self, report: RoundReport) -> None: ...


@dataclass
class Turn:
    """Everything one turn needs besides the link and the proposer."""

    context: list[int]  # committed tokens, this turn's prompt included (not mutated)
    prompt_tokens: int
    params: SamplingParams
    seed: int
    k: int
    stop: StopChecker
    max_context: int
    # Draft the next block while this one is being verified (PEARL's post-verify,
    # SpecEdge's proactive drafting): the next block is drafted on the assumption that
    # the whole block is accepted, with one more token as the guess of the bonus; it is
    # used only when that assumption and guess turn out true, so the output is unchanged.
    draft_ahead: bool = False


def check_k(k: int) -> None:
    if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise InvalidArgument(
            f"k (num_speculative_tokens) must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}"
        )


def _round_k(turn: Turn, committed: list[int], produced: int, policy: KPolicy | None) -> int:
    """k for the next round: the policy's choice, never past max_new_tokens or the context.

    Drafting beyond the tokens still allowed is wasted work: the round commits at
    most k+1 tokens, so k = remaining - 1 suffices.
    """
    k = policy.next_k() if policy is not None else turn.k
    remaining = turn.params.max_new_tokens - produced
    room = turn.max_context - len(committed)
    return max(0, min(k, remaining - 1, room - 1))


async def run_turn(
    link: OracleLink,
    proposer: Proposer | None,
    turn: Turn,
    on_commit: OnCommit,
    policy: KPolicy | None = None,
    on_open: OnOpen | None = None,
    observer: RoundObserver | None = None,
) -> tuple[FinishReason, TurnStats]:
    """Run rounds until a stop condition; report each round's new tokens through on_commit."""
    check_k(turn.k)
    start = time.perf_counter_ns()
    committed = list(turn.context)
    stats = TurnStats(prompt_tokens=turn.prompt_tokens)
    opened = await link.open(committed, turn.params, turn.seed)
    stats.cached_tokens, stats.prefilled_tokens = opened.cached_tokens, opened.computed_tokens
    stats.prefill_ns = opened.prefill_ns
    if on_open is not None:
        await on_open(opened)
    produced = 0
    round_index = 0
    ahead: DraftBlock | None = None  # drafted during the last verification, valid for committed
    while True:
        if len(committed) >= turn.max_context:
            return FinishReason.CONTEXT_LIMIT, _finish(stats, start)
        k = _round_k(turn, committed, produced, policy)
        if observer is not None:
            observer.round_started(round_index, k)
        t0 = time.perf_counter_ns()
        from_ahead = ahead is not None and len(ahead) > 0 and k > 0
        if from_ahead:
            assert ahead is not None
            block = ahead
        elif proposer is not None and k > 0:
            block = await proposer.propose(committed, k, turn.params)
        else:
            block = DraftBlock(token_ids=())
        ahead = None
        block = _truncate(block, k)  # a drafter may propose fewer than asked, never more
        t1 = time.perf_counter_ns()
        verifying = asyncio.ensure_future(link.verify(round_index, len(committed), block, t1 - t0))
        drafting = None
        if turn.draft_ahead and proposer is not None and len(block) == k > 0:
            # k + 1 tokens after committed + block: the bonus guess, then the next block.
            context = committed + list(block.token_ids)
            drafting = asyncio.ensure_future(proposer.propose(context, k + 1, turn.params))
        try:
            result = await verifying
        finally:
            rtt = time.perf_counter_ns() - t1
            guess = await drafting if drafting is not None else None
        verdict = result.verdict
        if guess is not None and verdict.is_bonus and guess.token_ids[:1] == (verdict.next_token,):
            ahead = DraftBlock(guess.token_ids[1:], None if guess.q is None else guess.q[1:])
        draft_ns = (t1 - t0) + max(0, time.perf_counter_ns() - t1 - rtt)
        if proposer is not None and len(block):
            proposer.update(verdict.num_accepted)
        new = committed_tokens(block, verdict)
        keep, reason = turn.stop.feed(new)
        committed.extend(new[:keep])
        produced += keep
        report = RoundReport(
            round=round_index,
            k=k,
            proposed=len(block),
            accepted=verdict.num_accepted,
            is_bonus=verdict.is_bonus,
            committed=keep,
            committed_length=len(committed),
            draft_ns=draft_ns,
            verify_ns=result.verify_ns,
            network_ns=max(0, rtt - result.verify_ns - result.queue_ns),
            queue_ns=result.queue_ns,
            drafted_ahead=from_ahead,
        )
        stats.add(report)
        if observer is not None:
            observer.round_finished(report)
        if policy is not None:
            policy.observe(report)
        if round_index == 0:
            stats.time_to_first_token_ns = time.perf_counter_ns() - start
        await on_commit(new[:keep], report)
        round_index += 1
        if reason is not None:
            return reason, _finish(stats, start)


def _truncate(block: DraftBlock, k: int) -> DraftBlock:
    if len(block) <= k:
        return block
    return DraftBlock(block.token_ids[:k], None if block.q is None else block.q[:k])


def _finish(stats: TurnStats, start_ns: int) -> TurnStats:
    stats.total_ns = time.perf_counter_ns() - start_ns
    return stats


class InlineProposer:
    """A cheap drafter (n-gram) run on the event loop itself."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter

    async def propose(self, context: list[int], k: int, params: SamplingParams) -> DraftBlock:
        return self.drafter.propose(context, k, params)

    def update(self, num_accepted: int) -> None:
        self.drafter.update(num_accepted)


class ThreadProposer(InlineProposer):
    """A model drafter run in an executor, so the event loop keeps serving other streams."""

    def __init__(self, drafter: Drafter, executor: Executor) -> None:
        super().__init__(drafter)
        self._executor = executor

    async def propose(self, context: list[int], k: int, params: SamplingParams) -> DraftBlock:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.drafter.propose, context, k, params)
