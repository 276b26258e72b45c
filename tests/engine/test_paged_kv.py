"""Paged KV: HF's verdicts and KV from block tables, bit-identical rows in any batch, and
blocks taken and given back as sessions grow, reserve and leave.

The CPU runs the pool's forward eagerly, with the shapes its CUDA graphs replay (row,
token and width buckets; M tokens a forward with batch invariance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from oracle_service.sessions import SessionStore
from specdec.core.errors import InvalidArgument, ResourceExhausted
from specdec.core.types import DraftBlock, committed_tokens
from specdec.engine import paged_kv
from specdec.engine.batched import verify_batch
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle
from specdec.engine.paged_kv import BLOCK_SIZE, PagedCache, PagedPool, paged_pool_for
from tests.engine.test_batched_verify import (
    CONTINUE,
    GREEDY,
    ROWS,
    assert_same_kv,
    greedy_generate,
    make_rows,
    outcome_verdict,
)


def ids(n: int) -> list[int]:
    """n token ids inside the tiny vocabulary."""
    return [3 + i % 90 for i in range(n)]


def pool_of(model: LoadedModel, blocks: int = 64, **kwargs: Any) -> PagedPool:
    return PagedPool(model, blocks, max_rows=4, cuda_graphs=False, **kwargs)


@pytest.mark.parametrize("invariant", [True, False])
@pytest.mark.parametrize("mode", ["greedy", "q"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_paged_rows_get_hfs_verdicts_kv_and_continuations(
    arch: str, mode: str, invariant: bool, loaded: Callable[[str, str], LoadedModel]
) -> None:
    """Five rows (cached 0..29, k 0..8, some needing a prefill) over max_rows 4: two
    forwards. Verdicts, KV and the greedy continuation are HF's; an idle session's blocks
    are untouched."""
    model = loaded(arch, "oracle")
    pool = pool_of(model, batch_invariant=invariant, verify_tokens=40)
    paged, plain = Oracle(model, pool), Oracle(model)
    idle = paged.new_cache()
    idle.extend([1, *range(10, 40)])
    before = [t.clone() for layer in idle.layer_kv() or [] for t in layer]
    accepted: set[int] = set()
    for seed in (21, 22):
        made = make_rows(model, paged, mode, seed, ROWS, alone_oracle=plain)
        assert all(isinstance(item.cache, PagedCache) for item in made.batched)
        result = verify_batch(paged, made.batched)
        assert (result.forward_rows, result.fallback) == (len(ROWS), None)
        for batched, alone, outcome in zip(made.batched, made.alone, result.results, strict=True):
            verdict = outcome_verdict(outcome)
            assert verdict == plain.verify(
                alone.cache, alone.committed, alone.block, alone.params, alone.seed
            )
            accepted.add(verdict.num_accepted)
            assert_same_kv(batched.cache, alone.cache)
        if seed == 21 and mode == "greedy":
            for batched, outcome in zip(made.batched, result.results, strict=True):
                tokens = [
                    *batched.committed,
                    *committed_tokens(batched.block, outcome_verdict(outcome)),
                ]
                for token in greedy_generate(model, tokens, CONTINUE):
                    step = paged.verify(batched.cache, tokens, DraftBlock(()), GREEDY, seed=0)
                    assert step.next_token == token
                    tokens.append(step.next_token)
        for item in made.batched:
            item.cache.release()
    after = [t for layer in idle.layer_kv() or [] for t in layer]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert 0 in accepted and max(accepted) >= 2


@pytest.mark.parametrize("block", [[], [5, 9, 11, 30]])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_rows_logits_are_bit_identical_alone_and_in_any_batch(
    arch: str, block: list[int], loaded: Callable[[str, str], LoadedModel]
) -> None:
    """Batch invariance: the same session (context, block) verified alone, then in batches
    of other sessions with other lengths and k, and at another place in the batch, gets
    bit-identical logits, and so do the keys/values it leaves. (Without it, the CPU's
    GEMM already rounds a 1-token forward differently from a 40-token one.)"""
    model = loaded(arch, "oracle")
    pool = pool_of(model, batch_invariant=True, verify_tokens=40)
    g = torch.Generator().manual_seed(5)

    def context(n: int) -> list[int]:
        return [1, *torch.randint(3, model.vocab_size, (n - 1,), generator=g).tolist()]

    mine = context(23)
    others = [(context(n), list(range(3, 3 + k))) for n, k in ((7, 0), (51, 6), (2, 2))]

    def run(batch: list[tuple[list[int], list[int]]], at: int) -> tuple[torch.Tensor, Any]:
        batch = [*batch[:at], (mine, block), *batch[at:]]
        caches = [pool.new_cache() for _ in batch]
        for cache, (tokens, _) in zip(caches, batch, strict=True):
            pool.prefill(cache, tokens[:-1])
        forward = pool.forward_rows(caches, [[t[-1], *b] for t, b in batch])
        kv = [t.clone() for layer in caches[at].layer_kv() or [] for t in layer]
        logits = forward.logits[at, : len(block) + 1].clone()
        for cache in caches:
            cache.release()
        return logits, kv

    alone, kv_alone = run([], 0)
    for batch, at in ((others, 1), (others[:2], 2), (others[1:], 0)):
        logits, kv = run(batch, at)
        assert torch.equal(logits, alone), (len(batch), at)
        assert all(torch.equal(a, b) for a, b in zip(kv, kv_alone, strict=True))
    reference = SequenceCache(model)
    reference.extend(mine[:-1])
    torch.testing.assert_close(alone, reference.extend([mine[-1], *block]), atol=2e-5, rtol=0)


def test_without_batch_invariance_the_forward_takes_the_grid_tokens_only(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    model = loaded("llama", "oracle")
    fast, invariant = pool_of(model, batch_invariant=False), pool_of(model, verify_tokens=40)
    assert (fast._grid_tokens(2, 5), invariant._grid_tokens(2, 5)) == (10, 40)
    assert invariant._chunks([5, 5, 5, 5]) == [[0, 1, 2, 3]]  # 4 rows x 5 <= 40
    assert invariant._chunks([9, 9, 9, 9, 2]) == [[0, 1, 2, 3], [4]]  # 4 x 9 <= 40, max rows 4
    assert invariant._chunks([17, 17, 3]) == [[0, 1], [2]]  # 2 x 17 fits, 4 (bucket) x 17 not
    assert fast._chunks([33] * 5) == [[0, 1, 2, 3], [4]]
    # The oracle's batches are what one forward holds (its scheduler asks this).
    for pool in (fast, invariant):
        for sizes in ([5] * 4, [9] * 4, [9, 9, 9, 9, 2], [17, 17, 3], [17, 17], [33] * 5, [1]):
            assert pool.fits_one_forward(sizes) == (len(pool._chunks(sizes)) == 1), sizes
    with pytest.raises(InvalidArgument, match="--verify-tokens"):
        pool_of(model, verify_tokens=20)


def test_blocks_follow_use_and_reservations_gate_admission(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    model = loaded("llama", "oracle")
    pool = pool_of(model, blocks=10)
    a, b = pool.new_cache(), pool.new_cache()
    a.extend(ids(20))  # 20 positions: 2 blocks
    assert (len(a.blocks), pool.free_blocks, a.memory_bytes()) == (2, 8, 2 * pool.block_bytes)
    a.rollback(5)
    assert len(a.blocks) == 2  # kept for the next verify
    assert b.reserve(6 * BLOCK_SIZE) and pool.available_blocks == 8 - 6
    assert not a.reserve(5 * BLOCK_SIZE)  # 2 held + 3 more > 2 available
    assert a.reserve(4 * BLOCK_SIZE) and pool.available_blocks == 0
    with pytest.raises(InvalidArgument, match="whole KV pool holds 10 blocks"):
        pool.new_cache().reserve(11 * BLOCK_SIZE)
    with pytest.raises(ResourceExhausted, match="KV memory is full"):
        pool.new_cache().extend([3] * 17)  # nobody's reservation may be taken
    b.extend(ids(6 * BLOCK_SIZE))  # within its reservation: never refused
    assert (len(b.blocks), pool.available_blocks) == (6, 0)
    b.unreserve()
    a.release()
    assert (pool.free_blocks, pool.available_blocks) == (4, 4) and a.released
    with pytest.raises(ResourceExhausted, match="released"):
        a.extend([4])


def test_a_full_pool_reclaims_idle_sessions_and_admission_evicts_them(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    model = loaded("llama", "oracle")
    pool = pool_of(model, blocks=6)
    oracle = Oracle(model, pool)
    store = SessionStore(
        oracle.new_cache, budget_bytes=pool.kv_bytes, max_cached_sessions=8, max_active_streams=8
    )
    pool.reclaim = lambda blocks: store.evict(until=lambda: pool.available_blocks >= blocks)
    idle = [store.admit(name) for name in "ab"]
    for lease in idle:
        lease.session.cache.extend(ids(2 * BLOCK_SIZE))  # 2 blocks each
        store.account(lease.session)
        store.close(lease)
    busy = store.admit("c")
    busy.session.cache.extend(ids(3 * BLOCK_SIZE))  # needs "a"'s blocks
    assert store.get("a") is None and store.get("b") is not None
    assert pool.free_blocks == 1
    assert store.evict(until=lambda: busy.session.cache.reserve(5 * BLOCK_SIZE)) == ["b"]
    assert pool.available_blocks == 1


def test_the_pool_takes_the_budget_or_refuses_one_too_small(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    llama, gpt2 = loaded("llama", "oracle"), loaded("gpt2", "oracle")

    def make(model: LoadedModel, mode: str, budget: int | None) -> PagedPool | None:
        return paged_pool_for(model, mode, max_rows=4, cuda_graphs=True, budget_bytes=budget)

    probe = pool_of(llama, blocks=0)
    assert make(llama, "off", None) is None and make(llama, "auto", None) is None
    on = make(llama, "on", 40 * probe.block_bytes)
    assert on is not None and on.num_blocks == 40 and not on.cuda_graphs and on.lanes == 1
    default = make(llama, "on", None)
    assert default is not None and default.kv_bytes <= paged_kv.DEFAULT_CPU_KV_BYTES
    with pytest.raises(InvalidArgument, match="fewer than one session at the full context"):
        make(llama, "on", probe.block_bytes)
    with pytest.raises(InvalidArgument, match="model type 'gpt2'"):
        make(gpt2, "on", None)
    assert make(gpt2, "auto", None) is None


class RecordedForward:
    """What a CUDA graph replays, on the CPU: the captured forward, run again."""

    def __init__(self, forward: Callable[[], None]) -> None:
        self.forward = forward

    def replay(self) -> None:
        self.forward()


def test_the_graphed_path_reads_its_inputs_from_the_lanes_buffers(
    loaded: Callable[[str, str], LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph path on the CPU (each graph's forward recorded, replayed by calling it):
    every bucket is captured once by capture_all, each row count routed to a timed bucket,
    and a batch replayed from the lane's packed inputs gets the eager path's logits, KV and
    verdicts, for prefill chunks and verify rows alike."""
    model = loaded("llama", "oracle")
    graphed, eager = pool_of(model, verify_tokens=40), pool_of(model, verify_tokens=40)
    graphed.cuda_graphs = True
    graphed._allocate(64)  # the lanes' static buffers
    recorded: list[RecordedForward] = []

    def record(lane: Any, forward: Callable[[], None]) -> RecordedForward:
        recorded.append(RecordedForward(forward))
        return recorded[-1]

    monkeypatch.setattr(graphed, "_record", record)
    monkeypatch.setattr(graphed, "_sync", lambda: None)
    graphed.capture_all()
    shapes = graphed._shapes()
    assert len(recorded) == len(graphed._lanes[0].graphs) == len(shapes) == len(set(shapes))
    assert set(graphed._fastest) == {s for s in shapes if s[1] <= paged_kv.MAX_ROW_TOKENS}
    g = torch.Generator().manual_seed(3)
    sessions = [
        ([1, *torch.randint(3, 96, (n - 1,), generator=g).tolist()], list(range(3, 3 + k)))
        for n, k in ((45, 4), (7, 0), (60, 8))
    ]
    results = []
    for pool in (graphed, eager):
        caches = [pool.new_cache() for _ in sessions]
        for cache, (context, _) in zip(caches, sessions, strict=True):
            pool.prefill(cache, context[:-1])  # 44 and 59 tokens: a 40-token chunk, then rows
        logits = pool.forward_rows(caches, [[c[-1], *b] for c, b in sessions]).logits
        results.append((logits, [c.layer_kv() for c in caches]))
    assert len(recorded) == len(shapes)  # nothing captured late
    (graph_logits, graph_kv), (eager_logits, eager_kv) = results
    assert torch.equal(graph_logits, eager_logits)
    for mine, theirs in zip(graph_kv, eager_kv, strict=True):
        assert mine is not None and theirs is not None
        for (k1, v1), (k2, v2) in zip(mine, theirs, strict=True):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
