"""The loop's side of branches: blocks drafted ahead for the likely outcomes of a block in flight.

While block n is verified the draft drafts, in one batched pass, after its full
acceptance (a guess of its bonus token, then block n+1) and, greedy
(``Turn.branches``), after its likeliest rejections, each corrected by one of its
next choices there (``specdec.drafters.branches``). Whichever of these outcomes
verdict n turns out to be, its next block is ready. If it is none of them (a
miss), that drafting is stopped at its next step (``BranchTicket``) and the next
block is drafted at once.

``Branches`` is that drafting as the loop holds it. The drafting thread publishes
the outcomes it chose on the ticket before it drafts any row, so the loop knows on a
verdict whether to wait for the blocks or to stop them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from specdec.core.prefix import agrees, ends_with, may_hold
from specdec.core.protocols import Proposer
from specdec.core.round import consume
from specdec.core.sampling import SamplingParams
from specdec.core.types import MAX_BRANCHES, Branch, BranchTicket, DraftBlock, Turn

# A branch still possible: (branch, drafted for a correction, the length its block
# extends, the tokens it assumes beyond the committed ones).
Possible = tuple[Branch, bool, int, tuple[int, ...]]


def branch_width(turn: Turn) -> int:
    """Likely corrections drafted ahead per block in flight, besides its full acceptance.
    Greedy only: a sampled correction is a draw from norm(max(0, p - q)), not the draft's
    runner-up."""
    return min(max(0, turn.branches), MAX_BRANCHES) if turn.params.greedy else 0


@dataclass
class Branches:
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
        if len(committed) > self.reach or not agrees(committed, self.start, self.prefix):
            return False
        outcomes = self.ticket.outcomes
        return outcomes is None or any(
            may_hold(committed, self.start, (*self.prefix, *assumed)) for assumed in outcomes
        )

    async def settled(self) -> None:
        """Until the branches are chosen (or their drafting ended without choosing)."""
        if self.ticket.outcomes is None:
            racing: set[asyncio.Future[Any]] = {self.task, self.chosen}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)

    async def block_for(self, committed: list[int]) -> tuple[DraftBlock, bool] | None:
        """(block, drafted for a correction) of the branch drafted for exactly the
        committed tokens, once drafted; None if no branch was."""
        for index, branch in enumerate(await self.task):
            guessed = self.guessed(branch)
            if len(branch.block) and ends_with(committed, self.start + len(guessed), guessed):
                return branch.block, index > 0
        return None

    def still_possible(self, committed: list[int]) -> list[Possible]:
        """The drafted branches whose outcome the committed tokens do not refute yet, in
        the order they go on the wire: the alternatives first and the full acceptance
        last, so that blocks drafted after it follow it."""
        branches = self.task.result()
        possible: list[Possible] = []
        for index in [*range(1, len(branches)), 0][: len(branches)]:
            branch = branches[index]
            guessed = self.guessed(branch)
            if len(branch.block) and may_hold(committed, self.start, guessed):
                base = self.start + len(guessed)
                possible.append((branch, index > 0, base, guessed[len(committed) - self.start :]))
        return possible

    def missed(self, committed: list[int]) -> list[tuple[int, ...]]:
        """The chosen outcomes (``assumed`` after the block in flight) that the committed
        tokens refute."""
        return [
            assumed
            for assumed in self.ticket.outcomes or ()
            if not agrees(committed, self.start, (*self.prefix, *assumed))
        ]

    def drop(self) -> None:
        """Nothing drafted here is wanted: the drafting stops at its next step."""
        self.ticket.cancelled = True
        self.task.add_done_callback(consume)


def draft_branches(
    proposer: Proposer,
    committed: Sequence[int],
    context: list[int],
    block: DraftBlock,
    k: int,
    params: SamplingParams,
    width: int,
) -> Branches:
    """Start drafting k tokens after the outcomes of ``block`` (drafted after ``context``,
    which extends the first ``len(committed)`` of them): its full acceptance and up to
    ``width`` likely corrections."""
    chosen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ticket = BranchTicket(_threadsafe_setter(chosen))
    task = asyncio.ensure_future(proposer.branch(context, block, k, params, width, ticket))
    start = len(committed)
    reach = len(context) + len(block) + 1
    return Branches(start, tuple(context[start:]), reach, task, ticket, chosen)


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
