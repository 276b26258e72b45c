"""The round loop of one turn: the plain round with its strategies layered on it.

``run_turn`` is the loop every transport runs. It is the round of
``specdec.core.round`` (propose, verify, commit, report), with the parts that do
not depend on each other overlapped:

* drafting during verification (``specdec.core.ahead``): while block n is
  verified, the draft drafts block n+1 after its full acceptance;
* drafting for the likely corrections too (``specdec.core.branches``, greedy):
  whichever outcome verdict n is, its next block is ready; on a miss that drafting
  is stopped at its next step and the next block is drafted at once;
* pipelining (``specdec.core.pipeline``): the blocks drafted ahead are sent before
  the verdict they depend on, and the oracle verifies the one whose assumption held;
* rescue (``specdec.core.rescue``): after a verdict no block sent fits, the oracle
  may draft the next block itself; the loop takes it as the block in flight.

The output is unchanged by any of them: a block is only ever verified against the
exact sequence it was drafted after (``specdec.core.prefix``), and every draw
depends only on (seed, position), not on how positions are grouped into rounds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from specdec.core import ahead as drafting_ahead
from specdec.core import pipeline, rescue
from specdec.core.ahead import Ahead
from specdec.core.branches import branch_width
from specdec.core.protocols import KPolicy, OnCommit, OnOpen, OracleLink, Proposer, RoundObserver
from specdec.core.round import (
    FRESH,
    Origin,
    Sent,
    TurnState,
    finish,
    fold,
    k_for,
    open_turn,
    propose,
    publish,
    report,
    send,
)
from specdec.core.stopping import FinishReason
from specdec.core.types import (
    DraftBlock,
    Rescue,
    Turn,
    TurnStats,
    VerifyResult,
    check_k,
)


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
    state = TurnState(link, proposer, turn, on_commit, policy, observer)
    loop = _Loop(state, pipeline.pipeline_depth(turn), branch_width(turn))
    await open_turn(state, on_open)
    try:
        while True:
            if loop.decision is not None and not loop.in_flight:
                await _send_late_ahead(loop)  # rescue: the block for the verdict, or word of none
            if loop.decision is not None and (loop.decision.done() or not loop.in_flight):
                await _take_decision(loop)  # rescue: the oracle's own block, or none
            if not loop.in_flight:
                if len(state.committed) >= turn.max_context:
                    return FinishReason.CONTEXT_LIMIT, finish(state)
                await _send_next(loop)  # the plain round's block (or one drafted ahead)
            _draft_ahead(loop)  # the next block, while this one is verified
            head = loop.in_flight[0]
            if not await _await_head(loop, head):  # pipelining: send blocks ahead meanwhile
                continue  # a rescue decision came first
            result = await head.result
            received = time.perf_counter_ns()
            loop.in_flight.popleft()
            reason = await _commit(loop, head, result, received)
            if reason is not None:
                return reason, finish(state)
    finally:
        _abandon(loop)


@dataclass
class _Loop:
    """The turn, and what its strategies hold between rounds."""

    state: TurnState
    depth: int  # levels of blocks in flight (``pipeline.pipeline_depth``)
    width: int  # likely corrections drafted ahead per block, besides full acceptance
    in_flight: deque[Sent] = field(default_factory=deque)
    ahead: Ahead = field(default_factory=Ahead)
    # The rescue decision the last verdict awaits (None: none pending).
    decision: asyncio.Future[Rescue | None] | None = None


async def _await_head(loop: _Loop, head: Sent) -> bool:
    """Until ``head``'s verdict is in, send the blocks drafted ahead as soon as they
    are ready. False: a rescue decision came first (it goes before the verdict)."""
    while True:
        if loop.decision is not None and loop.decision.done():
            return False
        if head.result.done():
            return True
        pipelining = pipeline.levels(loop.in_flight) < loop.depth
        branches = loop.ahead.branches if pipelining else None
        if branches is not None and branches.task.done():
            _send_ahead(loop)  # the next block is ready first: send it now
            _draft_ahead(loop)
            continue
        waiting: set[asyncio.Future[Any]] = {head.result}
        if branches is not None:
            waiting.add(branches.task)
        if loop.decision is not None:
            waiting.add(loop.decision)
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)


async def _send_next(loop: _Loop) -> None:
    """Nothing valid is in flight: send a block extending the committed tokens, the one
    drafted ahead for them if there is one."""
    state = loop.state
    k = k_for(state, len(state.committed))
    t0 = time.perf_counter_ns()
    found = await drafting_ahead.take(loop.ahead, state.committed)
    if found is not None and k > 0:
        block, origin = found[0], Origin(drafted_ahead=True, branch=found[1])
    else:
        block, origin = await propose(state, k), FRESH
    _send(loop, block.truncated(k), k, time.perf_counter_ns() - t0, origin)


def _send(
    loop: _Loop,
    block: DraftBlock,
    k: int,
    draft_ns: int,
    origin: Origin,
    assumed: tuple[int, ...] = (),
    last_alternative: bool = False,
) -> None:
    """Send a block drafted after the committed tokens + ``assumed``."""
    start = len(loop.state.committed)
    if loop.decision is not None and not assumed:
        start, assumed = rescue.skippable(loop.state.committed)
    sent = send(loop.state, block, k, draft_ns, start, assumed, last_alternative, origin)
    loop.in_flight.append(sent)


def _draft_ahead(loop: _Loop) -> None:
    """Draft after the newest block in flight, unless the pipeline is full."""
    state = loop.state
    if not state.turn.draft_ahead or state.proposer is None or loop.ahead.branches is not None:
        return
    if pipeline.levels(loop.in_flight) < max(loop.depth, 2):
        drafting_ahead.draft_after(state, loop.ahead, pipeline.tail(loop.in_flight), loop.width)


def _send_ahead(loop: _Loop) -> None:
    """Send the blocks drafted ahead before the verdicts they depend on; the oracle
    verifies the one whose assumption holds."""
    branches, loop.ahead.branches = loop.ahead.branches, None
    assert branches is not None and branches.task.done()
    possible = branches.still_possible(loop.state.committed)
    for n, (branch, correction, base, assumed) in enumerate(possible, 1):
        k = k_for(loop.state, base)
        # Drafting it cost the loop nothing: it ran while the oracle was busy.
        origin = Origin(drafted_ahead=True, pipelined=bool(assumed), branch=correction)
        _send(loop, branch.block.truncated(k), k, 0, origin, assumed, n == len(possible))


async def _commit(
    loop: _Loop, head: Sent, result: VerifyResult, received_ns: int
) -> FinishReason | None:
    """Fold ``head``'s verdict into the committed tokens; drop what it proved stale."""
    state = loop.state
    new, keep, reason = fold(state, head, result)
    skipped = 0
    if reason is None:
        committed = state.committed
        loop.in_flight, skipped = pipeline.drop_stale(loop.in_flight, committed, state.observer)
        drafting_ahead.forget_refuted(loop.ahead, committed)
        loop.decision = result.decision
    round_report = report(state, head, result, keep, received_ns, skipped)
    loop.ahead.count_use(round_report.drafted_ahead)
    await publish(state, new[:keep], round_report)
    return reason


async def _send_late_ahead(loop: _Loop) -> None:
    """A verdict awaits a rescue decision and nothing is in flight: the blocks
    drafted ahead for it were not sent yet. Send the one it makes true, if any; else
    tell the oracle that none is coming, so that it decides at once."""
    branches = loop.ahead.branches or loop.ahead.dropped
    if branches is None:
        return
    found = await drafting_ahead.take(loop.ahead, loop.state.committed)
    if found is not None:
        k = k_for(loop.state, len(loop.state.committed))
        block, correction = found
        origin = Origin(drafted_ahead=True, branch=correction)
        _send(loop, block.truncated(k), k, 0, origin, last_alternative=True)
        return
    missed = branches.missed(loop.state.committed)
    if missed:
        rescue.none_coming(loop.state, branches, missed[0])


async def _take_decision(loop: _Loop) -> None:
    """Wait for the pending rescue decision; adopt the oracle's block if it drafted one."""
    decision, loop.decision = loop.decision, None
    assert decision is not None
    rescued = await decision
    if rescued is not None:
        loop.in_flight, dropped = rescue.adopt(loop.state, loop.in_flight, loop.ahead, rescued)
        loop.state.stats.skipped_blocks += dropped


def _abandon(loop: _Loop) -> None:
    """The turn ended: nothing still in flight or being drafted is wanted."""
    pipeline.abandon(loop.in_flight, loop.state.observer)
    loop.decision = None
    drafting_ahead.abandon(loop.ahead)
