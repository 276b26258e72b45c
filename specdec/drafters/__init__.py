"""Drafters: anything that proposes k tokens behind one small interface.

Modelled on transformers' ``CandidateGenerator``: ``propose`` then ``update``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from specdec.core.sampling import SamplingParams
from specdec.core.types import Branch, BranchTicket, DraftBlock


class Drafter(Protocol):
    """Proposes continuations of one sequence."""

    def propose(self, context: Sequence[int], k: int, params: SamplingParams) -> DraftBlock:
        """Propose up to k tokens continuing ``context`` (the committed tokens)."""
        ...

    def update(self, num_accepted: int) -> None:
        """Learn how many of the last proposal's tokens the oracle accepted."""
        ...


@runtime_checkable
class BranchingDrafter(Drafter, Protocol):
    """A drafter that can draft ahead for several outcomes of a verification at once."""

    def branch(
        self,
        context: Sequence[int],
        block: DraftBlock,
        k: int,
        params: SamplingParams,
        width: int,
        ticket: BranchTicket | None = None,
    ) -> list[Branch]:
        """Blocks for the likely outcomes of verifying ``block`` after ``context``: full
        acceptance first, then up to ``width`` likely corrections. ``ticket``: see
        ``specdec.core.types.BranchTicket``."""
        ...
