"""Incremental detokenization for streamed text.

A character can be split across tokens (byte-level BPE splits multi-byte UTF-8
characters): decoding each new token alone would emit U+FFFD. As vLLM and TGI
do, decode a small window of recent tokens and emit only the text that grew
past the previous window, holding back while the window ends in an incomplete
character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed committed token ids, get the text they add, never a broken character."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this are already emitted

    def feed(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly complete text (possibly empty)."""
        self._tokens.extend(token_ids)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""  # wait for the rest of a split character
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return full[len(prefix) :]

    def flush(self) -> str:
        """The text still held back (a truly invalid byte sequence stays U+FFFD)."""
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return full[len(prefix) :]
