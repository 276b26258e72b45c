"""Prompt-lookup drafting: propose what followed the last earlier occurrence of the context's tail.

No model at all (as vLLM's ``NgramProposer`` and HF's
``PromptLookupCandidateGenerator``): text that quotes or repeats its context
(code edits, summaries, retrieval answers) often continues an n-gram it has
already seen the same way. Blocks are token-only (q=None): the verifier treats
each proposed token as a point mass, which is lossless for any proposer.
"""

from __future__ import annotations

from collections.abc import Sequence

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock


class NgramDrafter:
    """Proposes the tokens that followed the most recent earlier match of the last n tokens.

    The longest n in [min_ngram, max_ngram] with a match wins; among matches of that
    n, the most recent one (closest to the end) is used. The proposal runs up to k
    tokens, or to the end of the context, whichever comes first.

    Example:
        context = [1, 2, 3, 4, 2, 3], min_ngram = 2, max_ngram = 3, k = 4
        3-gram [4, 2, 3]: no earlier occurrence.
        2-gram [2, 3]: occurs earlier at index 1; the tokens after it are [4, 2, 3].
        -> propose [4, 2, 3] (only 3 tokens: the context ends there).

        context = [5, 6, 7, 9, 5, 6, 8, 5, 6], k = 2
        2-gram [5, 6]: earlier at indices 0 and 4; the most recent (4) is followed by [8, 5].
        -> propose [8, 5].

        context = [1, 2, 3], any k
        no n-gram of the tail occurs earlier -> propose [] (an empty block).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgument(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                f"max_ngram={max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # (proposed, accepted) per round, in order.
        self.history: list[tuple[int, int]] = []
        self._last_proposed = 0

    def reset(self, seed: int | None = None) -> None:
        """Start a new sequence (the seed is unused: lookup is deterministic)."""
        self.history.clear()
        self._last_proposed = 0

    def propose(self, context: Sequence[int], k: int, params: SamplingParams) -> DraftBlock:
        """Up to k tokens continuing ``context`` by lookup; empty when nothing matches."""
        tokens = find_continuation(list(context), k, self.min_ngram, self.max_ngram)
        self._last_proposed = len(tokens)
        return DraftBlock(token_ids=tuple(tokens))

    def update(self, num_accepted: int) -> None:
        """Record how many tokens of the last proposal the oracle accepted."""
        self.history.append((self._last_proposed, num_accepted))


def find_continuation(context: list[int], k: int, min_ngram: int, max_ngram: int) -> list[int]:
    """The up-to-k tokens after the most recent earlier occurrence of the longest matching tail."""
    length = len(context)
    if k <= 0 or length < 2:
        return []
    last = context[-1]
    # An n-gram needs an earlier occurrence, so n <= length - 1.
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = context[length - n :]
        # Candidate occurrences context[j : j+n], j from the most recent (length-n-1) back
        # to 0; its last token context[j+n-1] must equal the context's last token.
        for end in range(length - 2, n - 2, -1):
            if context[end] == last and context[end - n + 1 : end + 1] == tail:
                return context[end + 1 : end + 1 + k]
    return []
