"""Pipelining: blocks drafted ahead go out before the verdict they depend on.

With ``Turn.pipeline_depth`` > 1 the blocks drafted ahead (``specdec.core.ahead``)
are sent as soon as they are drafted, each with the tokens it assumes (block n's
accepted prefix and the guessed next token), before verdict n is back. The oracle
verifies the one whose assumption held straight after verdict n and skips the
others. A round then costs max(verify, draft) instead of verify + round trip +
draft whenever one of the guesses was right; when none was, it costs what no
pipelining costs.

The blocks in flight form a queue whose head extends the committed tokens as they
are. The alternatives drafted for one verdict count once towards the depth: they
are one level, of which the oracle verifies at most one.
"""

from __future__ import annotations

from collections import deque

from specdec.core.prefix import may_hold
from specdec.core.protocols import RoundObserver
from specdec.core.round import Sent, consume
from specdec.core.types import MAX_PIPELINE_DEPTH, Turn


def pipeline_depth(turn: Turn) -> int:
    """Blocks in flight one after another: 1 = wait for each verdict before sending the
    next (only blocks drafted ahead can be sent before it)."""
    depth = min(max(1, turn.pipeline_depth), MAX_PIPELINE_DEPTH)
    return depth if turn.draft_ahead else 1


def levels(in_flight: deque[Sent]) -> int:
    """Blocks in flight one after another (the alternatives for one verdict count once)."""
    return sum(1 for index, sent in enumerate(in_flight) if index == 0 or not sent.origin.branch)


def tail(in_flight: deque[Sent]) -> Sent:
    """The newest block in flight that the next blocks are drafted after: the newest
    full-acceptance block (the alternatives to it are dead ends)."""
    for index in range(len(in_flight) - 1, 0, -1):
        if not in_flight[index].origin.branch:
            return in_flight[index]
    return in_flight[0]


def drop_stale(
    in_flight: deque[Sent], committed: list[int], observer: RoundObserver | None
) -> tuple[deque[Sent], int]:
    """The blocks in flight a new verdict (its tokens now ``committed``) leaves, and how
    many it made stale.

    A block in flight stays if it extends exactly the committed tokens (the next
    head) or assumes more tokens that agree with them so far; the oracle skips the
    others too (their assumed tokens were not committed).
    """
    kept = [sent for sent in in_flight if may_hold(committed, sent.start, sent.assumed)]
    if kept and kept[0].base != len(committed):
        kept = []  # none extends the committed tokens: the rest wait for nothing
    stale = [sent for sent in in_flight if sent not in kept]
    for sent in stale:
        forget(sent, observer)
    return deque(kept), len(stale)


def forget(sent: Sent, observer: RoundObserver | None) -> None:
    """``sent``'s verdict is no longer awaited (the oracle skips it, or the turn ended)."""
    sent.result.add_done_callback(consume)
    if observer is not None:
        observer.round_skipped(sent.round)


def abandon(in_flight: deque[Sent], observer: RoundObserver | None) -> None:
    """The turn ended: nothing still in flight is wanted."""
    for sent in in_flight:
        sent.result.cancel()
        forget(sent, observer)
    in_flight.clear()
