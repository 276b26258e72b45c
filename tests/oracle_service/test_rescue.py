"""Rescue blocks: the oracle drafts a session's next block itself after a miss.

Over real gRPC against the oracle servicer (tiny random llama oracle, an unrelated
tiny draft as the rescue draft), and the draft's side of it: drafting ahead after
a block that comes without the draft's own runner-ups.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

import grpc
import pytest

import oracle_service.rescue as rescue_module
from oracle_service.sessions import Lease
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock
from specdec.drafters.branches import draft_branches
from specdec.drafters.model_drafter import ModelDrafter
from specdec.engine.models import LoadedModel
from specdec.v1 import oracle_pb2
from tests.oracle_service.test_oracle_service import (  # noqa: F401 (fixtures)
    PROMPT,
    Running,
    VerifyStream,
    make_oracle,
    oracle_model,
    reference,
)


@pytest.fixture(scope="module")
def draft_model(loaded: Callable[[str, str], LoadedModel]) -> LoadedModel:
    return loaded("llama", "draft")


@pytest.fixture
def rescuing(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    draft_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[int], Awaitable[Running]]:
    """Oracles with the tiny draft as rescue draft, whose decisions wait for a draft's
    late blocks (when it flags none as the last) about ``wait_ns``."""

    async def make(wait_ns: int) -> Running:
        monkeypatch.setattr(rescue_module, "HOLD_MARGIN_NS", wait_ns)
        monkeypatch.setattr(rescue_module, "MAX_HOLD_NS", max(wait_ns, 200_000_000))
        return await make_oracle(rescue_draft=draft_model)

    return make


async def open_stream(oracle: Running, session_id: str) -> VerifyStream:
    stream = oracle.stream()
    await stream.open(session_id, PROMPT, allow_rescue=True)
    return stream


async def read_decision(stream: VerifyStream) -> list[int]:
    """The next response, which must be a rescue decision: the oracle's tokens."""
    response = await stream.call.read()
    assert response is not grpc.aio.EOF and response.HasField("rescue"), response
    return list(response.rescue.token_ids)


async def test_a_miss_gets_a_rescue_block_verified_next_and_every_token_is_exact(
    rescuing: Callable[[int], Awaitable[Running]],
    reference: list[int],  # noqa: F811
) -> None:
    oracle = await rescuing(0)
    stream = await open_stream(oracle, "r1")
    base = len(PROMPT)
    wrong = (reference[1] + 1) % 96
    # Rejected at position 1, and no block for that outcome follows: a miss. The verdict
    # goes out at once; the decision follows it.
    first = await stream.block(0, base, [reference[0], wrong])
    assert (first.num_accepted, first.next_token_id) == (1, reference[1])
    assert first.rescue_pending
    committed = [*PROMPT, *reference[:2]]
    announced = await read_decision(stream)
    assert len(announced) == 2  # as long as the block it follows
    # Each rescue block's verdict comes next; with nothing else sent, the oracle keeps
    # rescuing. Every committed token is the oracle's own greedy choice.
    for _ in range(3):
        verdict = await stream.read_verdict()
        assert verdict.rescued and not verdict.skipped and verdict.round == 0
        new = [*announced[: verdict.num_accepted], verdict.next_token_id]
        committed += new
        assert verdict.committed_length == len(committed)
        assert verdict.is_bonus == (verdict.num_accepted == len(announced))
        assert verdict.rescue_pending
        announced = await read_decision(stream)
        assert len(announced) == 2
    assert committed[base:] == reference[: len(committed) - base]
    # Once the draft closes its side, no further block is drafted for it.
    await stream.call.done_writing()
    while (await stream.read_verdict()).rescue_pending and await read_decision(stream):
        pass
    assert await stream.call.read() is grpc.aio.EOF
    assert await stream.call.code() == grpc.StatusCode.OK
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.rescue_draft and info.rescue_blocks >= 4


async def test_no_rescue_unless_the_stream_allows_it_or_the_turn_samples(
    rescuing: Callable[[int], Awaitable[Running]],
    reference: list[int],  # noqa: F811
) -> None:
    oracle = await rescuing(0)
    base = len(PROMPT)
    wrong = (reference[0] + 1) % 96
    for session, options in (("n1", {}), ("n2", {"allow_rescue": True, "temperature": 1.0})):
        stream = oracle.stream()
        await stream.open(session, PROMPT, **options)  # type: ignore[arg-type]
        verdict = await stream.block(0, base, [wrong])
        assert not verdict.rescue_pending
        await stream.finish()
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.rescue_blocks == 0


async def test_a_late_block_for_the_verdict_means_no_rescue(
    rescuing: Callable[[int], Awaitable[Running]],
    reference: list[int],  # noqa: F811
) -> None:
    # The draft's block for the verdict's outcome comes 0.3 s after the block it follows
    # (well after its verdict), within the wait: it is verified, and nothing rescued.
    oracle = await rescuing(5_000_000_000)
    stream = await open_stream(oracle, "h1")
    base = len(PROMPT)
    await stream.write_block(0, base, reference[:2])
    v0 = await stream.read_verdict()  # at once, not held
    assert (v0.num_accepted, v0.is_bonus, v0.next_token_id) == (2, True, reference[2])
    assert v0.rescue_pending
    await asyncio.sleep(0.3)
    start = time.perf_counter()
    await stream.write_block(1, base + 3, reference[3:5], assumed=reference[:3])
    assert await read_decision(stream) == []  # decided by the block, not the deadline
    assert time.perf_counter() - start < 4
    v1 = await stream.read_verdict()
    assert not v1.rescued and (v1.num_accepted, v1.next_token_id) == (2, reference[5])
    # Verdict 1 awaits its decision in turn; closing our side decides it: none.
    await stream.call.done_writing()
    assert v1.rescue_pending and await read_decision(stream) == []
    assert time.perf_counter() - start < 4
    assert await stream.call.read() is grpc.aio.EOF
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.rescue_blocks == 0


async def test_the_drafts_last_block_for_a_verdict_decides_at_once(
    rescuing: Callable[[int], Awaitable[Running]],
    reference: list[int],  # noqa: F811
) -> None:
    # The draft's blocks for verdict 0 (here one, for its full acceptance) are all here
    # and none fits the real outcome (a rejection): a miss, rescued without waiting.
    oracle = await rescuing(5_000_000_000)
    stream = await open_stream(oracle, "h2")
    base = len(PROMPT)
    wrong = (reference[1] + 1) % 96
    await stream.write_block(0, base, [reference[0], wrong])
    v0 = await stream.read_verdict()
    assert (v0.num_accepted, v0.next_token_id) == (1, reference[1]) and v0.rescue_pending
    start = time.perf_counter()
    full = [reference[0], wrong, reference[2]]  # the outcome the draft hoped for
    await stream.write_block(1, base + 3, reference[3:5], assumed=full, last_alternative=True)
    assert len(await read_decision(stream)) == 2
    assert time.perf_counter() - start < 4
    await stream.call.done_writing()  # no more rescues after the next verdict
    rescued = await stream.read_verdict()
    assert rescued.rescued
    if rescued.rescue_pending:
        assert await read_decision(stream) == []
    skipped = await stream.read_verdict()
    assert skipped.skipped and skipped.round == 1
    assert await stream.call.read() is grpc.aio.EOF


async def test_a_miss_behind_another_streams_rescue_block_is_not_held_up(
    rescuing: Callable[[int], Awaitable[Running]],
    reference: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rescue blocks drafted in a thread of their own (as on a GPU), the first one
    # slow. Stream A's miss waits for its block; stream B's miss, whose block would wait
    # behind A's, is decided "none" at once, and its block is never drafted.
    gate, drafted = threading.Event(), []

    class SlowFirst(rescue_module.RescueDrafter):
        def __init__(self, model: LoadedModel, executor: Executor | None = None) -> None:
            super().__init__(model)  # a thread of its own

        def _draft(self, lease: Lease, committed: list[int], k: int) -> DraftBlock:
            drafted.append(lease.session.session_id)
            if len(drafted) == 1:
                gate.wait(10)
            return super()._draft(lease, committed, k)

    monkeypatch.setattr(rescue_module, "RescueDrafter", SlowFirst)
    oracle = await rescuing(5_000_000_000)
    base = len(PROMPT)
    wrong = (reference[1] + 1) % 96
    full = [reference[0], wrong, reference[2]]  # the outcome the draft hoped for
    streams = [await open_stream(oracle, session) for session in ("qa", "qb")]
    for stream in streams:  # a miss: the draft's only block for the verdict does not fit
        verdict = await stream.block(0, base, [reference[0], wrong])
        assert verdict.rescue_pending
        await stream.write_block(1, base + 3, reference[3:5], assumed=full, last_alternative=True)
        await asyncio.sleep(0.2)
    first, second = streams
    start = time.perf_counter()
    assert await read_decision(second) == []
    assert time.perf_counter() - start < 2 and not gate.is_set()
    gate.set()
    assert len(await read_decision(first)) == 2
    assert drafted[0] == "qa" and "qb" not in drafted  # (qa may go on rescuing)


def test_drafting_ahead_after_a_block_without_runner_ups_reads_them_itself(
    draft_model: LoadedModel,
) -> None:
    # A rescue block arrives as bare tokens; the draft's corrections for it must be
    # the ones it would have drafted for the same block of its own.
    context = list(PROMPT)
    greedy = SamplingParams()
    own = ModelDrafter(draft_model).propose(context, 3, greedy)
    assert own.runner_ups
    bare = DraftBlock(own.token_ids)
    expected = draft_branches(ModelDrafter(draft_model).cache, context, own, 3, 3)
    got = draft_branches(ModelDrafter(draft_model).cache, context, bare, 3, 3)
    assert len(expected) == 4
    assert [b.assumed for b in got] == [b.assumed for b in expected]
    assert [b.block.token_ids for b in got] == [b.block.token_ids for b in expected]
