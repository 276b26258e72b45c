"""SequenceCache: any interleaving of extends and rollbacks equals a fresh full recompute."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec.core.errors import InvalidArgument
from specdec.engine.kv_cache import SequenceCache
from tests.conftest import VOCAB_SIZE

ATOL = 1e-4

# An operation is ("extend", ids) or ("rollback", r): roll back to r mod (len + 1).
token_ids = st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=6)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("extend"), token_ids),
        st.tuples(st.just("rollback"), st.integers(0, 1000)),
    ),
    min_size=1,
    max_size=10,
)


@torch.inference_mode()
def full_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] logits of one forward over the whole sequence, no cache."""
    return model.model(torch.tensor([tokens])).logits[0].float()


def run_and_check(model: Any, ops: list[tuple[str, Any]], last: int) -> None:
    cache = SequenceCache(model)
    for op, arg in ops:
        if op == "extend":
            logits = cache.extend(arg)  # [n, V]
            assert logits.shape == (len(arg), VOCAB_SIZE)
            # Each new row equals the same row of a recompute from scratch.
            expected = full_logits(model, cache.tokens)[-len(arg) :]
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
        else:
            length = arg % (len(cache) + 1)
            kept = cache.tokens[:length]
            cache.rollback(length)
            assert cache.tokens == kept
    # Next-token logits after all of it, through the cache and from scratch.
    next_logits = cache.extend([last])[-1]
    torch.testing.assert_close(next_logits, full_logits(model, cache.tokens)[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
def test_extend_rollback_matches_recompute(arch: str, loaded: Callable[..., Any]) -> None:
    model = loaded(arch, "oracle")

    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(ops=operations, last=st.integers(0, VOCAB_SIZE - 1))
    def check(ops: list[tuple[str, Any]], last: int) -> None:
        run_and_check(model, ops, last)

    check()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sync_reuses_common_prefix(arch: str, loaded: Callable[..., Any]) -> None:
    model = loaded(arch, "oracle")

    @settings(max_examples=15, deadline=None, derandomize=True)
    @given(
        first=st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=20),
        second=st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=20),
        shared=st.integers(0, 20),
    )
    def check(first: list[int], second: list[int], shared: int) -> None:
        target = first[:shared] + second
        cache = SequenceCache(model)
        cache.extend(first)
        reused = cache.sync(target)
        # The longest common prefix is kept, nothing else.
        expected = 0
        while expected < min(len(first), len(target)) and first[expected] == target[expected]:
            expected += 1
        assert reused == expected == len(cache)
        assert cache.tokens == target[:reused]
        if reused < len(target):
            logits = cache.extend(target[reused:])
            torch.testing.assert_close(
                logits[-1], full_logits(model, target)[-1], atol=ATOL, rtol=0
            )

    check()


def test_rollback_bounds(loaded: Callable[..., Any]) -> None:
    cache = SequenceCache(loaded("llama", "oracle"))
    cache.extend([3, 4, 5])
    with pytest.raises(InvalidArgument):
        cache.rollback(4)
    with pytest.raises(InvalidArgument):
        cache.rollback(-1)
    cache.rollback(3)  # no-op
    assert cache.tokens == [3, 4, 5]
    cache.rollback(0)
    assert len(cache) == 0
    assert cache.memory_bytes() == 0


def test_memory_grows_and_shrinks_with_tokens(loaded: Callable[..., Any]) -> None:
    cache = SequenceCache(loaded("gpt2", "oracle"))
    cache.extend([3, 4])
    two = cache.memory_bytes()
    assert two > 0
    cache.extend([5, 6])
    assert cache.memory_bytes() == 2 * two
    cache.rollback(1)
    assert cache.memory_bytes() == two // 2


def test_extend_rejects_bad_ids_and_context_overflow(loaded: Callable[..., Any]) -> None:
    model = loaded("llama", "oracle")
    cache = SequenceCache(model)
    with pytest.raises(InvalidArgument, match="vocabulary"):
        cache.extend([VOCAB_SIZE])
    with pytest.raises(InvalidArgument, match="vocabulary"):
        cache.extend([-1])
    with pytest.raises(InvalidArgument):
        cache.extend([])
    cache.extend([3] * model.max_context)
    with pytest.raises(InvalidArgument, match="context"):
        cache.extend([3])
    # A rejected extend leaves the cache as it was.
    assert len(cache) == model.max_context


def test_logits_to_keep_returns_last_rows(loaded: Callable[..., Any]) -> None:
    model = loaded("qwen2", "oracle")
    full = SequenceCache(model).extend([5, 6, 7, 8])
    last = SequenceCache(model).extend([5, 6, 7, 8], logits_to_keep=1)
    assert last.shape == (1, VOCAB_SIZE)
    torch.testing.assert_close(last[0], full[-1], atol=ATOL, rtol=0)
