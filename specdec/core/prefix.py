"""Does a block's assumed prefix hold? The protocol's predicates, in one place.

A block is drafted after a sequence of tokens. Sent before the verdicts that
commit all of them (pipelining, drafting ahead, rescue), it carries the ones not
yet committed as ``assumed``: the block extends committed[:start] + assumed, and
is verified after ``base = start + len(assumed)`` tokens. Its assumption may

* still hold (``may_hold``): the committed tokens after ``start`` are a prefix of
  ``assumed``, so the verdicts still to come may commit the rest;
* hold now (``ends_with``): the committed tokens are exactly those ``base``: the
  oracle verifies the block (and skips it, verdict None, otherwise);
* have held (``held``): the committed tokens reach past ``base`` and the block's
  assumed tokens are among them.

The drafting side decides with the first which blocks in flight and drafts ahead
to keep; the oracle with the second whether to verify or skip a block. The loop's
and the oracle's answers must agree, or a block the loop still awaits is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence


def agrees(committed: Sequence[int], start: int, tokens: Sequence[int]) -> bool:
    """``committed`` agrees with ``tokens`` (claimed from position ``start``) wherever
    both exist."""
    n = min(len(committed) - start, len(tokens))
    return n <= 0 or list(committed[start : start + n]) == list(tokens[:n])


def may_hold(committed: Sequence[int], start: int, assumed: Sequence[int]) -> bool:
    """committed[start:] is a prefix of ``assumed``: a block drafted after
    committed[:start] + assumed may still be verified (none of its tokens is refuted,
    and the committed tokens do not reach past them)."""
    return len(committed) <= start + len(assumed) and agrees(committed, start, assumed)


def held(committed: Sequence[int], base: int, tail: Sequence[int]) -> bool:
    """The first ``base`` committed tokens exist and end with ``tail``."""
    return len(committed) >= base and list(committed[base - len(tail) : base]) == list(tail)


def ends_with(committed: Sequence[int], length: int, tail: Sequence[int]) -> bool:
    """``committed`` has exactly ``length`` tokens and its last ones are ``tail``."""
    return len(committed) == length and held(committed, length, tail)


def is_outcome(assumed: Sequence[int], block: Sequence[int]) -> bool:
    """``assumed`` is what a verdict on ``block`` may commit: the block's first n tokens
    (n <= len(block)), then one more (the correction, or the bonus when n = len(block))."""
    n = len(assumed) - 1
    return 0 <= n <= len(block) and list(assumed[:n]) == list(block[:n])
