"""When generation ends: EOS, stop token ids, stop strings and max_new_tokens.

A speculative round commits several tokens at once; ``StopChecker.feed`` takes them and
says how many to keep, so that the kept output equals what HF ``generate`` would return
token by token:

* EOS / stop token id: generation ends right *after* the first such token (it is kept).
* stop string: generation ends right after the first token whose addition makes the
  generated text contain the string (that token is kept, as HF ``StopStringCriteria``).
* max_new_tokens: the output is cut at exactly that many tokens.

When one token triggers several, the reason reported is the first of EOS, STOP_TOKEN,
STOP_STRING, LENGTH.

Stop strings are matched on the text decoded from the *generated* tokens only. Because
the text seen before a token was added contained no stop string, a match that appears
when token t is added must overlap t's text; it spans at most len(utf8(s)) tokens (each
token decodes to >= 1 byte), so decoding a tail window of that many tokens (plus a margin
for decoders that treat the first token of a text specially, e.g. SentencePiece's
leading space) suffices. Known differences from HF: HF also matches a string that starts
inside the prompt, and HF matches on vocabulary strings rather than ``decode`` output
(equal for byte-level BPE, may differ for tokens that decode to nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from specdec.core.errors import InvalidArgument

if TYPE_CHECKING:  # annotations only: the sampling module loads torch
    from specdec.core.sampling import SamplingParams

# Extra tokens decoded in front of the longest possible match (see module docstring).
_WINDOW_MARGIN = 2


class FinishReason(str, Enum):
    """Why a sequence stopped."""

    LENGTH = "length"
    EOS = "eos"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    CONTEXT_LIMIT = "context_limit"  # the model's context window is full (set by the loop)


class StopResult(NamedTuple):
    """keep: how many of the fed tokens belong to the output; reason: None = continue."""

    keep: int
    reason: FinishReason | None


class StopChecker:
    """Tracks one sequence's generated tokens and decides where it ends.

    params: max_new_tokens, stop_token_ids and stop strings are read from it.
    eos_token_ids: the model's EOS ids (reported as EOS rather than STOP_TOKEN).
    decode: token ids -> text; required when ``params.stop`` is non-empty.
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.max_new_tokens = params.max_new_tokens
        self.stop_strings: tuple[str, ...] = tuple(params.stop)
        self._eos = frozenset(eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids) - self._eos
        if self.stop_strings and decode is None:
            raise InvalidArgument("stop strings need a tokenizer to decode the output; none is set")
        self._decode = decode
        # A match needs at most len(utf8(s)) tokens; the window adds a margin in front.
        self._window = (
            max(len(s.encode("utf-8")) for s in self.stop_strings) + _WINDOW_MARGIN
            if self.stop_strings
            else 0
        )
        self._tail: list[int] = []  # last (window - 1) generated tokens
        self.num_generated = 0
        self.finish_reason: FinishReason | None = None
        self.matched_stop: str | None = None  # the stop string that ended generation

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, tokens: Sequence[int]) -> StopResult:
        """Take a round's newly committed tokens; return how many to keep and why it ended.

        After the sequence has finished, every further call keeps 0 tokens.
        """
        if self.finish_reason is not None:
            return StopResult(0, self.finish_reason)
        remaining = self.max_new_tokens - self.num_generated
        new = [int(t) for t in tokens[:remaining]]

        # First token id that ends generation (it is kept), if any.
        end, reason = len(new), None
        for j, t in enumerate(new):
            if t in self._eos:
                end, reason = j + 1, FinishReason.EOS
                break
            if t in self._stop_ids:
                end, reason = j + 1, FinishReason.STOP_TOKEN
                break
        # A stop string completed strictly earlier wins; on the same token the id wins.
        if self.stop_strings:
            hit = self._first_string_stop(new[: end - 1] if reason is not None else new)
            if hit is not None:
                end, reason = hit[0] + 1, FinishReason.STOP_STRING
                self.matched_stop = hit[1]
        if reason is None and end == remaining:
            reason = FinishReason.LENGTH

        kept = new[:end]
        self.num_generated += len(kept)
        if self._window:
            self._tail = (self._tail + kept)[-(self._window - 1) :]
        self.finish_reason = reason
        return StopResult(len(kept), reason)

    def _first_string_stop(self, new: list[int]) -> tuple[int, str] | None:
        """(index in ``new``, string) of the first token whose addition completes a stop string."""
        if not new:
            return None
        assert self._decode is not None
        ctx = self._tail + new
        # Cheap filter: each token's window text is a substring of decode(ctx), so no
        # match there means no token of this round completes one.
        if self._find_stop(self._decode(ctx)) is None:
            return None
        base = len(self._tail)
        for j in range(len(new)):
            hi = base + j + 1
            s = self._find_stop(self._decode(ctx[max(0, hi - self._window) : hi]))
            if s is not None:
                return j, s
        return None

    def _find_stop(self, text: str) -> str | None:
        return next((s for s in self.stop_strings if s in text), None)


def turn_stop_checker(
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    decode: Callable[[list[int]], str] | None = None,
) -> StopChecker:
    """The checker of one turn of a service: EOS ends it only when EOS is among the stop
    ids (a request with ``ignore_eos`` leaves it out of them); ``decode`` is kept only
    when there are stop strings to match."""
    eos = [t for t in eos_token_ids if t in params.stop_token_ids]
    return StopChecker(params, eos, decode if params.stop else None)
