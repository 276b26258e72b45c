"""The oracle service over real gRPC: exactness against HF generate, protocol errors, caching.

Each test starts the real servicer (``specdec.rpc.server.start_server``) on
127.0.0.1 with a tiny random llama and talks to it through a grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oracle_service.config import OracleConfig
from oracle_service.engine import OracleEngine
from oracle_service.main import OracleService, serve, start
from oracle_service.servicer import SERVICE_NAME, OracleServicer
from specdec.config import load_config
from specdec.core.errors import NotFound
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle
from specdec.rpc.server import ServiceServer, start_server
from specdec.v1 import (
    common_pb2,
    gateway_pb2,
    oracle_pb2,
    oracle_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

PROMPT = [1, 5, 17, 33, 60, 8, 12, 40, 7]
NEW_TOKENS = 24
MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# fixtures and a small client
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_model(loaded: Callable[[str, str], LoadedModel]) -> LoadedModel:
    return loaded("llama", "oracle")


def greedy_reference(model: LoadedModel, prompt: list[int]) -> list[int]:
    """HF greedy generate: what the oracle alone must produce, token for token."""
    output = model.model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2
    )
    tokens: list[int] = output[0, len(prompt) :].tolist()
    # generate stops at EOS, the oracle does not: compare up to where generate stopped.
    assert len(tokens) >= 16, "the reference is too short to test anything"
    return tokens


@pytest.fixture(scope="module")
def reference(oracle_model: LoadedModel) -> list[int]:
    return greedy_reference(oracle_model, PROMPT)


class VerifyStream:
    """One Verify stream, request by request."""

    def __init__(self, stub: oracle_pb2_grpc.OracleStub) -> None:
        self.call = stub.Verify()

    async def send(self, request: oracle_pb2.VerifyRequest) -> oracle_pb2.VerifyResponse:
        await self.call.write(request)
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        return response

    async def open(
        self,
        session_id: str,
        tokens: Sequence[int],
        *,
        temperature: float = 0.0,
        seed: int = 0,
        allow_rescue: bool = False,
    ) -> oracle_pb2.VerifyOpened:
        request = oracle_pb2.VerifyRequest(
            open=oracle_pb2.OpenVerify(
                session_id=session_id,
                token_ids=list(tokens),
                sampling=common_pb2.SamplingParams(temperature=temperature, max_new_tokens=64),
                seed=seed,
                allow_rescue=allow_rescue,
            )
        )
        response = await self.send(request)
        assert response.HasField("opened")
        return response.opened

    async def block(
        self,
        round_index: int,
        base_length: int,
        tokens: Sequence[int] = (),
        q: Sequence[common_pb2.SparseDistribution] = (),
    ) -> oracle_pb2.VerifyVerdict:
        request = oracle_pb2.VerifyRequest(
            block=oracle_pb2.VerifyBlock(
                round=round_index,
                base_length=base_length,
                token_ids=list(tokens),
                draft_distributions=list(q),
            )
        )
        response = await self.send(request)
        assert response.HasField("verdict")
        return response.verdict

    async def write_block(
        self,
        round_index: int,
        base_length: int,
        tokens: Sequence[int] = (),
        assumed: Sequence[int] = (),
        last_alternative: bool = False,
    ) -> None:
        """Send a block without waiting for its verdict (pipelining); read it with read()."""
        await self.call.write(
            oracle_pb2.VerifyRequest(
                block=oracle_pb2.VerifyBlock(
                    round=round_index,
                    base_length=base_length,
                    token_ids=list(tokens),
                    assumed_token_ids=list(assumed),
                    last_alternative=last_alternative,
                )
            )
        )

    async def read_verdict(self) -> oracle_pb2.VerifyVerdict:
        response = await self.call.read()
        assert response is not grpc.aio.EOF and response.HasField("verdict")
        return response.verdict

    async def decode(self, committed: list[int], n: int, first_round: int = 0) -> list[int]:
        """n zero-token rounds (plain decoding): extends ``committed``, returns the new tokens."""
        new: list[int] = []
        for i in range(n):
            verdict = await self.block(first_round + i, len(committed))
            assert (verdict.num_accepted, verdict.is_bonus) == (0, True)
            committed.append(verdict.next_token_id)
            new.append(verdict.next_token_id)
            assert verdict.committed_length == len(committed)
        return new

    async def finish(self) -> None:
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK


@dataclass
class Running:
    engine: OracleEngine
    server: ServiceServer
    channel: grpc.aio.Channel

    @property
    def stub(self) -> oracle_pb2_grpc.OracleStub:
        return oracle_pb2_grpc.OracleStub(self.channel)

    def stream(self) -> VerifyStream:
        return VerifyStream(self.stub)


@pytest.fixture
async def make_oracle(
    oracle_model: LoadedModel,
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Running] = []

    async def make(**overrides: Any) -> Running:
        settings: dict[str, Any] = {
            "oracle_id": "test-oracle",
            "kv_budget_bytes": 64 * MIB,
            "max_sessions": 8,
            "max_cached_sessions": 64,
            **overrides,
        }
        engine = OracleEngine(oracle_model, **settings)
        server = await start_server(
            "127.0.0.1:0",
            [(oracle_pb2_grpc.add_OracleServicer_to_server, OracleServicer(engine), SERVICE_NAME)],
        )
        await server.set_serving(True)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        running = Running(engine, server, channel)
        started.append(running)
        return running

    yield make
    for running in started:
        await running.channel.close()
        await running.server.stop(0)
        running.engine.shutdown()


async def expect_status(code: grpc.StatusCode, awaitable: Awaitable[Any]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def sparse(ids: Sequence[int], probs: Sequence[float]) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=list(ids), probs=list(probs))


# ---------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------


async def test_zero_token_blocks_reproduce_hf_greedy_generate(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    opened = await stream.open("s1", PROMPT)
    assert opened.committed_length == len(PROMPT)
    assert (opened.cached_tokens, opened.computed_tokens) == (0, len(PROMPT) - 1)
    assert opened.oracle_id == "test-oracle"
    committed = list(PROMPT)
    produced = await stream.decode(committed, len(reference))
    assert produced == reference
    await stream.finish()


async def test_correct_draft_is_fully_accepted_with_the_next_token_as_bonus(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    verdict = await stream.block(7, len(PROMPT), reference[:5])
    assert (verdict.round, verdict.num_accepted, verdict.is_bonus) == (7, 5, True)
    assert verdict.next_token_id == reference[5]
    assert verdict.committed_length == len(PROMPT) + 6
    # The accepted tokens' KV was kept: decoding on continues the reference exactly.
    committed = PROMPT + reference[:6]
    assert await stream.decode(committed, 4, first_round=8) == reference[6:10]
    await stream.finish()


async def test_wrong_draft_token_is_rejected_and_corrected(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    wrong = (reference[2] + 1) % oracle.engine.vocab_size
    verdict = await stream.block(0, len(PROMPT), [reference[0], reference[1], wrong, 3])
    assert (verdict.num_accepted, verdict.next_token_id, verdict.is_bonus) == (
        2,
        reference[2],
        False,
    )
    assert verdict.committed_length == len(PROMPT) + 3
    # The rejected tail was rolled back: the next round continues from the correction.
    committed = PROMPT + reference[:3]
    assert await stream.decode(committed, 3, first_round=1) == reference[3:6]
    await stream.finish()


async def test_sampled_verification_uses_the_sessions_seed_and_temperature(
    make_oracle: Callable[..., Awaitable[Running]], oracle_model: LoadedModel
) -> None:
    """The service draws exactly what the in-process Oracle draws for the same seed."""
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT, temperature=1.5, seed=1234)
    committed = list(PROMPT)
    produced = await stream.decode(committed, 12)
    await stream.finish()

    local = Oracle(oracle_model)
    cache = local.new_cache()
    params = SamplingParams(temperature=1.5)
    expected: list[int] = []
    tokens = list(PROMPT)
    for _ in range(12):
        verdict = local.verify(cache, tokens, DraftBlock(token_ids=()), params, seed=1234)
        tokens.append(verdict.next_token)
        expected.append(verdict.next_token)
    assert produced == expected


# ---------------------------------------------------------------------------
# pipelining: blocks sent before the verdict they depend on
# ---------------------------------------------------------------------------


async def test_oracle_verifies_a_pipelined_block_whose_assumption_held(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("p1", PROMPT)
    base = len(PROMPT)
    # Both blocks go out before either verdict: the second assumes the first is accepted
    # in full and that its bonus is reference[2].
    await stream.write_block(0, base, reference[:2])
    await stream.write_block(1, base + 3, reference[3:5], assumed=reference[:3])
    v1, v2 = await stream.read_verdict(), await stream.read_verdict()
    assert (v1.num_accepted, v1.is_bonus, v1.next_token_id) == (2, True, reference[2])
    assert not v2.skipped
    assert (v2.num_accepted, v2.next_token_id) == (2, reference[5])
    assert v2.committed_length == base + 6
    await stream.finish()


async def test_oracle_skips_a_pipelined_block_whose_assumption_failed(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("p2", PROMPT)
    base = len(PROMPT)
    wrong = (reference[0] + 1) % 100
    await stream.write_block(0, base, [reference[0], wrong])  # rejected at position 1
    await stream.write_block(1, base + 3, reference[3:5], assumed=[reference[0], wrong, 0])
    v1, v2 = await stream.read_verdict(), await stream.read_verdict()
    assert (v1.num_accepted, v1.next_token_id) == (1, reference[1])
    assert v2.skipped and v2.committed_length == base + 2  # nothing changed
    # The stream goes on from what was really committed.
    v3 = await stream.block(2, base + 2, reference[2:4])
    assert (v3.num_accepted, v3.next_token_id) == (2, reference[4])
    await stream.finish()


async def test_blocks_queue_as_they_arrive_and_are_answered_in_order(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    # A draft sends, before verdict 0: block 0, then for its outcomes two alternatives
    # (corrections at positions 0 and 1) and the full acceptance. All four must wait in
    # the engine's queue while the model is busy, not in the stream unread, so that
    # the batch after verdict 0 finds the block that applies.
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("q1", PROMPT)
    base = len(PROMPT)
    other = [(token + 1) % 100 for token in reference[:2]]
    gate = threading.Event()
    busy = asyncio.get_running_loop().run_in_executor(oracle.engine._lanes.executors[0], gate.wait)
    try:
        await stream.write_block(0, base, reference[:2])
        await stream.write_block(1, base + 1, reference[1:3], assumed=other[:1])
        await stream.write_block(2, base + 2, reference[2:4], assumed=[reference[0], other[1]])
        await stream.write_block(3, base + 3, reference[3:5], assumed=reference[:3])
        # Block 0 is taken into a batch that waits for the model thread; the rest queue.
        for _ in range(200):
            if oracle.engine.queued_blocks == 3:
                break
            await asyncio.sleep(0.01)
        assert oracle.engine.queued_blocks == 3
        await asyncio.sleep(0.2)  # the model stays busy: block 0 waits for it
    finally:
        gate.set()
        await busy
    verdicts = [await stream.read_verdict() for _ in range(4)]
    assert [v.round for v in verdicts] == [0, 1, 2, 3]
    assert (verdicts[0].num_accepted, verdicts[0].next_token_id) == (2, reference[2])
    assert verdicts[1].skipped and verdicts[2].skipped
    assert (verdicts[3].num_accepted, verdicts[3].next_token_id) == (2, reference[5])
    assert oracle.engine.batch_counters.verified == 2  # the alternatives never ran
    # Block 3's queue time starts at verdict 0, when it could first run, not on arrival.
    assert verdicts[0].queue_ns >= 200_000_000 > 2 * verdicts[3].queue_ns
    await stream.finish()


async def test_blocks_sent_after_a_refused_block_are_refused_too(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    # The second block extends the committed tokens exactly, but it was sent on the
    # same stream after one the oracle refuses: it must not be verified either.
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("q2", PROMPT)
    base = len(PROMPT)
    gate = threading.Event()
    busy = asyncio.get_running_loop().run_in_executor(oracle.engine._lanes.executors[0], gate.wait)
    try:
        await stream.write_block(0, base + 5, reference[:2])  # stale: refused
        await stream.write_block(1, base, reference[:2])
        for _ in range(200):  # block 0 in a batch waiting for the model, block 1 queued
            if oracle.engine.queued_blocks == 1:
                break
            await asyncio.sleep(0.01)
        assert oracle.engine.queued_blocks == 1
    finally:
        gate.set()
        await busy
    details = await expect_status(grpc.StatusCode.FAILED_PRECONDITION, stream.read_verdict())
    assert f"extends length {base + 5}" in details
    for _ in range(200):  # the second block's turn comes in the next batch
        if oracle.engine.queued_blocks == 0:
            break
        await asyncio.sleep(0.01)
    assert oracle.engine.batch_counters.verified == 0
    again = oracle.stream()
    opened = await again.open("q2", PROMPT)
    assert (opened.cached_tokens, opened.computed_tokens) == (base - 1, 0)  # nothing applied
    assert await again.decode(list(PROMPT), 3) == reference[:3]
    await again.finish()


async def test_bad_assumed_tokens_are_invalid(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle()
    for assumed, needle in (([10**6], "not a token id"), (list(range(40)), "cannot assume")):
        stream = oracle.stream()
        await stream.open("p3", PROMPT)
        await stream.write_block(0, len(PROMPT), [], assumed=assumed)
        details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stream.read_verdict())
        assert needle in details


# ---------------------------------------------------------------------------
# protocol errors leave the session intact
# ---------------------------------------------------------------------------


async def test_stale_block_is_refused_and_the_session_keeps_working(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    committed = list(PROMPT)
    await stream.decode(committed, 3)
    details = await expect_status(
        grpc.StatusCode.FAILED_PRECONDITION, stream.block(3, len(committed) + 2)
    )
    assert f"extends length {len(committed) + 2}" in details
    assert f"has {len(committed)} committed tokens" in details
    # Nothing was applied: a new stream on the session finds all of it cached and goes on.
    again = oracle.stream()
    opened = await again.open("s1", committed)
    assert (opened.cached_tokens, opened.computed_tokens) == (len(committed) - 1, 0)
    assert await again.decode(committed, 4) == reference[3:7]
    await again.finish()


async def test_duplicated_block_is_refused_and_the_session_keeps_working(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    verdict = await stream.block(0, len(PROMPT), reference[:2])
    assert verdict.num_accepted == 2
    await expect_status(
        grpc.StatusCode.FAILED_PRECONDITION, stream.block(0, len(PROMPT), reference[:2])
    )
    committed = PROMPT + reference[:3]
    again = oracle.stream()
    opened = await again.open("s1", committed)
    assert opened.computed_tokens == 0
    assert await again.decode(committed, 3) == reference[3:6]
    await again.finish()


async def test_block_of_an_older_stream_of_the_session_is_refused(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle()
    old, new = oracle.stream(), oracle.stream()
    await old.open("s1", PROMPT)
    await new.open("s1", PROMPT)
    details = await expect_status(grpc.StatusCode.FAILED_PRECONDITION, old.block(0, len(PROMPT)))
    assert "stale" in details
    committed = list(PROMPT)
    await new.decode(committed, 2)
    await new.finish()


async def test_token_ids_outside_the_vocabulary_are_invalid(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle()
    vocab = oracle.engine.vocab_size
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, oracle.stream().open("s1", [*PROMPT, vocab])
    )
    assert str(vocab) in details
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, oracle.stream().open("s1", [1, -3]))
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, stream.block(0, len(PROMPT), [4, vocab + 7])
    )
    assert oracle.engine.sessions.get("s1").committed == PROMPT  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "q",
    [
        sparse([4, 5], [math.nan, 1.0]),
        sparse([4, 5], [1.2, -0.2]),
        sparse([4, 5], [0.3, 0.3]),
        sparse([5, 6], [0.5, 0.5]),  # the drafted token 4 has probability 0 under its own q
        sparse([4, 4], [0.5, 0.5]),
    ],
    ids=["nan", "negative", "sum-not-1", "token-not-in-support", "duplicate-ids"],
)
async def test_malformed_draft_distribution_is_invalid(
    make_oracle: Callable[..., Awaitable[Running]], q: common_pb2.SparseDistribution
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT, temperature=1.0, seed=3)
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stream.block(0, len(PROMPT), [4], [q]))


async def test_first_message_must_be_open(make_oracle: Callable[..., Awaitable[Running]]) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stream.block(0, 3))
    assert "open" in details


async def test_empty_or_too_long_context_and_overlong_block_are_invalid(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle()
    max_context = oracle.engine.max_context
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, oracle.stream().open("s1", []))
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, oracle.stream().open("s1", [4] * max_context)
    )
    stream = oracle.stream()
    near_full = [4] * (max_context - 3)
    await stream.open("s1", near_full)
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, stream.block(0, len(near_full), [4, 4, 4])
    )
    assert "at most 2 tokens" in details


# ---------------------------------------------------------------------------
# cache reuse, eviction, release
# ---------------------------------------------------------------------------


async def test_next_turn_reuses_the_cached_prefix(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    committed = list(PROMPT)
    await stream.decode(committed, 5)
    await stream.finish()
    # Next turn: the user adds 3 tokens; only those (and the last generated one) are new.
    context = [*committed, 9, 10, 11]
    turn = oracle.stream()
    opened = await turn.open("s1", context)
    assert opened.cached_tokens == len(committed) - 1
    assert opened.computed_tokens == 3
    assert opened.committed_length == len(context)
    counters = oracle.engine.sessions.counters
    assert counters.prefill_reused == len(committed) - 1
    assert counters.prefill_computed == (len(PROMPT) - 1) + 3
    await turn.finish()


async def test_evicted_session_is_reprefilled_with_identical_output(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    oracle = await make_oracle(kv_budget_bytes=1)  # no idle session fits
    stream = oracle.stream()
    await stream.open("a", PROMPT)
    committed = list(PROMPT)
    first = await stream.decode(committed, 6)
    await stream.finish()
    other = oracle.stream()
    await other.open("b", [1, 2, 3, 4])
    await other.finish()
    sessions = oracle.engine.sessions
    assert sessions.counters.evictions >= 1
    assert sessions.get("a") is None

    again = oracle.stream()
    opened = await again.open("a", committed)
    assert (opened.cached_tokens, opened.computed_tokens) == (0, len(committed) - 1)
    rest = await again.decode(committed, 8)
    assert first + rest == reference[:14]
    await again.finish()


async def test_too_many_cached_sessions_evicts_the_least_recently_used(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle(max_cached_sessions=2)
    for session_id in ("a", "b", "c"):
        stream = oracle.stream()
        await stream.open(session_id, PROMPT)
        await stream.finish()
    # Reopening forces one more pass of the model thread, after the last close's eviction.
    stream = oracle.stream()
    await stream.open("c", PROMPT)
    await stream.finish()
    sessions = oracle.engine.sessions
    assert sessions.get("a") is None
    assert sessions.get("b") is not None and sessions.get("c") is not None


async def test_release_session_frees_its_cache(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle()
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    await stream.finish()
    assert oracle.engine.sessions.kv_cache_bytes > 0
    reply = await oracle.stub.ReleaseSession(oracle_pb2.ReleaseSessionRequest(session_id="s1"))
    assert reply.released
    assert oracle.engine.sessions.kv_cache_bytes == 0
    reply = await oracle.stub.ReleaseSession(oracle_pb2.ReleaseSessionRequest(session_id="s1"))
    assert not reply.released
    opened = await oracle.stream().open("s1", PROMPT)
    assert opened.cached_tokens == 0


# ---------------------------------------------------------------------------
# limits, info, lifecycle
# ---------------------------------------------------------------------------


async def test_streams_beyond_max_sessions_are_refused_at_once(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle(max_sessions=2)
    first, second = oracle.stream(), oracle.stream()
    await first.open("a", PROMPT)
    await second.open("b", PROMPT)
    details = await expect_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, oracle.stream().open("c", PROMPT)
    )
    assert "--max-sessions" in details
    await first.finish()
    third = oracle.stream()
    await third.open("c", PROMPT)  # a slot is free again
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.active_sessions == 2
    await second.finish()
    await third.finish()


async def test_a_cancelled_stream_frees_its_slot_and_keeps_its_cache(
    make_oracle: Callable[..., Awaitable[Running]],
) -> None:
    oracle = await make_oracle(max_sessions=1)
    stream = oracle.stream()
    await stream.open("a", PROMPT)
    committed = list(PROMPT)
    await stream.decode(committed, 2)
    stream.call.cancel()
    # The server learns of the cancellation asynchronously; wait for the slot to come back.
    for _ in range(500):
        if oracle.engine.sessions.active_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert oracle.engine.sessions.active_streams == 0
    again = oracle.stream()
    opened = await again.open("a", committed)
    assert opened.computed_tokens == 0
    await again.finish()


async def test_concurrent_sessions_each_get_their_own_exact_output(
    make_oracle: Callable[..., Awaitable[Running]], reference: list[int]
) -> None:
    """Streams of two sessions interleave in the model thread without touching each other."""
    oracle = await make_oracle()
    other_prompt = [1, 9, 9, 30]
    other_reference = await asyncio.to_thread(greedy_reference, oracle.engine.model, other_prompt)

    async def run(session_id: str, prompt: list[int], n: int) -> list[int]:
        stream = oracle.stream()
        await stream.open(session_id, prompt)
        produced = await stream.decode(list(prompt), n)
        await stream.finish()
        return produced

    first, second = await asyncio.gather(
        run("a", PROMPT, 16), run("b", other_prompt, len(other_reference))
    )
    assert first == reference[:16]
    assert second == other_reference


async def test_get_info_describes_the_model_and_its_load(
    make_oracle: Callable[..., Awaitable[Running]], oracle_model: LoadedModel
) -> None:
    oracle = await make_oracle(kv_budget_bytes=5 * MIB)
    stream = oracle.stream()
    await stream.open("s1", PROMPT)
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.oracle_id == "test-oracle"
    assert info.model == oracle_model.name
    assert info.vocab_fingerprint == oracle_model.fingerprint
    assert (info.vocab_size, info.max_context) == (96, 128)
    assert list(info.eos_token_ids) == [2]
    assert (info.active_sessions, info.cached_sessions) == (1, 1)
    assert info.kv_cache_bytes > 0 and info.kv_cache_budget_bytes == 5 * MIB
    assert info.device == "cpu"
    assert (info.batches, info.verified_blocks, info.verify_busy_ns) == (0, 0, 0)
    verdict = await stream.block(0, len(PROMPT), [5, 6])
    await stream.block(1, verdict.committed_length)
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert (info.batches, info.verified_blocks) == (2, 2)
    assert info.verify_busy_ns > 0
    await stream.finish()


def test_config_reads_flags_over_environment() -> None:
    config = load_config(
        OracleConfig,
        ["--port", "0", "--max-sessions", "3"],
        env={"SPECDEC_KV_BUDGET_MB": "2", "SPECDEC_MAX_SESSIONS": "9"},
    )
    assert (config.port, config.max_sessions, config.kv_budget_bytes) == (0, 3, 2 * MIB)
    assert config.resolved_advertise_address(1234).endswith(":1234")
    assert config.resolved_oracle_id()


async def health_status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
    return int(reply.status)


async def test_health_is_not_serving_until_the_model_is_loaded(
    oracle_model: LoadedModel,
) -> None:
    release = threading.Event()

    def slow_loader(config: OracleConfig) -> LoadedModel:
        assert release.wait(timeout=30)
        return oracle_model

    config = OracleConfig(host="127.0.0.1", port=0, oracle_id="slow")
    service: OracleService = await start(config)
    try:
        loading = asyncio.create_task(service.load(slow_loader))
        await asyncio.sleep(0)
        assert await health_status(service.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = oracle_pb2_grpc.OracleStub(channel)
            await expect_status(
                grpc.StatusCode.UNAVAILABLE, stub.GetInfo(oracle_pb2.GetInfoRequest())
            )
            release.set()
            await loading
            assert await health_status(service.port) == health_pb2.HealthCheckResponse.SERVING
            info = await stub.GetInfo(oracle_pb2.GetInfoRequest())
            assert info.oracle_id == "slow"
    finally:
        release.set()
        await service.stop(0)


async def test_serve_ends_with_the_load_error_when_the_model_is_missing(tmp_path: Any) -> None:
    config = OracleConfig(host="127.0.0.1", port=0, model=str(tmp_path / "no-such-model"))
    with pytest.raises(NotFound, match="does not exist"):
        await asyncio.wait_for(serve(config), timeout=30)


class RecordingRegistry(registry_pb2_grpc.WorkerRegistryServicer):  # type: ignore[misc]
    """The gateway's side of Connect, reduced to recording what a worker sends."""

    def __init__(self) -> None:
        self.registered: asyncio.Queue[registry_pb2.RegisterWorker] = asyncio.Queue()
        self.loads: asyncio.Queue[registry_pb2.WorkerLoad] = asyncio.Queue()

    async def Connect(
        self, request_iterator: AsyncIterator[registry_pb2.ConnectRequest], context: Any
    ) -> AsyncIterator[registry_pb2.ConnectResponse]:
        async for message in request_iterator:
            if message.HasField("register"):
                await self.registered.put(message.register)
                yield registry_pb2.ConnectResponse(
                    registered=registry_pb2.Registered(load_interval_ms=100)
                )
            elif message.HasField("load"):
                await self.loads.put(message.load)


async def test_registers_at_the_gateway_and_reports_load(oracle_model: LoadedModel) -> None:
    registry = RecordingRegistry()
    gateway = await start_server(
        "127.0.0.1:0",
        [
            (
                registry_pb2_grpc.add_WorkerRegistryServicer_to_server,
                registry,
                "specdec.v1.WorkerRegistry",
            )
        ],
    )
    config = OracleConfig(
        host="127.0.0.1",
        port=0,
        oracle_id="o1",
        gateway=f"127.0.0.1:{gateway.port}",
        advertise_address="oracle.internal:7000",
        max_sessions=5,
    )
    service = await start(config)
    try:
        await service.load(lambda _config: oracle_model)
        register = await asyncio.wait_for(registry.registered.get(), timeout=20)
        assert register.worker_id == "o1"
        assert register.kind == gateway_pb2.WORKER_KIND_ORACLE
        assert register.address == "oracle.internal:7000"
        assert register.vocab_fingerprint == oracle_model.fingerprint
        assert (register.vocab_size, register.max_context, register.max_sessions) == (96, 128, 5)
        assert list(register.eos_token_ids) == [2]
        load = await asyncio.wait_for(registry.loads.get(), timeout=20)
        assert load.active_sessions == 0
    finally:
        await service.stop(0)
        await gateway.stop(0)
