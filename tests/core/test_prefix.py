"""The protocol predicates of ``specdec.core.prefix`` on tiny token lists, one case a line."""

from __future__ import annotations

from specdec.core.prefix import agrees, ends_with, held, is_outcome, may_hold


def test_agrees() -> None:
    # Equal where both exist.
    assert agrees([1, 2, 3], 1, [2, 3])
    # The claim reaches past the committed tokens: only the overlap counts.
    assert agrees([1, 2, 3], 2, [3, 4, 5])
    # The committed tokens reach past the claim: only the overlap counts.
    assert agrees([1, 2, 3, 4], 1, [2])
    # No overlap at all (the claim starts past the end): nothing to disagree with.
    assert agrees([1, 2], 3, [7])
    # An empty claim agrees with anything.
    assert agrees([1, 2], 0, [])
    # One differing token in the overlap refutes the claim.
    assert not agrees([1, 2, 3], 1, [2, 4])
    assert not agrees([1, 2, 3], 0, [9])


def test_may_hold() -> None:
    # Nothing committed after start yet: any assumption may still come true.
    assert may_hold([1, 2], 2, [3, 4])
    # Part of it committed, agreeing: the rest may still come.
    assert may_hold([1, 2, 3], 2, [3, 4])
    # All of it committed, exactly: the block extends the committed tokens as they are.
    assert may_hold([1, 2, 3, 4], 2, [3, 4])
    # A committed token refutes it.
    assert not may_hold([1, 2, 5], 2, [3, 4])
    # The committed tokens reach past the assumption: the block would be out of date.
    assert not may_hold([1, 2, 3, 4, 5], 2, [3, 4])
    # No assumption: holds only while nothing was committed after start.
    assert may_hold([1, 2], 2, [])
    assert not may_hold([1, 2, 3], 2, [])


def test_held() -> None:
    # The first 3 tokens end with [2, 3], whatever follows.
    assert held([1, 2, 3, 4], 3, [2, 3])
    assert held([1, 2, 3], 3, [2, 3])
    # Not all of the first 3 tokens exist yet.
    assert not held([1, 2], 3, [2, 3])
    # They exist but end otherwise.
    assert not held([1, 2, 9, 4], 3, [2, 3])
    # An empty tail: only the length matters.
    assert held([1, 2], 2, [])
    assert not held([1], 2, [])


def test_ends_with() -> None:
    # Exactly 3 tokens, ending with the tail: a block after them is verified now.
    assert ends_with([1, 2, 3], 3, [2, 3])
    assert ends_with([1, 2, 3], 3, [])
    # One token more or less than the block's base: skipped.
    assert not ends_with([1, 2, 3, 4], 3, [2, 3])
    assert not ends_with([1, 2], 3, [2, 3])
    # The right length, another last token: the guess was wrong, skipped.
    assert not ends_with([1, 2, 4], 3, [2, 3])
    # Works on tuples as well as lists.
    assert ends_with((1, 2, 3), 3, (3,))


def test_is_outcome() -> None:
    block = (5, 6, 7)
    # Every token accepted, then the bonus.
    assert is_outcome([5, 6, 7, 9], block)
    # The first token rejected: the correction alone.
    assert is_outcome([8], block)
    # Two accepted, then a correction (even one equal to the draft's token).
    assert is_outcome([5, 6, 1], block)
    assert is_outcome([5, 6, 7], block)
    # Longer than the block plus one: no verdict commits that much.
    assert not is_outcome([5, 6, 7, 9, 9], block)
    # A token before the last differs from the block: not a verdict on it.
    assert not is_outcome([5, 0, 7], block)
    # A verdict always commits one token at least.
    assert not is_outcome([], block)
    # An empty block's only outcomes are single tokens.
    assert is_outcome([4], ())
    assert not is_outcome([4, 4], ())
