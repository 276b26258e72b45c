"""The round loop of one turn: draft, verify, commit, repeat, with blocks pipelined.

``run_turn`` is the loop every transport runs (see ``specdec.core.types`` for a round,
its types and its timing). On top of the plain round it overlaps the parts that
do not depend on each other:

* drafting during verification (``Turn.draft_ahead``; PEARL's post-verify,
  SpecEdge's proactive drafting): while block n is verified, the draft proposes
  k + 1 tokens after it as if it were accepted in full: a guess of its bonus
  token, then block n+1. Used only if that assumption and the guess come true.
* drafting for the likely corrections too (``Turn.branches``, greedy): besides
  full acceptance, the draft drafts ahead after the likeliest rejections of block
  n, each corrected by one of its next choices there (``specdec.drafters.branches``),
  all in one batched pass. Whichever of these outcomes verdict n turns out to be, its
  next block is ready. If it is none of them (a miss), that drafting is stopped at
  its next step (``BranchTicket``) and the next block is drafted at once.
* pipelining (``Turn.pipeline_depth`` > 1): the blocks drafted ahead are sent as
  soon as they are drafted, each with the tokens it assumes (block n's accepted
  prefix and the guessed next token), before verdict n is back. The oracle
  verifies the one whose assumption held straight after verdict n and skips the
  others. A round then costs max(verify, draft) instead of
  verify + round trip + draft whenever one of the guesses was right; when none
  was, it costs what no pipelining costs.
* rescue (greedy, over a link that allows it, to an oracle with a rescue
  draft): a verdict that none of the blocks sent fits yet comes with a pending
  decision. Until it comes, every block sent assumes at least the verdict's last
  token (so that the oracle can skip it). If the oracle drafts the next block
  itself, the loop takes that block as the one in flight, drops the rest and
  drafts ahead after it (``specdec.core.types.Rescue``).

The output is unchanged by either: a block is only ever verified against the
exact sequence it was drafted after, and every draw depends only on (seed,
position), not on how positions are grouped into rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from specdec.core.errors import FailedPrecondition
from specdec.core.protocols import KPolicy, OnCommit, OnOpen, OracleLink, Proposer, RoundObserver
from specdec.core.stopping import FinishReason
from specdec.core.types import (
    MAX_BRANCHES,
    MAX_PIPELINE_DEPTH,
    Branch,
    BranchTicket,
    DraftBlock,
    Rescue,
    RoundReport,
    Turn,
    TurnStats,
    VerifyResult,
    check_k,
    committed_tokens,
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
    return await _RoundLoop(link, proposer, turn, on_commit, policy, observer).run(on_open)


@dataclass(eq=False)
class _Sent:
    """A block sent to the oracle whose verdict is not folded in yet.

    It extends committed[:start] + assumed: ``start`` is the committed length when it
    was sent, ``assumed`` the tokens after that it takes as committed (empty unless
    it was pipelined ahead of a verdict).
    """

    round: int
    k: int
    block: DraftBlock
    start: int
    assumed: tuple[int, ...]
    draft_ns: int  # time the loop waited on the drafter for this block
    drafted_ahead: bool
    branch: bool  # drafted for a guessed correction of the block before it
    sent_ns: int
    result: asyncio.Future[VerifyResult]
    rescued: bool = False  # drafted by the oracle (a ``Rescue``), not sent
    pipelined: bool = False  # sent before the verdict it assumes

    @property
    def base(self) -> int:
        return self.start + len(self.assumed)


@dataclass
class _Ahead:
    """Blocks drafted during verification for the likely outcomes of one block in flight.

    That block extends committed[:start] + prefix; branch b's block extends
    committed[:start] + prefix + b.assumed. The first branch is the block's full
    acceptance with a guessed bonus, any others its likely corrections.
    """

    start: int
    prefix: tuple[int, ...]
    reach: int  # committed lengths beyond this leave no branch that could still apply
    task: asyncio.Future[list[Branch]]
    ticket: BranchTicket
    chosen: asyncio.Future[None]  # done once ticket.outcomes is set

    def guessed(self, branch: Branch) -> tuple[int, ...]:
        """The tokens after committed[:start] that ``branch`` takes as committed."""
        return (*self.prefix, *branch.assumed)

    def may_apply(self, committed: list[int]) -> bool:
        """Some branch may still be drafted for exactly the committed tokens (as far as
        is known: before the drafter has chosen its branches, any of them may)."""
        if len(committed) > self.reach or not _consistent(committed, self.start, self.prefix):
            return False
        outcomes = self.ticket.outcomes
        return outcomes is None or any(
            len(committed) <= self.start + len(self.prefix) + len(assumed)
            and _consistent(committed, self.start, (*self.prefix, *assumed))
            for assumed in outcomes
        )

    def drop(self) -> None:
        """Nothing drafted here is wanted: the drafting stops at its next step."""
        self.ticket.cancelled = True
        self.task.add_done_callback(_consume)


def _consistent(committed: list[int], start: int, tokens: Sequence[int]) -> bool:
    """committed agrees with ``tokens`` (claimed from position ``start``) wherever both exist."""
    n = min(len(committed) - start, len(tokens))
    return n <= 0 or committed[start : start + n] == list(tokens[:n])


# Drafting ahead pays only when its guesses come true. Sampled bonus tokens seldom match
# the draft's guess, so at T = 1 most of that drafting (and, pipelined, its wire bytes) is
# wasted: below this hit rate the loop drafts ahead only every AHEAD_PROBE-th round, which
# is enough to notice when it pays again.
MIN_AHEAD_HIT_RATE = 0.05
AHEAD_PROBE = 4
AHEAD_DECAY = 0.95  # weight of the past in the hit rate, per proposal drafted ahead


class _RoundLoop:
    """The rounds of one turn; the ladder is ``run``: send, draft ahead, await, commit."""

    def __init__(
        self,
        link: OracleLink,
        proposer: Proposer | None,
        turn: Turn,
        on_commit: OnCommit,
        policy: KPolicy | None,
        observer: RoundObserver | None,
    ) -> None:
        self.link, self.proposer, self.turn = link, proposer, turn
        self.on_commit, self.policy, self.observer = on_commit, policy, observer
        self.committed = list(turn.context)
        self.stats = TurnStats(prompt_tokens=turn.prompt_tokens)
        self.in_flight: deque[_Sent] = deque()
        self.ahead: _Ahead | None = None
        self.dropped: _Ahead | None = None  # the drafting ahead the last verdict made useless
        self.next_round = 0
        self.drafted_after = -1  # the round whose block the last ahead proposal follows
        self.ahead_drafted = 0.0  # proposals drafted ahead (decayed) ...
        self.ahead_used = 0.0  # ... and rounds that used one
        self.last_verdict_ns = 0
        # The rescue decision the last verdict awaits (None: none pending).
        self.decision: asyncio.Future[Rescue | None] | None = None
        # Blocks in flight one after another: 1 = wait for each verdict before sending
        # the next (alternatives drafted for the same verdict count once).
        depth = min(max(1, turn.pipeline_depth), MAX_PIPELINE_DEPTH)
        self.depth = depth if turn.draft_ahead else 1
        self.width = min(max(0, turn.branches), MAX_BRANCHES) if turn.params.greedy else 0

    async def run(self, on_open: OnOpen | None) -> tuple[FinishReason, TurnStats]:
        start = time.perf_counter_ns()
        turn, stats = self.turn, self.stats
        opened = await self.link.open(self.committed, turn.params, turn.seed)
        stats.cached_tokens, stats.prefilled_tokens = opened.cached_tokens, opened.computed_tokens
        stats.prefill_ns = opened.prefill_ns
        if on_open is not None:
            await on_open(opened)
        self.last_verdict_ns = time.perf_counter_ns()
        try:
            while True:
                if self.decision is not None and not self.in_flight:
                    await self._send_late_ahead()
                if self.decision is not None and (self.decision.done() or not self.in_flight):
                    await self._take_decision()
                if not self.in_flight:
                    if len(self.committed) >= turn.max_context:
                        return FinishReason.CONTEXT_LIMIT, _finish(stats, start)
                    await self._send_next()
                self._draft_ahead()
                head = self.in_flight[0]
                if not await self._await_head(head):
                    continue  # a rescue decision came first
                result = await head.result
                received = time.perf_counter_ns()
                self.in_flight.popleft()
                reason = await self._commit(head, result, received)
                if stats.rounds == 1:
                    stats.time_to_first_token_ns = time.perf_counter_ns() - start
                if reason is not None:
                    return reason, _finish(stats, start)
        finally:
            self._abandon()

    async def _await_head(self, head: _Sent) -> bool:
        """Until ``head``'s verdict is in, send the blocks drafted ahead as soon as they
        are ready. False: a rescue decision came first (it goes before the verdict)."""
        while True:
            if self.decision is not None and self.decision.done():
                return False
            if head.result.done():
                return True
            if self._may_pipeline():
                assert self.ahead is not None
                if self.ahead.task.done():  # the next block is ready first: send it now
                    self._send_ahead()
                    self._draft_ahead()
                    continue
            waiting: set[asyncio.Future[Any]] = {head.result}
            if self._may_pipeline():
                assert self.ahead is not None
                waiting.add(self.ahead.task)
            if self.decision is not None:
                waiting.add(self.decision)
            await asyncio.wait(waiting, return_when=FIRST_COMPLETED)

    # -- sending -----------------------------------------------------------------

    def _k_for(self, length: int) -> int:
        """k for a block extending a sequence of ``length`` tokens: the policy's choice,
        never past max_new_tokens or the context.

        Drafting beyond the tokens still allowed is wasted work: the round commits at
        most k+1 tokens, so k = remaining - 1 suffices.
        """
        turn = self.turn
        k = self.policy.next_k() if self.policy is not None else turn.k
        remaining = turn.params.max_new_tokens - (length - len(turn.context))
        room = turn.max_context - length
        return max(0, min(k, remaining - 1, room - 1))

    async def _send_next(self) -> None:
        """Nothing valid is in flight: send a block extending the committed tokens."""
        k = self._k_for(len(self.committed))
        t0 = time.perf_counter_ns()
        found = await self._take_ahead()
        drafted_ahead, branch = found is not None and k > 0, False
        if found is not None and k > 0:
            block, branch = found
        elif self.proposer is not None and k > 0:
            block = await self.proposer.propose(self.committed, k, self.turn.params)
        else:
            block = DraftBlock(token_ids=())
        draft_ns = time.perf_counter_ns() - t0
        self._send(block.truncated(k), k, (), draft_ns, drafted_ahead, branch)

    async def _take_ahead(self) -> tuple[DraftBlock, bool] | None:
        """(block, drafted for a correction) drafted ahead for exactly what was committed.

        Waits for the drafting ahead only if one of its branches may be that block: on a
        miss the drafting is stopped, and the fresh block starts a step later."""
        ahead, self.ahead = self.ahead, None
        if ahead is None:
            return None
        if ahead.ticket.outcomes is None:  # the verdict came before the branches were chosen
            racing: set[asyncio.Future[Any]] = {ahead.task, ahead.chosen}
            await asyncio.wait(racing, return_when=FIRST_COMPLETED)
        if not ahead.may_apply(self.committed):
            ahead.drop()
            return None
        for index, branch in enumerate(await ahead.task):
            guessed = ahead.guessed(branch)
            exact = len(self.committed) == ahead.start + len(guessed)
            if exact and len(branch.block) and _consistent(self.committed, ahead.start, guessed):
                return branch.block, index > 0
        return None

    def _send(
        self,
        block: DraftBlock,
        k: int,
        assumed: tuple[int, ...],
        draft_ns: int,
        drafted_ahead: bool,
        branch: bool,
        last_alternative: bool = False,
    ) -> None:
        round_index, self.next_round = self.next_round, self.next_round + 1
        start, pipelined = len(self.committed), bool(assumed)
        if self.decision is not None and not assumed:
            # The oracle may still rescue the last verdict: it must be able to skip this.
            start, assumed = start - 1, tuple(self.committed[-1:])
        if self.observer is not None:
            self.observer.round_started(round_index, k, draft_ns)
        result = asyncio.ensure_future(
            self.link.verify(
                round_index, start + len(assumed), block, draft_ns, assumed, last_alternative
            )
        )
        self.in_flight.append(
            _Sent(
                round_index, k, block, start, assumed, draft_ns, drafted_ahead, branch,
                time.perf_counter_ns(), result, pipelined=pipelined,
            )
        )  # fmt: skip

    # -- drafting ahead ----------------------------------------------------------

    def _draft_ahead(self) -> None:
        """Start drafting after the newest block in flight, for its likely outcomes.

        Its full acceptance (a guess of the bonus token, then the next block) and,
        greedy, its ``width`` likeliest corrections. Only after a full block: a short
        one means the drafter had nothing better, and a k = 0 round has no drafter.
        """
        if not self.turn.draft_ahead or self.proposer is None or self.ahead is not None:
            return
        if self._levels() >= max(self.depth, 2):
            return
        tail = self._tail()
        if tail.k == 0 or len(tail.block) < tail.k or tail.round == self.drafted_after:
            return  # (once per block: a proposal too short to use is not asked for again)
        if self._ahead_rarely_pays() and tail.round % AHEAD_PROBE:
            return
        context = [*self.committed[: tail.start], *tail.assumed]  # what tail's block extends
        k = self._k_for(len(context) + len(tail.block) + 1)  # after the guessed bonus
        if k < 1:
            return
        self.drafted_after = tail.round
        self.ahead_drafted = AHEAD_DECAY * self.ahead_drafted + 1
        self.ahead_used *= AHEAD_DECAY
        chosen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = BranchTicket(_threadsafe_setter(chosen))
        task = asyncio.ensure_future(
            self.proposer.branch(context, tail.block, k, self.turn.params, self.width, ticket)
        )
        start = len(self.committed)
        reach = len(context) + len(tail.block) + 1
        self.ahead = _Ahead(start, tuple(context[start:]), reach, task, ticket, chosen)

    def _levels(self) -> int:
        """Blocks in flight one after another (the alternatives for one verdict count once)."""
        return sum(1 for index, sent in enumerate(self.in_flight) if index == 0 or not sent.branch)

    def _tail(self) -> _Sent:
        """The newest block in flight that the next blocks are drafted after: the newest
        full-acceptance block (the alternatives to it are dead ends)."""
        for index in range(len(self.in_flight) - 1, 0, -1):
            if not self.in_flight[index].branch:
                return self.in_flight[index]
        return self.in_flight[0]

    def _ahead_rarely_pays(self) -> bool:
        enough = self.ahead_drafted >= 4
        return enough and self.ahead_used < MIN_AHEAD_HIT_RATE * self.ahead_drafted

    def _may_pipeline(self) -> bool:
        return self.ahead is not None and self._levels() < self.depth

    def _send_ahead(self) -> None:
        """Send the blocks drafted ahead before the verdicts they depend on.

        The alternatives go first and the full acceptance last: blocks drafted after
        it follow it on the wire. The oracle verifies the one whose assumption holds.
        """
        ahead, self.ahead = self.ahead, None
        assert ahead is not None and ahead.task.done()
        branches = ahead.task.result()
        sending = []
        for index in [*range(1, len(branches)), 0][: len(branches)]:
            branch = branches[index]
            guessed = ahead.guessed(branch)
            base = ahead.start + len(guessed)
            if not len(branch.block) or base < len(self.committed):
                continue
            if not _consistent(self.committed, ahead.start, guessed):
                continue
            sending.append((index, branch, base, guessed[len(self.committed) - ahead.start :]))
        for n, (index, branch, base, assumed) in enumerate(sending, 1):
            k = self._k_for(base)
            # Drafting it cost the loop nothing: it ran while the oracle was busy.
            last = n == len(sending)
            self._send(branch.block.truncated(k), k, assumed, 0, True, index > 0, last)

    # -- verdicts ----------------------------------------------------------------

    async def _commit(
        self, head: _Sent, result: VerifyResult, received_ns: int
    ) -> FinishReason | None:
        """Fold ``head``'s verdict into the committed tokens; drop what it proved stale."""
        verdict = result.verdict
        if verdict is None:
            raise FailedPrecondition(
                f"the oracle skipped round {head.round}, which extends the committed tokens "
                "as they are; the draft and the oracle disagree about the session"
            )
        block = head.block
        if self.proposer is not None and len(block) and not head.rescued:
            self.proposer.update(verdict.num_accepted)
        new = committed_tokens(block, verdict)
        keep, reason = self.turn.stop.feed(new)
        self.committed.extend(new[:keep])
        skipped = self._drop_stale() if reason is None else 0
        if reason is None:
            self.decision = result.decision
        # A pipelined block's wait starts when the oracle could start on it: at the
        # previous verdict, not when it was sent.
        waited = received_ns - max(head.sent_ns, self.last_verdict_ns)
        wall_ns = received_ns - self.last_verdict_ns
        self.last_verdict_ns = received_ns
        report = RoundReport(
            round=head.round,
            k=head.k,
            proposed=len(block),
            accepted=verdict.num_accepted,
            is_bonus=verdict.is_bonus,
            committed=keep,
            committed_length=len(self.committed),
            draft_ns=head.draft_ns,
            verify_ns=result.verify_ns,
            network_ns=max(0, waited - result.verify_ns - result.queue_ns),
            queue_ns=result.queue_ns,
            drafted_ahead=head.drafted_ahead,
            pipelined=head.pipelined,
            branch=head.branch,
            skipped_blocks=skipped,
            wall_ns=wall_ns,
            rescued=head.rescued,
            proof=result.proof,
            cut=tuple(new[keep:]),
        )
        self.stats.add(report)
        self.ahead_used += report.drafted_ahead
        if self.observer is not None:
            self.observer.round_finished(report)
        if self.policy is not None:
            self.policy.observe(report)
        await self.on_commit(new[:keep], report)
        return reason

    def _drop_stale(self) -> int:
        """Forget blocks in flight and drafts ahead that the new verdict contradicts.

        A block in flight stays if it extends exactly the committed tokens (the next
        head) or assumes more tokens that agree with them so far; the oracle skips the
        others too (their assumed tokens were not committed).
        """
        committed = self.committed
        kept = [
            sent
            for sent in self.in_flight
            if sent.base >= len(committed) and _consistent(committed, sent.start, sent.assumed)
        ]
        if kept and kept[0].base != len(committed):
            kept = []  # none extends the committed tokens: the rest wait for nothing
        stale = [sent for sent in self.in_flight if sent not in kept]
        for sent in stale:
            sent.result.add_done_callback(_consume)
            if self.observer is not None:
                self.observer.round_skipped(sent.round)
        self.in_flight = deque(kept)
        ahead, self.dropped = self.ahead, None
        if ahead is not None and not ahead.may_apply(committed):
            ahead.drop()
            self.ahead, self.dropped = None, ahead
        return len(stale)

    async def _send_late_ahead(self) -> None:
        """A verdict awaits a rescue decision and nothing is in flight: the blocks
        drafted ahead for it were not sent yet. Send the one it makes true, if any; else
        tell the oracle that none is coming, so that it decides at once."""
        ahead = self.ahead or self.dropped
        if ahead is None:
            return
        found = await self._take_ahead()
        if found is not None:
            k = self._k_for(len(self.committed))
            block, branch = found
            self._send(block.truncated(k), k, (), 0, True, branch, True)
            return
        committed, start = self.committed, ahead.start
        missed = [
            assumed
            for assumed in ahead.ticket.outcomes or ()
            if not _consistent(committed, start, (*ahead.prefix, *assumed))
        ]
        if missed:  # an empty block for an outcome the verdict was not, flagged as the last
            base = start + len(ahead.prefix)  # where the block they follow starts
            round_index, self.next_round = self.next_round, self.next_round + 1
            verify = self.link.verify(
                round_index, base + len(missed[0]), DraftBlock(()), 0, missed[0], True
            )
            asyncio.ensure_future(verify).add_done_callback(_consume)

    async def _take_decision(self) -> None:
        """Wait for the pending rescue decision; adopt the oracle's block if it drafted one."""
        decision, self.decision = self.decision, None
        assert decision is not None
        rescue = await decision
        if rescue is not None:
            self.stats.skipped_blocks += self._adopt(rescue)

    def _adopt(self, rescue: Rescue) -> int:
        """The oracle drafted the next block itself: it is the block in flight now.

        The oracle verifies it before anything else, so of the blocks still in flight
        only those that assume one of its outcomes (its prefix, then one more token)
        can still be verified: the draft's own block may have been the same. The rest
        are dropped (the oracle skips them), as is the drafting ahead, which restarts
        after the oracle's block. Returns how many blocks that dropped.
        """
        # The proposal drafted ahead for the verdict was not judged by the draft: the
        # oracle did not wait for it. It must not count as a failed guess, or the loop
        # would draft ahead less and make the oracle rescue more.
        self.ahead_drafted = max(0.0, self.ahead_drafted - 1)
        committed, tokens = self.committed, rescue.block.token_ids
        kept: deque[_Sent] = deque()
        for sent in self.in_flight:
            after = sent.assumed[len(committed) - sent.start :]  # beyond the committed tokens
            if 0 < len(after) <= len(tokens) + 1 and after[:-1] == tokens[: len(after) - 1]:
                kept.append(sent)
                continue
            sent.result.add_done_callback(_consume)
            if self.observer is not None:
                self.observer.round_skipped(sent.round)
        if self.ahead is not None:
            self.ahead.drop()
            self.ahead = None
        round_index, self.next_round = self.next_round, self.next_round + 1
        k = len(rescue.block)
        if self.observer is not None:
            self.observer.round_started(round_index, k, 0)
        head = _Sent(
            round_index, k, rescue.block, len(committed), (), 0, False, False,
            time.perf_counter_ns(), rescue.result, rescued=True,
        )  # fmt: skip
        dropped = len(self.in_flight) - len(kept)
        self.in_flight = deque([head, *kept])
        return dropped

    def _abandon(self) -> None:
        """The turn ended: nothing still in flight or being drafted is wanted."""
        for sent in self.in_flight:
            sent.result.cancel()
            sent.result.add_done_callback(_consume)
            if self.observer is not None:
                self.observer.round_skipped(sent.round)
        self.in_flight.clear()
        self.decision = None
        if self.ahead is not None:
            self.ahead.task.cancel()
            self.ahead.drop()
            self.ahead = None


def _threadsafe_setter(future: asyncio.Future[None]) -> Callable[[], None]:
    """A function any thread may call to set ``future``'s result (once)."""
    loop = future.get_loop()

    def settle() -> None:
        if not future.done():
            future.set_result(None)

    def notify() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    return notify


def _finish(stats: TurnStats, start_ns: int) -> TurnStats:
    stats.total_ns = time.perf_counter_ns() - start_ns
    return stats


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome (no 'exception never retrieved' noise)."""
    if not task.cancelled():
        task.exception()
