"""Proposers: a ``Drafter`` behind the loop's async ``Proposer`` interface.

``InlineProposer`` runs a cheap drafter (n-gram) on the event loop;
``ThreadProposer`` runs a model drafter in a one-thread executor.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from specdec.core.sampling import SamplingParams
from specdec.core.types import Branch, BranchTicket, DraftBlock
from specdec.drafters import BranchingDrafter, Drafter
from specdec.drafters.branches import full_acceptance_branch


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
