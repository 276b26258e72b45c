"""Batched verification across sessions: every row's verdict is the one its session gets alone.

Core (``specdec.engine.batched``): rows with different cached lengths (0 included),
different k (0 included) and caches needing a prefill are verified in one forward
and compared with ``Oracle.verify_timed`` on twin caches: same verdicts (greedy;
sampled with and without q, several seeds), caches holding the same tokens and
KV, and greedy decoding continued from each cache equal to HF ``generate``.

Engine and service (``oracle_service``): concurrent sessions through the real
gRPC service are HF-exact and really share forwards; the batch rule is checked by
the order verdicts come back in (at most one block per session per batch, oldest
first, nobody starved), never by timing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch

from oracle_service.config import OracleConfig
from oracle_service.engine import OracleEngine
from oracle_service.servicer import SERVICE_NAME, OracleServicer
from oracle_service.sessions import Lease
from specdec.config import load_config
from specdec.core.errors import FailedPrecondition, InvalidArgument
from specdec.core.sampling import (
    SamplingParams,
    race_draw,
    sample_sparse,
    truncate_to_sparse,
)
from specdec.core.types import DraftBlock, Verdict, VerifyResult, committed_tokens
from specdec.engine.batched import BatchItem, batch_forward, batch_unsupported, verify_batch
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.kv_options import KVSettings
from specdec.engine.lean_forward import LeanCache
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle
from specdec.engine.paged_kv import PagedCache
from specdec.rpc.server import start_server
from specdec.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc

MIB = 1024 * 1024
GREEDY = SamplingParams()
# (committed length, k, how the cache starts): cached lengths 0, 8, 19, 13, 29.
ROWS = [
    (1, 3, "synced"),
    (9, 0, "synced"),
    (20, 5, "synced"),
    (14, 8, "empty"),
    (30, 2, "diverged"),
]
CONTINUE = 5  # greedy tokens decoded after the batch, checked against HF generate
LOGITS_ATOL = 2e-5  # batched vs per-row forward: float rounding only (seen: ~2e-6)


# ---------------------------------------------------------------------------
# core: specdec.engine.batched
# ---------------------------------------------------------------------------


@torch.inference_mode()
def next_logits(model: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """[V] logits after ``tokens``, from one full forward without a cache."""
    return model.model(torch.tensor([tokens])).logits[0, -1].float()


def draft(
    model: LoadedModel,
    committed: list[int],
    k: int,
    mode: str,
    g: torch.Generator,
    row: int,
    seed: int = 0,
) -> DraftBlock:
    """A k-token block after ``committed``, drafted from the oracle's own p (so rounds accept
    some tokens): greedy with one wrong token at position row % (k + 1) (none when = k);
    "q": sampled from a sharpened, truncated q sent along; "tokens": a sharpened q raced
    with the noise of (``seed``, position), as a coupled draft does, sent without q."""
    tokens, ids, qs = list(committed), [], []
    for i in range(k):
        logits = next_logits(model, tokens)  # [V]
        if mode == "greedy":
            x = int(logits.argmax())
            if i == row % (k + 1):
                x = (x + 1 + row) % model.vocab_size
        elif mode == "q":
            q = truncate_to_sparse(torch.softmax(logits / 0.7, dim=-1), 6)
            x = sample_sparse(q, g)
            qs.append(q)
        else:
            x = race_draw(torch.softmax(logits / 0.7, dim=-1), seed, len(tokens))
        ids.append(x)
        tokens.append(x)
    return DraftBlock(tuple(ids), tuple(qs) if mode == "q" else None)


def prepared_cache(oracle: Oracle, committed: list[int], start: str) -> SequenceCache:
    """A cache in the state ``start``: synced (holds committed[:-1]), empty, or diverged
    (a common prefix of 5 then other tokens): the last two need a prefill in the verify."""
    cache = oracle.new_cache()
    if start == "synced":
        oracle.prefill(cache, committed)
    elif start == "diverged":
        oracle.prefill(cache, [*committed[:5], 7, 8, 9, 10])
    return cache


@dataclass
class Rows:
    """The same rows twice: ``batched`` go through verify_batch, ``alone`` through verify_timed."""

    batched: list[BatchItem]
    alone: list[BatchItem]


def make_rows(
    model: LoadedModel,
    oracle: Oracle,
    mode: str,
    seed: int,
    rows: Sequence[tuple[int, int, str]],
    alone_oracle: Oracle | None = None,
) -> Rows:
    """``alone``'s caches come from ``alone_oracle`` (default: ``oracle``)."""
    g = torch.Generator().manual_seed(seed)
    params = GREEDY if mode == "greedy" else SamplingParams(temperature=1.0, top_k=40)
    batched: list[BatchItem] = []
    alone: list[BatchItem] = []
    for row, (length, k, start) in enumerate(rows):
        committed = [1, *torch.randint(3, model.vocab_size, (length - 1,), generator=g).tolist()]
        block = draft(model, committed, k, mode, g, row, seed + row)
        for owner, items in ((oracle, batched), (alone_oracle or oracle, alone)):
            cache = prepared_cache(owner, committed, start)
            items.append(BatchItem(cache, list(committed), block, params, seed + row))
    return Rows(batched, alone)


def greedy_generate(model: LoadedModel, tokens: list[int], n: int) -> list[int]:
    output = model.model.generate(
        torch.tensor([tokens]), max_new_tokens=n, do_sample=False, pad_token_id=2
    )
    return list(output[0, len(tokens) :].tolist())


def assert_same_kv(a: SequenceCache, b: SequenceCache) -> None:
    assert a.tokens == b.tokens
    kv_a, kv_b = a.layer_kv(), b.layer_kv()
    assert kv_a is not None and kv_b is not None and len(kv_a) == len(kv_b)
    for (keys_a, values_a), (keys_b, values_b) in zip(kv_a, kv_b, strict=True):
        torch.testing.assert_close(keys_a, keys_b, atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(values_a, values_b, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["greedy", "q", "tokens"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_batched_verdicts_equal_per_session_verdicts(
    arch: str, mode: str, loaded: Callable[[str, str], LoadedModel]
) -> None:
    model = loaded(arch, "oracle")
    oracle = Oracle(model)
    assert batch_unsupported(oracle.model) is None
    accepted: set[int] = set()
    for seed in (11, 12, 13):
        rows = make_rows(model, oracle, mode, seed, ROWS)
        result = verify_batch(oracle, rows.batched)
        assert (result.forward_rows, result.fallback) == (len(ROWS), None)
        for batched, alone, outcome in zip(rows.batched, rows.alone, result.results, strict=True):
            assert not isinstance(outcome, Exception), outcome
            verdict, timing = outcome
            expected, expected_timing = oracle.verify_timed(
                alone.cache, alone.committed, alone.block, alone.params, alone.seed
            )
            assert verdict == expected
            assert timing.prefill_computed == expected_timing.prefill_computed
            accepted.add(verdict.num_accepted)
            # Both caches hold the new committed[:-1], with the same keys and values.
            committed = [*batched.committed, *committed_tokens(batched.block, verdict)]
            assert batched.cache.tokens == committed[:-1]
            assert_same_kv(batched.cache, alone.cache)
        if seed == 11:  # the kept KV is right: decoding on from the cache is HF's greedy
            for batched, outcome in zip(rows.batched, result.results, strict=True):
                verdict = outcome_verdict(outcome)
                tokens = [*batched.committed, *committed_tokens(batched.block, verdict)]
                reference = greedy_generate(model, tokens, CONTINUE)
                assert len(reference) >= 1
                produced = []
                for _ in range(len(reference)):
                    step = oracle.verify(batched.cache, tokens, DraftBlock(()), GREEDY, seed=0)
                    tokens.append(step.next_token)
                    produced.append(step.next_token)
                assert produced == reference
    if mode == "greedy":  # the drafts were built to stop at every position, bonus included
        assert accepted >= {0, 1, 2, 3}
    else:  # sampled: rounds both stopped early and got far
        assert 0 in accepted and max(accepted) >= 2


def outcome_verdict(outcome: Any) -> Verdict:
    assert not isinstance(outcome, Exception), outcome
    verdict: Verdict = outcome[0]
    return verdict


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_batched_logits_match_per_row_forwards(
    arch: str, loaded: Callable[[str, str], LoadedModel]
) -> None:
    model = loaded(arch, "oracle")
    oracle = Oracle(model)
    # Including a batch where nothing is cached yet (every row's L_b = 0).
    for specs in (ROWS, [(1, 4, "synced"), (1, 0, "synced")]):
        rows = make_rows(model, oracle, "greedy", 5, specs)
        for item in rows.batched:
            oracle.prefill(item.cache, item.committed)
        forward = batch_forward(oracle, rows.batched)
        width = max(k for _, k, _ in specs) + 1
        assert forward.logits.shape == (len(specs), width, model.vocab_size)
        for b, item in enumerate(rows.alone):
            oracle.prefill(item.cache, item.committed)
            alone = item.cache.extend([item.committed[-1], *item.block.token_ids])  # [k+1, V]
            torch.testing.assert_close(
                forward.logits[b, : len(alone)], alone, atol=LOGITS_ATOL, rtol=0
            )
            # The row's KV: its cached positions then its k + 1 new ones.
            row_kv = forward.row_kv(b, len(item.block) + 1)
            assert row_kv[0][0].shape[-2] == len(item.committed) + len(item.block)
        # The forward only read the caches.
        for item in rows.batched:
            assert len(item.cache) == len(item.committed) - 1


def test_a_refused_row_stays_out_and_the_others_share_the_forward(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    model = loaded("llama", "oracle")
    oracle = Oracle(model)
    rows = make_rows(model, oracle, "greedy", 3, ROWS[:3])
    committed = [1, 4, 5]
    bad = BatchItem(oracle.new_cache(), committed, DraftBlock((4, model.vocab_size)), GREEDY, 0)
    oracle.prefill(bad.cache, committed)
    long_committed = [1] * (model.max_context - 2)
    too_long = BatchItem(oracle.new_cache(), long_committed, DraftBlock((4, 4, 4)), GREEDY, 0)
    result = verify_batch(
        oracle, [rows.batched[0], bad, rows.batched[1], too_long, rows.batched[2]]
    )
    assert result.forward_rows == 3
    assert isinstance(result.results[1], InvalidArgument)
    assert isinstance(result.results[3], InvalidArgument)
    assert "context" in str(result.results[3])
    assert bad.cache.tokens == committed[:-1]  # untouched
    assert len(too_long.cache) == 0
    for index, alone in zip((0, 2, 4), rows.alone, strict=True):
        expected = oracle.verify(alone.cache, alone.committed, alone.block, alone.params, 0)
        assert outcome_verdict(result.results[index]) == expected


def test_a_failed_batched_forward_falls_back_to_one_forward_per_row(
    loaded: Callable[[str, str], LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected failure of every multi-row forward (as an out-of-memory would be): each
    row is verified alone, with its own verdict, and no cache is left half-updated."""
    model = loaded("qwen2", "oracle")
    oracle = Oracle(model)
    forward = model.model.forward

    @functools.wraps(forward)
    def fail_when_batched(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if input_ids.shape[0] > 1:
            raise RuntimeError("out of memory (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", fail_when_batched)
    rows = make_rows(model, oracle, "q", 21, ROWS)
    result = verify_batch(oracle, rows.batched)
    assert result.forward_rows == 0
    assert result.fallback is not None and "out of memory (injected)" in result.fallback
    monkeypatch.undo()
    for batched, alone, outcome in zip(rows.batched, rows.alone, result.results, strict=True):
        expected = oracle.verify(
            alone.cache, alone.committed, alone.block, alone.params, alone.seed
        )
        assert outcome_verdict(outcome) == expected
        assert_same_kv(batched.cache, alone.cache)


def test_sliding_window_models_verify_row_by_row(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    model = loaded("mistral", "oracle")  # window 12, shorter than the rows
    oracle = Oracle(model)
    reason = batch_unsupported(oracle.model)
    assert reason is not None and "sliding window" in reason
    rows = make_rows(model, oracle, "greedy", 8, ROWS)
    result = verify_batch(oracle, rows.batched)
    assert (result.forward_rows, result.fallback) == (0, reason)
    for batched, alone, outcome in zip(rows.batched, rows.alone, result.results, strict=True):
        expected = oracle.verify(
            alone.cache, alone.committed, alone.block, alone.params, alone.seed
        )
        assert outcome_verdict(outcome) == expected
        assert batched.cache.tokens == alone.cache.tokens


def test_two_rows_of_one_cache_are_refused(loaded: Callable[[str, str], LoadedModel]) -> None:
    oracle = Oracle(loaded("llama", "oracle"))
    cache = oracle.new_cache()
    item = BatchItem(cache, [1, 4, 5], DraftBlock(()), GREEDY, 0)
    with pytest.raises(InvalidArgument, match="different caches"):
        verify_batch(oracle, [item, item])


# ---------------------------------------------------------------------------
# engine: the batch rule
# ---------------------------------------------------------------------------


@pytest.fixture
async def make_engine(
    loaded: Callable[[str, str], LoadedModel],
) -> AsyncIterator[Callable[..., OracleEngine]]:
    engines: list[OracleEngine] = []

    def make(max_batch: int, batch_wait_s: float = 0.0) -> OracleEngine:
        engine = OracleEngine(
            loaded("llama", "oracle"),
            oracle_id="batch-test",
            kv_budget_bytes=64 * MIB,
            max_sessions=16,
            max_cached_sessions=64,
            max_batch=max_batch,
            batch_wait_s=batch_wait_s,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


async def opened(engine: OracleEngine, session_id: str, tokens: list[int]) -> Lease:
    lease, _ = await engine.open(session_id, tokens, GREEDY, 0)
    return lease


PROMPTS = {"a": [1, 5, 17, 33, 60, 8], "b": [1, 9, 9, 30], "c": [1, 40, 41], "d": [1, 70, 3, 3, 3]}


@pytest.mark.parametrize(("max_batch", "served_within"), [(1, 13), (2, 2)])
async def test_a_session_that_keeps_sending_does_not_starve_another(
    make_engine: Callable[..., OracleEngine],
    loaded: Callable[[str, str], LoadedModel],
    max_batch: int,
    served_within: int,
) -> None:
    """Session a queues 12 blocks, then b one, then a 12 more (zero-token blocks: each
    commits one token, so a's blocks extend each other in order)."""
    engine = make_engine(max_batch)
    a, b = await opened(engine, "a", PROMPTS["a"]), await opened(engine, "b", PROMPTS["b"])
    done: list[str] = []

    async def send(lease: Lease, name: str, base: int) -> Verdict:
        result = await engine.verify(lease, base, DraftBlock(()))
        done.append(name)
        assert result.verdict is not None
        return result.verdict

    base_a = len(PROMPTS["a"])
    first = [asyncio.create_task(send(a, f"a{i}", base_a + i)) for i in range(12)]
    other = asyncio.create_task(send(b, "b0", len(PROMPTS["b"])))
    later = [asyncio.create_task(send(a, f"a{i}", base_a + i)) for i in range(12, 24)]
    verdicts = await asyncio.gather(*first, *later)
    await other
    # Served first come, first served (max_batch 1), or in the first batch (2); never
    # after a block a sent later.
    assert done.index("b0") < served_within
    assert done.index("b0") < done.index("a12")
    reference = greedy_generate(loaded("llama", "oracle"), PROMPTS["a"], 24)
    assert [v.next_token for v in verdicts][: len(reference)] == reference
    counters = engine.batch_counters
    assert counters.blocks == 25
    assert counters.largest_forward == (0 if max_batch == 1 else 2)


@pytest.mark.parametrize("wait_s", [0.0, 1.0])
async def test_a_batch_waits_for_the_other_open_streams_blocks(
    make_engine: Callable[..., OracleEngine], wait_s: float
) -> None:
    # Four streams open; their blocks arrive 30 ms apart. With a wait the first batch
    # holds all four; without, the first block goes alone as soon as it arrives.
    engine = make_engine(8, batch_wait_s=wait_s)
    leases = {name: await opened(engine, name, tokens) for name, tokens in PROMPTS.items()}

    async def send(name: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        result = await engine.verify(leases[name], len(PROMPTS[name]), DraftBlock(()))
        assert result.verdict is not None

    await asyncio.gather(*(send(name, 0.03 * i) for i, name in enumerate(PROMPTS)))
    counters = engine.batch_counters
    if wait_s:
        assert (counters.batches, counters.largest_forward) == (1, 4)
    else:
        assert counters.batches >= 2 and counters.largest_forward < 4


async def test_pipelined_blocks_of_one_session_run_in_separate_batches_in_order(
    make_engine: Callable[..., OracleEngine], loaded: Callable[[str, str], LoadedModel]
) -> None:
    engine = make_engine(8)
    prompt = PROMPTS["a"]
    reference = greedy_generate(loaded("llama", "oracle"), prompt, 10)
    lease = await opened(engine, "a", prompt)
    other = await opened(engine, "b", PROMPTS["b"])
    base = len(prompt)
    # Block 2 is sent before block 1's verdict, assuming block 1 is accepted in full.
    right = DraftBlock(tuple(reference[:3]))
    assumed = (*reference[:3], reference[3])
    first, second, third = await asyncio.gather(
        engine.verify(lease, base, right),
        engine.verify(lease, base + 4, DraftBlock(tuple(reference[4:6])), assumed),
        engine.verify(other, len(PROMPTS["b"]), DraftBlock(())),
    )
    assert first.verdict == Verdict(3, reference[3], True)
    assert second.verdict == Verdict(2, reference[6], True)
    assert third.verdict is not None
    # Block 1 and b's block shared the first batch; block 2 came in the next one.
    assert engine.batch_counters.batches == 2 and engine.batch_counters.largest_forward == 2
    # A pipelined block whose assumption fails is skipped, before any compute.
    wrong = DraftBlock(((reference[7] + 1) % engine.vocab_size,))
    base = len(prompt) + 7
    guess = (wrong.token_ids[0], 5)  # block accepted in full, then a guessed bonus
    verified = engine.batch_counters.verified
    rejected, skipped = await asyncio.gather(
        engine.verify(lease, base, wrong),
        engine.verify(lease, base + 2, DraftBlock((4,)), guess),
    )
    assert rejected.verdict == Verdict(0, reference[7], False)
    assert skipped.verdict is None and skipped.committed_length == base + 1
    assert engine.batch_counters.verified == verified + 1


async def test_a_stale_pipelined_block_does_not_hold_its_sessions_next_block_back(
    make_engine: Callable[..., OracleEngine], loaded: Callable[[str, str], LoadedModel]
) -> None:
    # a's first block is rejected; its pipelined block (assuming full acceptance) is then
    # stale, and a's re-drafted block, queued behind it, must share the next batch with
    # b's block instead of waiting for a third one.
    engine = make_engine(8)
    prompt = PROMPTS["a"]
    reference = greedy_generate(loaded("llama", "oracle"), prompt, 6)
    a, b = await opened(engine, "a", prompt), await opened(engine, "b", PROMPTS["b"])
    base = len(prompt)
    wrong = (reference[0] + 1) % engine.vocab_size
    head = asyncio.ensure_future(engine.verify(a, base, DraftBlock((wrong,))))
    stale = asyncio.ensure_future(engine.verify(a, base + 2, DraftBlock((4,)), (wrong, 5)))
    first_b = asyncio.ensure_future(engine.verify(b, len(PROMPTS["b"]), DraftBlock(())))
    assert (await head).verdict == Verdict(0, reference[0], False)
    redrafted = asyncio.ensure_future(engine.verify(a, base + 1, DraftBlock(tuple(reference[1:3]))))
    second_b = asyncio.ensure_future(engine.verify(b, len(PROMPTS["b"]) + 1, DraftBlock(())))
    assert (await stale).verdict is None
    assert (await redrafted).verdict == Verdict(2, reference[3], True)
    await first_b, await second_b
    counters = engine.batch_counters
    assert counters.verified == 4  # the stale block never reached the model thread
    assert counters.batches == 2 and counters.largest_forward == 2


async def test_a_session_with_only_stale_blocks_waiting_does_not_cut_the_batch_wait(
    make_engine: Callable[..., OracleEngine], loaded: Callable[[str, str], LoadedModel]
) -> None:
    # a's block is rejected; the blocks it sent ahead for other outcomes are then stale.
    # They must not count as a's block waiting: the next batch waits (up to 1 s) for a's
    # re-drafted block and b's, and verifies both in one forward, not b's alone.
    engine = make_engine(8, batch_wait_s=1.0)
    prompt = PROMPTS["a"]
    reference = greedy_generate(loaded("llama", "oracle"), prompt, 4)
    a, b = await opened(engine, "a", prompt), await opened(engine, "b", PROMPTS["b"])
    base = len(prompt)
    wrong = (reference[0] + 1) % engine.vocab_size
    other = (reference[0] + 2) % engine.vocab_size
    head = asyncio.ensure_future(engine.verify(a, base, DraftBlock((wrong,))))
    ahead = [
        asyncio.ensure_future(engine.verify(a, base + 2, DraftBlock((4,)), (wrong, 5))),
        asyncio.ensure_future(engine.verify(a, base + 1, DraftBlock((4,)), (other,))),
    ]  # drafted for a full acceptance and for a wrong correction
    first_b = asyncio.ensure_future(engine.verify(b, len(PROMPTS["b"]), DraftBlock(())))
    assert (await head).verdict == Verdict(0, reference[0], False)
    await first_b
    batches = engine.batch_counters.batches

    async def later(delay_s: float, call: Awaitable[VerifyResult]) -> VerifyResult:
        await asyncio.sleep(delay_s)
        return await call

    second = await asyncio.gather(
        later(0.05, engine.verify(b, len(PROMPTS["b"]) + 1, DraftBlock(()))),
        later(0.2, engine.verify(a, base + 1, DraftBlock(tuple(reference[1:3])))),
    )
    assert second[1].verdict == Verdict(2, reference[3], True)
    assert [(await stale).verdict for stale in ahead] == [None, None]
    counters = engine.batch_counters
    assert counters.batches == batches + 1 and counters.largest_forward == 2


async def test_refused_blocks_stay_out_of_the_forward_and_fail_alone(
    make_engine: Callable[..., OracleEngine], loaded: Callable[[str, str], LoadedModel]
) -> None:
    engine = make_engine(8)
    leases = {name: await opened(engine, name, PROMPTS[name]) for name in "abcd"}
    results = await asyncio.gather(
        engine.verify(leases["a"], len(PROMPTS["a"]), DraftBlock(())),
        engine.verify(leases["b"], len(PROMPTS["b"]) + 1, DraftBlock(())),  # stale
        engine.verify(leases["c"], len(PROMPTS["c"]), DraftBlock((4,) * 32)),  # k = 32
        engine.verify(leases["d"], len(PROMPTS["d"]), DraftBlock(())),
        return_exceptions=True,
    )
    assert isinstance(results[1], FailedPrecondition)
    assert not any(isinstance(r, BaseException) for r in (results[0], results[2], results[3]))
    assert engine.batch_counters.largest_forward == 3
    near_full = [1] + [4] * (engine.max_context - 4)
    lease = await opened(engine, "e", near_full)
    refused, verified = await asyncio.gather(
        engine.verify(lease, len(near_full), DraftBlock((4, 4, 4))),
        engine.verify(leases["a"], len(PROMPTS["a"]) + 1, DraftBlock(())),
        return_exceptions=True,
    )
    assert isinstance(refused, InvalidArgument) and "at most 2 tokens" in str(refused)
    assert not isinstance(verified, BaseException)
    assert engine.batch_counters.largest_forward == 3  # the refused block never joined one
    sessions = engine.sessions
    assert sessions.get("b").committed == PROMPTS["b"]  # type: ignore[union-attr]
    assert sessions.get("e").committed == near_full  # type: ignore[union-attr]
    a_tokens = sessions.get("a").committed[len(PROMPTS["a"]) :]  # type: ignore[union-attr]
    assert a_tokens == greedy_generate(loaded("llama", "oracle"), PROMPTS["a"], 2)


async def test_max_batch_one_verifies_every_block_alone(
    make_engine: Callable[..., OracleEngine],
) -> None:
    engine = make_engine(1)
    leases = {name: await opened(engine, name, PROMPTS[name]) for name in "abc"}
    await asyncio.gather(
        *(
            engine.verify(lease, len(PROMPTS[name]), DraftBlock(()))
            for name, lease in leases.items()
        )
    )
    counters = engine.batch_counters
    assert (counters.batches, counters.blocks, counters.batched_forwards) == (3, 3, 0)


# ---------------------------------------------------------------------------
# service: concurrent sessions over real gRPC
# ---------------------------------------------------------------------------


class Stream:
    """One Verify stream of zero-token blocks and drafted blocks."""

    def __init__(self, stub: oracle_pb2_grpc.OracleStub) -> None:
        self.call = stub.Verify()

    async def send(self, request: oracle_pb2.VerifyRequest) -> oracle_pb2.VerifyResponse:
        await self.call.write(request)
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        return response

    async def open(self, session_id: str, tokens: Sequence[int]) -> None:
        open_request = oracle_pb2.OpenVerify(
            session_id=session_id,
            token_ids=list(tokens),
            sampling=common_pb2.SamplingParams(temperature=0.0),
        )
        response = await self.send(oracle_pb2.VerifyRequest(open=open_request))
        assert response.HasField("opened")

    async def block(self, round_index: int, base: int, tokens: Sequence[int]) -> Any:
        block = oracle_pb2.VerifyBlock(round=round_index, base_length=base, token_ids=list(tokens))
        response = await self.send(oracle_pb2.VerifyRequest(block=block))
        assert response.HasField("verdict")
        return response.verdict

    async def finish(self) -> None:
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF


@pytest.mark.parametrize(
    ("static_kv", "lean", "cache_type"),
    [("off", False, SequenceCache), ("off", True, LeanCache), ("on", True, PagedCache)],
)
async def test_concurrent_sessions_share_forwards_and_stay_exact(
    static_kv: str,
    lean: bool,
    cache_type: type[SequenceCache],
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    """Through the real service, on HF caches, on lean caches (the default outside a pool:
    the batched forward's rows copied back into their buffers) and on static KV slots
    (``--static-kv on``)."""
    model = loaded("llama", "oracle")
    references = {name: greedy_generate(model, prompt, 16) for name, prompt in PROMPTS.items()}
    engine = OracleEngine(
        model,
        oracle_id="batch-test",
        kv_budget_bytes=64 * MIB,
        max_sessions=8,
        max_cached_sessions=64,
        max_batch=4,
        static_kv=static_kv,
        kv=KVSettings(lean_forward=lean),
    )
    assert (engine.oracle.slots is not None) == (static_kv == "on")
    server = await start_server(
        "127.0.0.1:0",
        [(oracle_pb2_grpc.add_OracleServicer_to_server, OracleServicer(engine), SERVICE_NAME)],
    )
    await server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = oracle_pb2_grpc.OracleStub(channel)
    vocab = model.vocab_size

    async def run(name: str) -> list[int]:
        """Rounds alternate a zero-token block and a block of the next three reference
        tokens with the last one wrong: accepted 0 (bonus), then 2 (correction)."""
        prompt, reference = PROMPTS[name], references[name]
        stream = Stream(stub)
        await stream.open(name, prompt)
        committed = list(prompt)
        round_index = 0
        while len(committed) - len(prompt) < len(reference):
            done = len(committed) - len(prompt)
            draft: list[int] = []
            if round_index % 2 and done + 3 <= len(reference):
                draft = [*reference[done : done + 2], (reference[done + 2] + 1) % vocab]
            verdict = await stream.block(round_index, len(committed), draft)
            committed += [*draft[: verdict.num_accepted], verdict.next_token_id]
            assert verdict.committed_length == len(committed)
            round_index += 1
        await stream.finish()
        return committed[len(prompt) :]

    try:
        produced = await asyncio.gather(*(run(name) for name in PROMPTS))
        for name, tokens in zip(PROMPTS, produced, strict=True):
            assert tokens[: len(references[name])] == references[name]
            session = engine.sessions.get(name)
            assert session is not None
            assert type(session.cache) is cache_type
        counters = engine.batch_counters
        assert counters.batched_forwards >= 1 and counters.largest_forward >= 2
        assert counters.largest_forward <= 4
    finally:
        await channel.close()
        await server.stop(0)
        engine.shutdown()


def test_max_batch_setting() -> None:
    config = load_config(OracleConfig, ["--max-batch", "3"], env={"SPECDEC_MAX_BATCH": "9"})
    assert config.max_batch == 3
    assert load_config(OracleConfig, [], env={"SPECDEC_MAX_BATCH": "9"}).max_batch == 9
    assert load_config(OracleConfig, [], env={}).max_batch == 16
    with pytest.raises(InvalidArgument, match="--max-batch"):
        load_config(OracleConfig, ["--max-batch", "0"], env={}).validate()
