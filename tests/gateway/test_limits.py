"""Request limits (``gateway.limits``): each names its flag; the defaults follow the context."""

from __future__ import annotations

import pytest

from gateway.limits import (
    ASSIGNMENT_SLACK_BYTES,
    FALLBACK_CONTEXT,
    RequestLimits,
    check_fits_worker_link,
    longest_token_chars,
)
from specdec.core.errors import InvalidArgument
from specdec.rpc.server import MAX_MESSAGE_BYTES

LIMITS = RequestLimits(
    max_request_bytes=1 << 20, max_prompt_chars=0, max_stop_strings=2, max_stop_chars=5,
    token_chars=4,
)  # fmt: skip


def test_the_default_prompt_limit_is_what_the_context_could_hold() -> None:
    assert LIMITS.prompt_chars(context=100) == 400
    assert LIMITS.prompt_chars(context=0) == FALLBACK_CONTEXT * 4  # no oracle yet
    LIMITS.check("x" * 400, (), context=100)
    with pytest.raises(InvalidArgument, match=r"401 characters, over the limit of 400 \(--max-pr"):
        LIMITS.check("x" * 401, (), context=100)
    fixed = RequestLimits(1 << 20, max_prompt_chars=10, max_stop_strings=2, max_stop_chars=5)
    with pytest.raises(InvalidArgument, match=r"over the limit of 10 \(--max-prompt-chars\)$"):
        fixed.check("x" * 11, (), context=100)


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (["a", "b", "c"], r"3 strings, over the limit of 2 \(--max-stop-strings\)"),
        (["abcdef"], r"6 characters, over the limit of 5 \(--max-stop-chars\)"),
    ],
)
def test_stop_strings_are_bounded(stop: list[str], message: str) -> None:
    LIMITS.check("p", ["a", "abcde"], context=100)
    with pytest.raises(InvalidArgument, match=message):
        LIMITS.check("p", stop, context=100)


def test_grpc_reads_at_most_twice_the_request_limit() -> None:
    assert LIMITS.receive_bytes == 4 << 20  # the floor: worker messages always fit
    big = RequestLimits(16 << 20, 0, 2, 5)
    assert big.receive_bytes == 32 << 20
    assert RequestLimits(MAX_MESSAGE_BYTES, 0, 2, 5).receive_bytes == MAX_MESSAGE_BYTES
    for bad in (0, MAX_MESSAGE_BYTES + 1):
        with pytest.raises(InvalidArgument, match="--max-request-bytes"):
            RequestLimits(bad, 0, 2, 5)
    with pytest.raises(InvalidArgument, match="--max-stop-chars"):
        RequestLimits(1 << 20, 0, 2, -1)


def test_a_turn_too_large_for_the_worker_link_is_refused_before_it_starts() -> None:
    check_fits_worker_link(MAX_MESSAGE_BYTES - ASSIGNMENT_SLACK_BYTES, 10)
    with pytest.raises(InvalidArgument, match="message limit of the worker links"):
        check_fits_worker_link(MAX_MESSAGE_BYTES - ASSIGNMENT_SLACK_BYTES + 1, 10)


def test_longest_token_chars(tiny_tokenizer: object) -> None:
    longest = longest_token_chars(tiny_tokenizer)
    vocab = tiny_tokenizer.get_vocab()  # type: ignore[attr-defined]
    assert longest == max(len(t) for t in vocab) and longest >= len("</s>")
