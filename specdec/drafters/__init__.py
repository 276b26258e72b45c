"""Drafters: anything that proposes k tokens behind one small interface.

Modelled on transformers' ``CandidateGenerator``: ``propose`` then ``update``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from specdec.sampling import SamplingParams
from specdec.verifier import DraftBlock


class Drafter(Protocol):
    """Proposes continuations of one sequence."""

    def propose(self, context: Sequence[int], k: int, params: SamplingParams) -> DraftBlock:
        """Propose up to k tokens continuing ``context`` (the committed tokens)."""
        ...

    def update(self, num_accepted: int) -> None:
        """Learn how many of the last proposal's tokens the oracle accepted."""
        ...
