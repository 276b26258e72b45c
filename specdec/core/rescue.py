"""Rescue blocks, the loop's side: the oracle drafts the next block itself after a miss.

Greedy, over a link that allows it, to an oracle with a rescue draft
(``oracle_service.rescue``): a verdict that none of the blocks sent fits yet
comes with a pending decision (``VerifyResult.decision``). Until it comes, every
block sent assumes at least the verdict's last token (``skippable``), so that the
oracle can skip it. If the oracle drafts the next block itself, the loop takes that
block as the one in flight, drops the rest and drafts ahead after it (``adopt``;
``specdec.core.types.Rescue``). The oracle decides once the draft's blocks for the
verdict are all there: when the loop has none to send, it says so (``none_coming``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from specdec.core import ahead as drafting_ahead
from specdec.core.ahead import Ahead
from specdec.core.branches import Branches
from specdec.core.pipeline import forget
from specdec.core.prefix import is_outcome
from specdec.core.round import Origin, Sent, TurnState, consume
from specdec.core.types import DraftBlock, Rescue

RESCUED = Origin(rescued=True)


def skippable(committed: list[int]) -> tuple[int, tuple[int, ...]]:
    """(start, assumed) of a block extending ``committed`` while the verdict that ended
    them awaits its rescue decision: it assumes that verdict's last token, so that the
    oracle skips it if it rescues."""
    return len(committed) - 1, tuple(committed[-1:])


def none_coming(state: TurnState, branches: Branches, outcome: tuple[int, ...]) -> None:
    """No block drafted ahead fits the verdict awaiting its decision: tell the oracle
    that none is coming, so that it decides at once. That is an empty block for
    ``outcome``, one the verdict was not, flagged as the last."""
    base = branches.start + len(branches.prefix)  # where the block they follow starts
    round_index = state.new_round()
    empty = DraftBlock(())
    verify = state.link.verify(round_index, base + len(outcome), empty, 0, outcome, True)
    asyncio.ensure_future(verify).add_done_callback(consume)


def adopt(
    state: TurnState, in_flight: deque[Sent], ahead: Ahead, rescue: Rescue
) -> tuple[deque[Sent], int]:
    """The oracle drafted the next block itself: it is the block in flight now.

    The oracle verifies it before anything else, so of the blocks still in flight
    only those that assume one of its outcomes (its prefix, then one more token)
    can still be verified: the draft's own block may have been the same. The rest
    are dropped (the oracle skips them), as is the drafting ahead, which restarts
    after the oracle's block. Returns the blocks in flight and how many were dropped.
    """
    ahead.forgive()
    committed, tokens = state.committed, rescue.block.token_ids
    kept: deque[Sent] = deque()
    for sent in in_flight:
        if is_outcome(sent.assumed[len(committed) - sent.start :], tokens):
            kept.append(sent)
        else:
            forget(sent, state.observer)
    drafting_ahead.drop(ahead)
    round_index, k = state.new_round(), len(rescue.block)
    if state.observer is not None:
        state.observer.round_started(round_index, k, 0)
    now = time.perf_counter_ns()
    head = Sent(round_index, k, rescue.block, len(committed), (), 0, now, rescue.result, RESCUED)
    return deque([head, *kept]), len(in_flight) - len(kept)
