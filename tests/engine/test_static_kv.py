"""Static KV slots: a batch verified over the slot pool gets HF's verdicts, KV and continuations.

The CPU runs the pool's forward eagerly; the CUDA test (skipped without a GPU) runs it
as captured graphs and checks the same against HF's forward on the same device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from oracle_service.config import OracleConfig
from oracle_service.sessions import SessionStore
from specdec.config import load_config
from specdec.core.errors import InvalidArgument, ResourceExhausted
from specdec.core.types import DraftBlock, committed_tokens
from specdec.engine import static_kv
from specdec.engine.batched import BatchItem, verify_batch
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.models import LoadedModel, load_model
from specdec.engine.oracle import Oracle
from specdec.engine.static_kv import (
    PREFILL_BUCKETS,
    TOKEN_BUCKETS,
    SlotCache,
    SlotPool,
    slot_bytes_of,
    slot_pool_for,
)
from tests.cluster_tools import run_script
from tests.engine.test_batched_verify import (
    CONTINUE,
    GREEDY,
    ROWS,
    assert_same_kv,
    greedy_generate,
    make_rows,
    outcome_verdict,
)

Row = tuple[int, int, str]
WITH_LOGPROBS = dataclasses.replace(GREEDY, logprobs=3)


def twin_rows(
    model: LoadedModel, slotted: Oracle, plain: Oracle, mode: str, seed: int, rows: list[Row]
) -> tuple[list[BatchItem], list[BatchItem]]:
    """The same rows on the slot oracle's caches and on HF caches."""
    made = make_rows(model, slotted, mode, seed, rows, alone_oracle=plain)
    return made.batched, made.alone


def idle_session(oracle: Oracle, tokens: list[int]) -> tuple[SequenceCache, list[torch.Tensor]]:
    """A cache holding ``tokens`` and a copy of its keys/values."""
    cache = oracle.new_cache()
    cache.extend(tokens)
    kv = cache.layer_kv()
    assert kv is not None
    return cache, [tensor.clone() for layer in kv for tensor in layer]


@pytest.mark.parametrize("mode", ["greedy", "q"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_slot_rows_get_hfs_verdicts_and_leave_idle_slots_alone(
    arch: str, mode: str, loaded: Callable[[str, str], LoadedModel]
) -> None:
    model = loaded(arch, "oracle")
    slotted, plain = Oracle(model, SlotPool(model, 8, cuda_graphs=False)), Oracle(model)
    # Idle sessions on slots 0 and 1: the batch's rows land on higher slots and run beside them.
    idle = [idle_session(slotted, [1, *range(10, 10 + n)]) for n in (25, 7)]
    accepted: set[int] = set()
    for seed in (11, 12):
        on_slots, on_hf = twin_rows(model, slotted, plain, mode, seed, ROWS)
        assert all(isinstance(item.cache, SlotCache) for item in on_slots)
        result = verify_batch(slotted, on_slots)
        assert (result.forward_rows, result.fallback) == (len(ROWS), None)
        for batched, alone, outcome in zip(on_slots, on_hf, result.results, strict=True):
            verdict = outcome_verdict(outcome)
            expected = plain.verify(
                alone.cache, alone.committed, alone.block, alone.params, alone.seed
            )
            assert verdict == expected
            accepted.add(verdict.num_accepted)
            committed = [*batched.committed, *committed_tokens(batched.block, verdict)]
            assert batched.cache.tokens == committed[:-1]
            assert_same_kv(batched.cache, alone.cache)
        if seed == 11:  # decoding on from the slots (eager, one row at a time) is HF's greedy
            for batched, outcome in zip(on_slots, result.results, strict=True):
                tokens = [
                    *batched.committed,
                    *committed_tokens(batched.block, outcome_verdict(outcome)),
                ]
                reference = greedy_generate(model, tokens, CONTINUE)
                for token in reference:
                    step = slotted.verify(batched.cache, tokens, DraftBlock(()), GREEDY, seed=0)
                    assert step.next_token == token
                    tokens.append(step.next_token)
        for item in on_slots:
            item.cache.release()
    for cache, before in idle:
        kv = cache.layer_kv()
        assert kv is not None
        for was, now in zip(before, [tensor for layer in kv for tensor in layer], strict=True):
            assert torch.equal(was, now)
    assert 0 in accepted and max(accepted) >= 2


def test_sessions_beyond_the_slots_get_hf_caches_and_share_the_batch(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    model = loaded("llama", "oracle")
    slotted, plain = Oracle(model, SlotPool(model, 2, cuda_graphs=False)), Oracle(model)
    on_slots, on_hf = twin_rows(model, slotted, plain, "greedy", 3, ROWS[:4])
    kinds = [type(item.cache) for item in on_slots]
    assert kinds == [SlotCache, SlotCache, SequenceCache, SequenceCache]
    result = verify_batch(slotted, on_slots)
    assert (result.forward_rows, result.fallback) == (4, None)
    for batched, alone, outcome in zip(on_slots, on_hf, result.results, strict=True):
        expected = plain.verify(alone.cache, alone.committed, alone.block, alone.params, 0)
        assert outcome_verdict(outcome) == expected
        assert batched.cache.tokens == alone.cache.tokens


def test_a_failed_slot_forward_falls_back_to_one_row_at_a_time(
    loaded: Callable[[str, str], LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = loaded("llama", "oracle")
    pool = SlotPool(model, 8, cuda_graphs=False)
    slotted, plain = Oracle(model, pool), Oracle(model)
    on_slots, on_hf = twin_rows(model, slotted, plain, "greedy", 4, ROWS)

    def out_of_memory(*args: Any) -> Any:
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(pool, "forward_rows", out_of_memory)
    result = verify_batch(slotted, on_slots)
    assert result.forward_rows == 0
    assert result.fallback is not None and "out of memory (injected)" in result.fallback
    for batched, alone, outcome in zip(on_slots, on_hf, result.results, strict=True):
        expected = plain.verify(alone.cache, alone.committed, alone.block, alone.params, 0)
        assert outcome_verdict(outcome) == expected
        assert_same_kv(batched.cache, alone.cache)


def test_evicted_sessions_give_their_slot_back(loaded: Callable[[str, str], LoadedModel]) -> None:
    model = loaded("llama", "oracle")
    pool = SlotPool(model, 3, cuda_graphs=False)
    store = SessionStore(
        Oracle(model, pool).new_cache,
        budget_bytes=10 * pool.slot_bytes,
        max_cached_sessions=2,
        max_active_streams=8,
    )
    leases = [store.admit(name) for name in "abc"]
    slots = [lease.session.cache for lease in leases]
    assert [cache.slot for cache in slots if isinstance(cache, SlotCache)] == [0, 1, 2]
    assert pool.free_slots == 0 and slots[0].memory_bytes() == pool.slot_bytes
    slots[1].extend([1, 2, 3])
    store.close(leases[1])
    assert store.release("b")  # its slot is free again, and the lowest free slot goes first
    assert pool.free_slots == 1 and slots[1].memory_bytes() == 0
    with pytest.raises(ResourceExhausted, match="released"):
        slots[1].extend([4])
    reused = store.admit("d").session.cache
    assert isinstance(reused, SlotCache) and reused.slot == 1 and len(reused) == 0
    store.close(leases[0])
    assert store.evict() == ["a"]  # over max_cached_sessions: the idle one goes, and its slot
    assert pool.free_slots == 1


def test_static_kv_modes(loaded: Callable[[str, str], LoadedModel]) -> None:
    llama, gpt2 = loaded("llama", "oracle"), loaded("gpt2", "oracle")
    per_slot = slot_bytes_of(llama)
    pool = SlotPool(llama, 1, cuda_graphs=True)
    assert pool.slot_bytes == per_slot and not pool.cuda_graphs  # graphs only on a GPU
    budget = int(2.5 * per_slot)

    def make(model: LoadedModel, mode: str, max_slots: int = 16) -> SlotPool | None:
        return slot_pool_for(
            model, mode, max_slots=max_slots, max_rows=4, budget_bytes=budget, cuda_graphs=True
        )

    assert make(llama, "off") is None
    assert make(llama, "auto") is None  # auto: GPU only
    on = make(llama, "on")
    assert on is not None and on.slots == 2  # what the budget holds
    assert (small := make(llama, "on", max_slots=1)) is not None and small.slots == 1
    assert make(gpt2, "auto") is None
    with pytest.raises(InvalidArgument, match=r"static-kv on.*model type 'gpt2'"):
        make(gpt2, "on")
    config = load_config(OracleConfig, ["--static-kv", "on", "--no-cuda-graphs"], env={})
    assert (config.static_kv, config.cuda_graphs) == ("on", False)
    assert load_config(OracleConfig, [], env={"SPECDEC_STATIC_KV": "off"}).static_kv == "off"
    assert load_config(OracleConfig, [], env={}).static_kv == "auto"


@torch.inference_mode()
def greedy_on_device(model: LoadedModel, tokens: list[int], n: int) -> list[int]:
    """HF's greedy continuation of ``tokens`` by n tokens, on the model's device."""
    if n == 0:
        return []
    ids = torch.tensor([tokens], device=model.model.device)
    output = model.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return list(output[0, len(tokens) :].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_verify_matches_hfs_forward_round_after_round(
    model_dir: Callable[[str, str], Path],
) -> None:
    """Sessions decode greedily through graphed batches (rows joining and leaving, k from 0
    to 4) and through HF's forward on the same GPU: the same tokens and logprobs, round by
    round. Each round's sessions are split over two lanes whose batches run at once, in two
    threads."""
    model = load_model(str(model_dir("llama", "oracle")), device="cuda")
    pool = SlotPool(model, 8, max_rows=4, cuda_graphs=True, lanes=2)
    lanes = [ThreadPoolExecutor(1, initializer=pool.enter_lane, initargs=(i,)) for i in (0, 1)]
    for lane in lanes:
        lane.submit(pool.capture_all).result()
    captured = [len(lane.graphs) for lane in pool._lanes]
    buckets = len(pool.row_buckets) * len(TOKEN_BUCKETS) * len(pool.width_buckets)
    prefill = sum(t <= w for t in PREFILL_BUCKETS for w in pool.width_buckets)
    assert pool.cuda_graphs and captured == [buckets + prefill] * 2
    assert set(pool._fastest) == {
        (rows, tokens, width)
        for rows in pool.row_buckets
        for tokens in TOKEN_BUCKETS
        for width in pool.width_buckets
        if tokens <= width
    }
    slotted, plain = Oracle(model, pool), Oracle(model)
    g = torch.Generator().manual_seed(0)
    prompts = [
        [1, *torch.randint(3, model.vocab_size, (n,), generator=g).tolist()]
        for n in (60, 17, 30, 9, 12, 25)  # each prefill: one graphed chunk (the 64 bucket)
    ]
    sessions = [(slotted.new_cache(), plain.new_cache(), list(p), list(p)) for p in prompts]
    accepted: set[int] = set()
    for round_index in range(16):
        active = [s for i, s in enumerate(sessions) if (round_index + i) % 4][:6]
        items, expected = [], []
        for i, (cache, hf_cache, committed, hf_committed) in enumerate(active):
            k = (round_index + i) % 5
            tokens = greedy_on_device(model, committed, k)
            if k and (round_index + i) % 3 == 0:  # one wrong token: the verdict stops there
                wrong = (round_index + i) % k
                tokens[wrong] = (tokens[wrong] + 1) % model.vocab_size
            block = DraftBlock(tuple(tokens))
            items.append(BatchItem(cache, committed, block, WITH_LOGPROBS, 0))
            expected.append(plain.verify(hf_cache, hf_committed, block, WITH_LOGPROBS, 0))
        half = (len(items) + round_index % 2) // 2  # lane 0's rows, then lane 1's
        parts = [items[:half], items[half:]]
        running = [
            lane.submit(verify_batch, slotted, part)
            for lane, part in zip(lanes, parts, strict=True)
        ]
        results = [outcome for run in running for outcome in run.result().results]
        for item, outcome, want, session in zip(items, results, expected, active, strict=True):
            verdict = outcome_verdict(outcome)
            assert (verdict.num_accepted, verdict.next_token, verdict.is_bonus) == (
                want.num_accepted, want.next_token, want.is_bonus,
            )  # fmt: skip
            # The graphed forward's logprobs are HF's, up to float rounding.
            assert verdict.logprobs is not None and want.logprobs is not None
            got = [lp.logprob for lp in verdict.logprobs]
            assert got == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
            accepted.add(verdict.num_accepted)
            session[2].extend(committed_tokens(item.block, verdict))
            session[3].extend(committed_tokens(item.block, want))
            assert item.cache.tokens == session[2][:-1]
    assert all(s[2] == s[3] for s in sessions)
    # Replayed, none captured late.
    assert [len(lane.graphs) for lane in pool._lanes] == captured and pool.cuda_graphs
    assert {0, 4} <= accepted
    for lane in lanes:
        lane.shutdown()


def test_a_pool_has_a_scratch_slot_per_lane_and_one_lane_on_the_cpu(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    model = loaded("llama", "oracle")
    assert SlotPool(model, 3, cuda_graphs=False, lanes=0).lanes == 1  # auto, no graphs
    pool = SlotPool(model, 3, cuda_graphs=False, lanes=2)
    assert pool.kv[0][0].shape[0] == 3 + 2
    assert [lane.scratch for lane in pool._lanes] == [3, 4]
    with pytest.raises(ValueError, match="lane 2 of a pool with 2 lanes"):
        pool.enter_lane(2)


def test_a_graphed_prefill_leaves_the_kv_of_an_eager_one(
    loaded: Callable[[str, str], LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``SlotPool.prefill`` replays, run eagerly: chunks padded to a bucket. The next
    token's logits are HF's, the pads touch no other slot, and a chunk whose padding would
    pass the slot's capacity is not padded."""
    model = loaded("llama", "oracle")
    pool = SlotPool(model, 3, max_rows=4, cuda_graphs=False)
    replays: list[tuple[int, int, int]] = []

    def replay(ids: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, width: int) -> Any:
        replays.append((ids.shape[1], int(lengths[0]), width))
        return pool._forward(ids, slots, lengths, width)  # what the graph would compute

    monkeypatch.setattr(pool, "_replay", replay)
    pool.cuda_graphs = True
    neighbour = pool.new_cache()
    assert neighbour is not None
    neighbour.extend([1, *range(60, 90)])
    kept = [t.clone() for layer in neighbour.layer_kv() or [] for t in layer]

    def check(cache: SlotCache | None, tokens: list[int]) -> None:
        assert cache is not None and cache.tokens == tokens
        reference = SequenceCache(model)
        reference.extend(tokens)
        torch.testing.assert_close(cache.extend([7]), reference.extend([7]), atol=1e-4, rtol=1e-4)

    monkeypatch.setattr(static_kv, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(static_kv, "PREFILL_BUCKETS", (8, 16))
    prompt = [1, *range(3, 47)]  # 45 tokens: chunks of 16, 16 and 13 (padded to 16)
    cache = pool.new_cache()
    assert cache is not None
    pool.prefill(cache, prompt)
    width = pool.capacity  # the only width bucket of a 128-token context
    assert replays == [(16, 0, width), (16, 16, width), (16, 32, width)]
    check(cache, prompt)

    # Capacity 161 (context 128 + 33): 80 tokens after 40 would be padded past it.
    monkeypatch.setattr(static_kv, "PREFILL_CHUNK", 128)
    monkeypatch.setattr(static_kv, "PREFILL_BUCKETS", (64, 128))
    replays.clear()
    other = pool.new_cache()
    assert other is not None
    pool.prefill(other, prompt[:40])
    pool.prefill(other, [*prompt[40:], *range(15, 90)])
    assert replays == [(64, 0, width)]  # the second chunk ran eagerly, unpadded
    check(other, [*prompt, *range(15, 90)])
    after = [t for layer in neighbour.layer_kv() or [] for t in layer]
    assert all(torch.equal(a, b) for a, b in zip(kept, after, strict=True))


def test_the_verify_benchmark_compares_both_paths(
    model_dir: Callable[[str, str], Path], tmp_path: Path
) -> None:
    model = str(model_dir("llama", "oracle"))
    printed, rows = run_script(
        "bench_verify.py", "--model", model, "--device", "cpu", "--batches", "1,2",
        "--rounds", "7", out=tmp_path / "verify.json",
    )  # fmt: skip
    assert "static ms" in printed
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["mismatches"] == 0 and row["hf_ms"] > 0 and row["static_ms"] > 0


def test_the_graphed_shapes_compute_the_same_rows_on_the_cpu(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    """What a CUDA graph replays, run eagerly: rows padded to a bucket with the scratch slot,
    blocks padded with token 0, attention over the whole capacity. The real rows' logits are
    HF's, and the writes of pads and padding rows touch no kept position of any slot."""
    model = loaded("llama", "oracle")
    pool = SlotPool(model, 3, max_rows=4, cuda_graphs=False)
    caches = [pool.new_cache() for _ in range(3)]
    assert all(cache is not None for cache in caches)
    contexts = [[1, *range(10, 30)], [1, *range(40, 47)], [1, *range(50, 90)]]
    for cache, context in zip(caches, contexts, strict=True):
        assert cache is not None
        cache.extend(context)
    kept = [[t.clone() for layer in c.layer_kv() or [] for t in layer] for c in caches if c]
    blocks = [[31, 32, 33], [48, 49, 50, 51, 52]]  # rows 0 and 1; slot 2 stays idle
    ids = torch.zeros(4, 9, dtype=torch.long)  # tokens bucket 9, rows bucket 4
    for row, block in enumerate(blocks):
        ids[row, : len(block)] = torch.tensor(block)
    slots = torch.tensor([0, 1, pool.slots, pool.slots])  # two padding rows: the scratch slot
    lengths = torch.tensor([len(contexts[0]), len(contexts[1]), 0, 0])
    with torch.inference_mode():
        logits = pool._forward(ids, slots, lengths, pool.capacity)  # [4, 9, V]
    for row, block in enumerate(blocks):
        reference = SequenceCache(model)
        reference.extend(contexts[row])
        expected = reference.extend(block)  # [n, V]
        torch.testing.assert_close(logits[row, : len(block)], expected, atol=1e-4, rtol=1e-4)
    for cache, before in zip(caches, kept, strict=True):
        assert cache is not None
        after = [t for layer in cache.layer_kv() or [] for t in layer]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
