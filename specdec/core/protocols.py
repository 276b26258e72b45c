"""The interfaces the round loop runs against: the oracle link, the proposer, the k policy,
the round observer and the commit callbacks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from specdec.core.sampling import SamplingParams
from specdec.core.types import (
    Branch,
    BranchTicket,
    DraftBlock,
    OpenResult,
    RoundReport,
    VerifyResult,
)


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

    def speculating(self) -> bool:
        """False while the policy takes plain steps (k = 0) and drafts only an occasional
        probe: nothing is then drafted ahead or for likely corrections."""
        ...

    def observe(self, report: RoundReport) -> None: ...


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


OnCommit = Callable[[list[int], RoundReport], Awaitable[None]]


OnOpen = Callable[[OpenResult], Awaitable[None]]
