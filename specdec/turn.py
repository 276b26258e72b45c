"""One turn of speculative decoding over any transport: its rounds, types and timing.

The draft service (model drafter, oracle over gRPC), the gateway (oracle
alone or n-gram, oracle over gRPC) and the in-process loop run the same loop
(``specdec.round_loop.run_turn``); only the ``OracleLink`` differs. A round is:

    block   = propose(committed, k)                 # k drafted tokens (k may be 0)
    verdict = verify(len(committed), block)         # one oracle forward over k+1 positions
    new     = block[:verdict.num_accepted] + [verdict.next_token]
    keep    = stop.feed(new)                        # cut exactly where the oracle alone stops
    committed += new[:keep]

Timing of a round as the drafting side sees it: the round trip is measured
from sending the block to receiving the verdict; network = round trip -
verify compute - queueing at the oracle. With pipelining (see round_loop.py) a
block's round trip starts when the oracle could start on it: at the previous verdict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from specdec.drafters import BranchingDrafter, Drafter
from specdec.drafters.branches import Branch, BranchTicket, full_acceptance_branch
from specdec.errors import InvalidArgument
from specdec.sampling import SamplingParams
from specdec.stopping import StopChecker
from specdec.verifier import MAX_SPECULATIVE_TOKENS, DraftBlock, Verdict


@dataclass(frozen=True)
class OpenResult:
    """The oracle's answer to opening a turn: how much of the context it had cached."""

    cached_tokens: int
    computed_tokens: int
    prefill_ns: int
    oracle_id: str = ""


@dataclass(frozen=True)
class VerifyResult:
    """A verdict and what it cost at the oracle; ``verdict`` None: the block was skipped.

    Only a pipelined block (one sent with assumed tokens) can be skipped: its
    assumption about the verdict before it did not hold, so it was not verified.
    ``decision`` (recovery, see ``Recovery``): set when no block extends the verdict
    yet; it gets the oracle's own block for what follows, or None.
    """

    verdict: Verdict | None
    committed_length: int
    verify_ns: int
    queue_ns: int = 0
    decision: asyncio.Future[Recovery | None] | None = None


@dataclass(frozen=True)
class Recovery:
    """A block the oracle drafted itself after a verdict that no block sent extended.

    A miss (no block drafted ahead fits the verdict) would otherwise leave the oracle
    idle for a round trip plus a fresh draft. With a recovery draft (a copy of a
    small draft model) the oracle drafts ``block`` after the verdict and verifies it
    next; ``result`` gets that verdict. The verdict itself goes out at once, marked
    as awaiting this decision, so the draft keeps drafting ahead meanwhile; told of
    ``block``, it drafts ahead after it as after a block of its own. Lossless like
    any block: the oracle verifies it.
    """

    block: DraftBlock
    result: asyncio.Future[VerifyResult]


class OracleLink(Protocol):
    """How the loop reaches an oracle (in process, or a gRPC Verify stream)."""

    async def open(self, tokens: list[int], params: SamplingParams, seed: int) -> OpenResult: ...

    async def verify(
        self,
        round_index: int,
        base_length: int,
        block: DraftBlock,
        draft_ns: int,
        assumed: tuple[int, ...] = (),
        last_alternative: bool = False,
    ) -> VerifyResult:
        """Verify ``block`` after the first ``base_length`` tokens.

        ``assumed``: the last of those tokens, not yet committed when the block was
        sent (pipelining); the oracle skips the block (verdict None) if they were not.
        ``last_alternative``: no more blocks follow for the verdict it assumes.
        Calls may overlap; the oracle answers them in the order they were made.
        """
        ...


class Proposer(Protocol):
    """An async drafter: the Drafter interface with propose awaitable (run off the loop)."""

    async def propose(self, context: list[int], k: int, params: SamplingParams) -> DraftBlock: ...

    async def branch(
        self,
        context: list[int],
        block: DraftBlock,
        k: int,
        params: SamplingParams,
        width: int,
        ticket: BranchTicket | None = None,
    ) -> list[Branch]:
        """Blocks drafted ahead for the likely outcomes of verifying ``block`` after
        ``context`` (see ``specdec.drafters.branches``); full acceptance first.
        Cancelling ``ticket`` stops the drafting at its next step."""
        ...

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
    pipelined: bool = False  # ... and sent before that verification's verdict came back
    branch: bool = False  # ... for a guessed correction of that block, not its full acceptance
    skipped_blocks: int = 0  # blocks sent ahead that this round's verdict made stale
    wall_ns: int = 0  # since the previous verdict (the first round: since the open)
    recovered: bool = False  # the oracle drafted the block itself (a ``Recovery``)

    @property
    def block_origin(self) -> str:
        """How the block was drafted: fresh (after the previous verdict), ahead (during
        its verification), piped (and sent before it), branch (for a guessed correction),
        branch+piped, recovery (by the oracle, after a verdict no block extended)."""
        if self.recovered:
            return "recovery"
        if self.branch:
            return "branch+piped" if self.pipelined else "branch"
        if self.pipelined:
            return "piped"
        return "ahead" if self.drafted_ahead else "fresh"


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
    pipelined_rounds: int = 0  # ... and sent before the previous verdict came back
    branch_rounds: int = 0  # ... drafted for a guessed correction, not a full acceptance
    recovered_rounds: int = 0  # rounds whose block the oracle drafted (``Recovery``)
    skipped_blocks: int = 0  # blocks sent ahead of a verdict that proved them stale
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    prefill_ns: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    network_ns: int = 0
    queue_ns: int = 0  # waiting at the oracle for its model thread
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
        self.pipelined_rounds += int(report.pipelined)
        self.branch_rounds += int(report.branch)
        self.recovered_rounds += int(report.recovered)
        self.skipped_blocks += report.skipped_blocks
        self.output_tokens += report.committed
        self.draft_ns += report.draft_ns
        self.verify_ns += report.verify_ns
        self.network_ns += report.network_ns
        self.queue_ns += report.queue_ns
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

    ``round_started`` comes as the round's block is sent (after ``draft_ns`` of
    waiting for the drafter), ``round_finished`` once the verdict is in and the round
    is folded into the stats, ``round_skipped`` instead when a pipelined block proved
    stale or the turn ended before its verdict. With pipelining rounds overlap.
    """

    def round_started(self, round_index: int, k: int, draft_ns: int) -> None: ...

    def round_finished(self, report: RoundReport) -> None: ...

    def round_skipped(self, round_index: int) -> None: ...


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
    # Blocks in flight at once (needs draft_ahead): 2 sends the block drafted ahead
    # before the verdict it depends on, hiding the round trip when the guess is right.
    pipeline_depth: int = 1
    # Greedy only (needs draft_ahead): besides the full acceptance, draft ahead for this
    # many likely corrections of each block in flight (specdec.drafters.branches), so
    # that a rejection, too, finds its next block drafted (and, pipelined, sent).
    branches: int = 0


def check_k(k: int) -> None:
    if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise InvalidArgument(
            f"k (num_speculative_tokens) must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}"
        )


class InlineProposer:
    """A cheap drafter (n-gram) run on the event loop itself."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter

    async def propose(self, context: list[int], k: int, params: SamplingParams) -> DraftBlock:
        return self.drafter.propose(context, k, params)

    async def branch(
        self,
        context: list[int],
        block: DraftBlock,
        k: int,
        params: SamplingParams,
        width: int,
        ticket: BranchTicket | None = None,
    ) -> list[Branch]:
        return branch_ahead(self.drafter, context, block, k, params, width, ticket)

    def update(self, num_accepted: int) -> None:
        self.drafter.update(num_accepted)


class ThreadProposer(InlineProposer):
    """A model drafter run in an executor, so the event loop keeps serving other streams.

    The executor must run one job at a time, in the order they were submitted (one
    thread): a proposal asked for after a cancelled ``branch`` then runs after it, on
    the drafter's cache as that left it.
    """

    def __init__(self, drafter: Drafter, executor: Executor) -> None:
        super().__init__(drafter)
        self._executor = executor

    async def propose(self, context: list[int], k: int, params: SamplingParams) -> DraftBlock:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.drafter.propose, context, k, params)

    async def branch(
        self,
        context: list[int],
        block: DraftBlock,
        k: int,
        params: SamplingParams,
        width: int,
        ticket: BranchTicket | None = None,
    ) -> list[Branch]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, branch_ahead, self.drafter, context, block, k, params, width, ticket
        )


def branch_ahead(
    drafter: Drafter,
    context: list[int],
    block: DraftBlock,
    k: int,
    params: SamplingParams,
    width: int,
    ticket: BranchTicket | None = None,
) -> list[Branch]:
    """What ``drafter`` drafts ahead of ``block``'s verdict: its branches if it has any,
    else the full-acceptance branch only; nothing once ``ticket`` is cancelled."""
    if ticket is not None and ticket.cancelled:  # dropped while it waited for the thread
        return []
    if isinstance(drafter, BranchingDrafter):
        return drafter.branch(context, block, k, params, width, ticket)
    return full_acceptance_branch(drafter, context, block, k, params, ticket)
