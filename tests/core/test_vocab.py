"""The pairing rule of drafts and oracles, on its own."""

from __future__ import annotations

from specdec.core.vocab import vocabulary_mismatch


def test_same_tokenizer_pairs_whatever_the_padding() -> None:
    assert vocabulary_mismatch("abc", 96, "abc", 96) is None
    assert vocabulary_mismatch("abc", 80, "abc", 96) is None  # the oracle scores every id
    assert vocabulary_mismatch("abc", 0, "abc", 96) is None  # size not reported


def test_other_tokenizer_or_wider_draft_is_refused_with_the_reason() -> None:
    reason = vocabulary_mismatch("abc", 96, "xyz", 96)
    assert reason is not None and "different tokenizers" in reason and "xyz" in reason
    reason = vocabulary_mismatch("abc", 96, "abc", 80)
    assert reason is not None and "96" in reason and "80" in reason
