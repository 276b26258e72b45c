"""The plain round of speculative decoding, over any transport: propose, verify, commit, report.

The draft service (model drafter, oracle over gRPC), the gateway (oracle alone
or n-gram, oracle over gRPC) and the in-process loop run the same loop
(``specdec.core.loop.run_turn``); only the ``OracleLink`` differs. That loop is
this round with strategies layered on it (``ahead``, ``branches``, ``pipeline``,
``rescue``); ``run_plain_turn`` is the round alone. A round is:

    block   = propose(committed, k)                 # k drafted tokens (k may be 0)
    verdict = verify(len(committed), block)         # one oracle forward over k+1 positions
    new     = block[:verdict.num_accepted] + [verdict.next_token]
    keep    = stop.feed(new)                        # cut exactly where the oracle alone stops
    committed += new[:keep]

A round commits n + 1 tokens, n in [0, k]: the accepted prefix and one recovered or
bonus token (``specdec.core.verifier``). With a per-token acceptance rate a (i.i.d.),
E[tokens per round] = sum_{i=0..k} a^i = (1 - a^(k+1)) / (1 - a) (Leviathan et al.
2023, eq. 1). k = 0, or no proposer, is plain decoding through the same verify path.

Timing of a round as the drafting side sees it: the round trip is measured from
sending the block to receiving the verdict; network = round trip - verify
compute - queueing at the oracle. With pipelining (``specdec.core.pipeline``) a
block's round trip starts when the oracle could start on it: at the previous verdict.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from specdec.core.errors import FailedPrecondition
from specdec.core.protocols import KPolicy, OnCommit, OnOpen, OracleLink, Proposer, RoundObserver
from specdec.core.stopping import FinishReason
from specdec.core.types import (
    DraftBlock,
    RoundReport,
    Turn,
    TurnStats,
    VerifyResult,
    check_k,
    committed_tokens,
)


async def run_plain_turn(
    link: OracleLink,
    proposer: Proposer | None,
    turn: Turn,
    on_commit: OnCommit,
    policy: KPolicy | None = None,
    on_open: OnOpen | None = None,
    observer: RoundObserver | None = None,
) -> tuple[FinishReason, TurnStats]:
    """Rounds one after another, no strategy: each block waits for the verdict before it."""
    check_k(turn.k)
    state = TurnState(link, proposer, turn, on_commit, policy, observer)
    await open_turn(state, on_open)
    while len(state.committed) < turn.max_context:
        k = k_for(state, len(state.committed))  # within max_new_tokens and the context
        t0 = time.perf_counter_ns()
        block = await propose(state, k)  # x_1..x_k after the committed tokens c
        draft_ns = time.perf_counter_ns() - t0
        sent = send(state, block, k, draft_ns, start=len(state.committed))
        result = await sent.result  # one oracle forward over c + x_1..x_k: n accepted
        received = time.perf_counter_ns()
        new, keep, reason = fold(state, sent, result)  # x_1..x_n, y; cut at a stop
        await publish(state, new[:keep], report(state, sent, result, keep, received))
        if reason is not None:
            return reason, finish(state)
    return FinishReason.CONTEXT_LIMIT, finish(state)


@dataclass
class TurnState:
    """One turn in progress: whom it talks to, what is committed, what it has counted."""

    link: OracleLink
    proposer: Proposer | None
    turn: Turn
    on_commit: OnCommit
    policy: KPolicy | None = None
    observer: RoundObserver | None = None
    committed: list[int] = field(init=False)
    stats: TurnStats = field(init=False)
    next_round: int = 0
    started_ns: int = 0
    last_verdict_ns: int = 0  # the clock of the rounds: when the last verdict came

    def __post_init__(self) -> None:
        self.committed = list(self.turn.context)
        self.stats = TurnStats(prompt_tokens=self.turn.prompt_tokens)

    def new_round(self) -> int:
        round_index, self.next_round = self.next_round, self.next_round + 1
        return round_index


@dataclass(frozen=True)
class Origin:
    """How a block came to be drafted (``RoundReport.block_origin``): fresh when all False."""

    drafted_ahead: bool = False  # during the verification before its own
    pipelined: bool = False  # ... and sent before that verification's verdict
    branch: bool = False  # ... for a guessed correction of that block
    rescued: bool = False  # by the oracle itself (``specdec.core.rescue``)


FRESH = Origin()


@dataclass(eq=False)
class Sent:
    """A block sent to the oracle whose verdict is not folded in yet.

    It extends committed[:start] + assumed: ``start`` is the committed length when it
    was sent, ``assumed`` the tokens after that it takes as committed (empty unless
    it was sent ahead of a verdict).
    """

    round: int
    k: int
    block: DraftBlock
    start: int
    assumed: tuple[int, ...]
    draft_ns: int  # time the loop waited on the drafter for this block
    sent_ns: int
    result: asyncio.Future[VerifyResult]
    origin: Origin = FRESH

    @property
    def base(self) -> int:
        return self.start + len(self.assumed)


async def open_turn(state: TurnState, on_open: OnOpen | None) -> None:
    """Open the turn at the oracle (prefill, or its cached prefix); start the clocks."""
    state.started_ns = time.perf_counter_ns()
    opened = await state.link.open(state.committed, state.turn.params, state.turn.seed)
    stats = state.stats
    stats.cached_tokens, stats.prefilled_tokens = opened.cached_tokens, opened.computed_tokens
    stats.prefill_ns = opened.prefill_ns
    if on_open is not None:
        await on_open(opened)
    state.last_verdict_ns = time.perf_counter_ns()


def k_for(state: TurnState, length: int) -> int:
    """k for a block extending a sequence of ``length`` tokens: the policy's choice,
    never past max_new_tokens or the context.

    Drafting beyond the tokens still allowed is wasted work: the round commits at
    most k+1 tokens, so k = remaining - 1 suffices.
    """
    turn = state.turn
    k = state.policy.next_k() if state.policy is not None else turn.k
    remaining = turn.params.max_new_tokens - (length - len(turn.context))
    room = turn.max_context - length
    return max(0, min(k, remaining - 1, room - 1))


async def propose(state: TurnState, k: int) -> DraftBlock:
    """Up to k tokens drafted after the committed ones (none without a proposer)."""
    if state.proposer is None or k == 0:
        return DraftBlock(token_ids=())
    block = await state.proposer.propose(state.committed, k, state.turn.params)
    return block.truncated(k)


def send(
    state: TurnState,
    block: DraftBlock,
    k: int,
    draft_ns: int,
    start: int,
    assumed: tuple[int, ...] = (),
    last_alternative: bool = False,
    origin: Origin = FRESH,
) -> Sent:
    """Send ``block``, drafted after committed[:start] + assumed, to be verified there."""
    round_index = state.new_round()
    if state.observer is not None:
        state.observer.round_started(round_index, k, draft_ns)
    base = start + len(assumed)
    verify = state.link.verify(round_index, base, block, draft_ns, assumed, last_alternative)
    result = asyncio.ensure_future(verify)
    return Sent(
        round_index, k, block, start, assumed, draft_ns, time.perf_counter_ns(), result, origin
    )


def fold(
    state: TurnState, sent: Sent, result: VerifyResult
) -> tuple[list[int], int, FinishReason | None]:
    """Commit ``sent``'s verdict: (the tokens it gives, how many of them are kept
    before a stop condition, the stop condition if one came)."""
    verdict = result.verdict
    if verdict is None:
        raise FailedPrecondition(
            f"the oracle skipped round {sent.round}, which extends the committed tokens "
            "as they are; the draft and the oracle disagree about the session"
        )
    if state.proposer is not None and len(sent.block) and not sent.origin.rescued:
        state.proposer.update(verdict.num_accepted)
    new = committed_tokens(sent.block, verdict)
    keep, reason = state.turn.stop.feed(new)
    state.committed.extend(new[:keep])
    return new, keep, reason


def report(
    state: TurnState,
    sent: Sent,
    result: VerifyResult,
    keep: int,
    received_ns: int,
    skipped: int = 0,
) -> RoundReport:
    """The report of the round just folded in; moves the clock to its verdict."""
    verdict, origin = result.verdict, sent.origin
    assert verdict is not None
    # A pipelined block's wait starts when the oracle could start on it: at the
    # previous verdict, not when it was sent.
    waited = received_ns - max(sent.sent_ns, state.last_verdict_ns)
    wall_ns = received_ns - state.last_verdict_ns
    state.last_verdict_ns = received_ns
    return RoundReport(
        round=sent.round,
        k=sent.k,
        proposed=len(sent.block),
        accepted=verdict.num_accepted,
        is_bonus=verdict.is_bonus,
        committed=keep,
        committed_length=len(state.committed),
        draft_ns=sent.draft_ns,
        verify_ns=result.verify_ns,
        network_ns=max(0, waited - result.verify_ns - result.queue_ns),
        queue_ns=result.queue_ns,
        drafted_ahead=origin.drafted_ahead,
        pipelined=origin.pipelined,
        branch=origin.branch,
        skipped_blocks=skipped,
        wall_ns=wall_ns,
        rescued=origin.rescued,
        logprobs=verdict.logprobs or (),  # the whole verdict's, as ``cut`` is sent too
        proof=result.proof,  # the oracle's, relayed as is
        cut=tuple(committed_tokens(sent.block, verdict)[keep:]),  # the proof covers them
    )


async def publish(state: TurnState, tokens: list[int], round_report: RoundReport) -> None:
    """Count the round, tell the observer and the policy, hand its tokens on."""
    state.stats.add(round_report)
    if state.observer is not None:
        state.observer.round_finished(round_report)
    if state.policy is not None:
        state.policy.observe(round_report)
    await state.on_commit(tokens, round_report)
    if state.stats.rounds == 1:
        state.stats.time_to_first_token_ns = time.perf_counter_ns() - state.started_ns


def finish(state: TurnState) -> TurnStats:
    state.stats.total_ns = time.perf_counter_ns() - state.started_ns
    return state.stats


def consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome (no 'exception never retrieved' noise)."""
    if not task.cancelled():
        task.exception()
