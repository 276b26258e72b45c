"""Drafting during verification: the next block is drafted while this one is verified.

``Turn.draft_ahead`` (PEARL's post-verify, SpecEdge's proactive drafting): while
block n is verified, the draft proposes k + 1 tokens after it as if it were
accepted in full: a guess of its bonus token, then block n+1 (greedy, after its
likely corrections too: ``specdec.core.branches``). Used only if that assumption
and the guess come true: a block is only ever verified against the exact sequence
it was drafted after, so the output is unchanged.

Drafting ahead pays only when its guesses come true. Sampled bonus tokens seldom
match the draft's guess, so at T = 1 most of that drafting (and, pipelined, its wire
bytes) is wasted: below ``MIN_AHEAD_HIT_RATE`` the loop drafts ahead only every
``AHEAD_PROBE``-th round, which is enough to notice when it pays again.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.core.branches import Branches, draft_branches
from specdec.core.round import Sent, TurnState, k_for
from specdec.core.types import DraftBlock

MIN_AHEAD_HIT_RATE = 0.05
AHEAD_PROBE = 4
AHEAD_DECAY = 0.95  # weight of the past in the hit rate, per proposal drafted ahead


@dataclass
class Ahead:
    """The drafting ahead of one turn and how often it paid."""

    branches: Branches | None = None  # being drafted after the newest block in flight
    dropped: Branches | None = None  # the drafting ahead the last verdict made useless
    drafted_after: int = -1  # the round whose block the last proposal ahead follows
    drafted: float = 0.0  # proposals drafted ahead (decayed) ...
    used: float = 0.0  # ... and rounds that used one

    def rarely_pays(self) -> bool:
        enough = self.drafted >= 4
        return enough and self.used < MIN_AHEAD_HIT_RATE * self.drafted

    def count_use(self, used: bool) -> None:
        self.used += used

    def forgive(self) -> None:
        """The last proposal ahead was never judged (the oracle drafted the block itself):
        it must not count as a failed guess, or the loop would draft ahead less and make
        the oracle rescue more."""
        self.drafted = max(0.0, self.drafted - 1)


def draft_after(state: TurnState, ahead: Ahead, tail: Sent, width: int) -> None:
    """Start drafting after ``tail``, the newest block in flight, for its likely outcomes.

    Its full acceptance (a guess of the bonus token, then the next block) and,
    greedy, its ``width`` likeliest corrections. Only after a full block: a short
    one means the drafter had nothing better, and a k = 0 round has no drafter.
    """
    assert state.proposer is not None and ahead.branches is None
    if tail.k == 0 or len(tail.block) < tail.k or tail.round == ahead.drafted_after:
        return  # (once per block: a proposal too short to use is not asked for again)
    if ahead.rarely_pays() and tail.round % AHEAD_PROBE:
        return
    context = [*state.committed[: tail.start], *tail.assumed]  # what tail's block extends
    k = k_for(state, len(context) + len(tail.block) + 1)  # after the guessed bonus
    if k < 1:
        return
    ahead.drafted_after = tail.round
    ahead.drafted = AHEAD_DECAY * ahead.drafted + 1
    ahead.used *= AHEAD_DECAY
    ahead.branches = draft_branches(
        state.proposer, state.committed, context, tail.block, k, state.turn.params, width
    )


async def take(ahead: Ahead, committed: list[int]) -> tuple[DraftBlock, bool] | None:
    """(block, drafted for a correction) drafted ahead for exactly what was committed.

    Waits for the drafting ahead only if one of its branches may be that block: on a
    miss the drafting is stopped, and the fresh block starts a step later."""
    branches, ahead.branches = ahead.branches, None
    if branches is None:
        return None
    await branches.settled()  # the verdict may come before the branches are chosen
    if not branches.may_apply(committed):
        branches.drop()
        return None
    return await branches.block_for(committed)


def forget_refuted(ahead: Ahead, committed: list[int]) -> None:
    """A verdict came: stop the drafting ahead if no branch of it can apply any more
    (kept as ``dropped``, whose outcomes may still tell the oracle that none fits)."""
    branches, ahead.dropped = ahead.branches, None
    if branches is not None and not branches.may_apply(committed):
        branches.drop()
        ahead.branches, ahead.dropped = None, branches


def drop(ahead: Ahead) -> None:
    """Nothing being drafted ahead is wanted: stop it at its next step."""
    if ahead.branches is not None:
        ahead.branches.drop()
        ahead.branches = None


def abandon(ahead: Ahead) -> None:
    """The turn ended: cancel the drafting ahead too."""
    if ahead.branches is not None:
        ahead.branches.task.cancel()
    drop(ahead)
