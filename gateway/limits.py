"""How large a Generate request may be, checked before any work is done on it.

One large request must not stall the gateway or knock a worker off it: tokenising
16 MB of text on the event loop froze every other stream for 25 s, and an assignment
carrying 64 MiB of stop strings exceeded the worker link's message limit and broke the
draft's stream. So, in this order, each before the work it bounds:

* the request's bytes (``--max-request-bytes``), before it is parsed
  (``specdec.rpc.request_guard``). Reading a request at all stalls the event loop and
  grows the heap by about its size (60 MB: ~0.3 s, ~60 MB), so grpc reads none larger
  than ``receive_bytes``, twice the limit: beyond, it refuses the request unread, with
  its own RESOURCE_EXHAUSTED ("Received message larger than max");
* the prompt's characters (``--max-prompt-chars``), before it is tokenised, which then
  happens off the event loop; by default what the largest registered oracle's context
  could hold: its context in tokens times the characters of the tokenizer's longest
  token (a prompt beyond that cannot fit, whatever it says);
* the stop strings: how many (``--max-stop-strings``) and how long each
  (``--max-stop-chars``);
* the message a turn sends its worker, which must fit the worker link's limit.

Every violation is INVALID_ARGUMENT naming the limit and its flag, but for requests
too large for grpc to read (over twice ``--max-request-bytes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from specdec.core.errors import InvalidArgument
from specdec.rpc.server import MAX_MESSAGE_BYTES

RECEIVE_FLOOR_BYTES = 4 * 1024 * 1024
# The context the default prompt limit assumes while no oracle is registered.
FALLBACK_CONTEXT = 131_072
# Room for what an assignment carries besides the session's tokens and the stop strings
# (ids, grant, ticket, trace context, settings), so that the check before the turn holds
# for every attempt of it.
ASSIGNMENT_SLACK_BYTES = 16 * 1024


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the tokenizer's longest vocabulary entry as stored, which bounds the
    text any one token stands for (byte-level BPE stores a character per byte)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


@dataclass(frozen=True)
class RequestLimits:
    """The gateway's limits on one Generate request (see the module docstring)."""

    max_request_bytes: int
    max_prompt_chars: int  # 0: what the oracle's context could hold
    max_stop_strings: int
    max_stop_chars: int
    token_chars: int = 1  # the tokenizer's longest token, in characters

    def __post_init__(self) -> None:
        if not 0 < self.max_request_bytes <= MAX_MESSAGE_BYTES:
            raise InvalidArgument(
                f"--max-request-bytes must be in [1, {MAX_MESSAGE_BYTES}] (gRPC's message "
                f"limit), got {self.max_request_bytes}"
            )
        for flag, value in (
            ("--max-prompt-chars", self.max_prompt_chars),
            ("--max-stop-strings", self.max_stop_strings),
            ("--max-stop-chars", self.max_stop_chars),
        ):
            if value < 0:
                raise InvalidArgument(f"{flag} must be >= 0, got {value}")

    @property
    def receive_bytes(self) -> int:
        """The most bytes grpc reads of one request (see the module docstring); worker
        messages to the gateway are far smaller than its floor."""
        return min(max(2 * self.max_request_bytes, RECEIVE_FLOOR_BYTES), MAX_MESSAGE_BYTES)

    def prompt_chars(self, context: int) -> int:
        """The most characters of a text prompt, for an oracle of ``context`` tokens
        (0: none registered)."""
        return self.max_prompt_chars or (context or FALLBACK_CONTEXT) * self.token_chars

    def check(self, prompt: str, stop: Sequence[str], context: int) -> None:
        """Raise ``InvalidArgument`` for the first limit a request exceeds; ``context``:
        the largest registered oracle's context in tokens (0: none registered)."""
        chars = self.prompt_chars(context)
        if len(prompt) > chars:
            why = (
                ""
                if self.max_prompt_chars
                else (
                    f"; by default what a context of {context or FALLBACK_CONTEXT} tokens could "
                    "hold"
                )
            )
            raise InvalidArgument(
                f"the prompt has {len(prompt)} characters, over the limit of {chars} "
                f"(--max-prompt-chars{why})"
            )
        if len(stop) > self.max_stop_strings:
            raise InvalidArgument(
                f"sampling.stop has {len(stop)} strings, over the limit of "
                f"{self.max_stop_strings} (--max-stop-strings)"
            )
        longest = max((len(s) for s in stop), default=0)
        if longest > self.max_stop_chars:
            raise InvalidArgument(
                f"a stop string has {longest} characters, over the limit of "
                f"{self.max_stop_chars} (--max-stop-chars)"
            )


def check_fits_worker_link(size: int, context_tokens: int) -> None:
    """A turn whose assignment (``size`` bytes, ``context_tokens`` in the session) would
    not fit the worker link's message limit is refused before it starts."""
    if size + ASSIGNMENT_SLACK_BYTES > MAX_MESSAGE_BYTES:
        raise InvalidArgument(
            f"this turn would send its worker {size} bytes (the session's {context_tokens} "
            f"tokens and the stop strings), over the {MAX_MESSAGE_BYTES}-byte message limit "
            "of the worker links: start a new session, or send fewer or shorter stop "
            "strings (--max-stop-strings, --max-stop-chars, --max-request-bytes)"
        )
