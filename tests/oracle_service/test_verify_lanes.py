"""Verify lanes: the oracle runs a second batch beside a running one, never one session twice.

The real oracle service over gRPC with a tiny random llama on static KV slots (run
eagerly on the CPU, each lane with its own scratch slot). A lane is held by a gate
inside the engine's batch job, where a slow forward would hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from oracle_service.config import OracleConfig
from oracle_service.engine import OracleEngine
from oracle_service.scheduler import PendingBlock
from specdec.config import load_config
from specdec.core.errors import InvalidArgument
from specdec.engine.models import LoadedModel
from tests.oracle_service.test_oracle_service import (  # noqa: F401  (fixtures)
    NEW_TOKENS,
    PROMPT,
    Running,
    greedy_reference,
    make_oracle,
    oracle_model,
    reference,
)

# Prompts whose greedy output runs NEW_TOKENS tokens without an end of sequence.
PROMPTS = [
    [1, (5 + 7 * i) % 90 + 3, 17, (33 + 11 * i) % 90 + 3, 60, 8, (12 + 5 * i) % 90 + 3, 40, 7]
    for i in (0, 1, 3, 5, 6, 7)
]


def hold_batches(engine: OracleEngine, held: Callable[[list[PendingBlock]], bool]) -> Any:
    """Make batches for which ``held`` is true wait on the returned gate in their lane;
    record the sessions of every running batch (and fail on one in two at once)."""
    gate = threading.Event()
    lock = threading.Lock()
    running: list[set[str]] = []
    overlaps: list[int] = []
    verify = engine._runner.verify

    def verify_held(batch: list[PendingBlock]) -> Any:
        ids = {pending.session.session_id for pending in batch}
        with lock:
            assert all(not ids & other for other in running), (ids, running)
            running.append(ids)
            overlaps.append(len(running))
        try:
            if held(batch):
                assert gate.wait(30)
            time.sleep(0.01)  # a forward that takes a while: batches get to overlap
            return verify(batch)
        finally:
            with lock:
                running.remove(ids)

    engine._runner.verify = verify_held  # type: ignore[method-assign]
    return gate, overlaps


async def finished(awaitable: Awaitable[Any], within_s: float) -> bool:
    """Whether ``awaitable`` (a task) finishes within ``within_s``; it keeps running."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=within_s)
    return bool(done)


@pytest.mark.parametrize("lanes", [1, 2])
async def test_a_second_lane_verifies_beside_a_held_batch(
    lanes: int,
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    reference: list[int],  # noqa: F811
    oracle_model: LoadedModel,  # noqa: F811
) -> None:
    oracle = await make_oracle(lanes=lanes, static_kv="on")
    assert oracle.engine.lanes == lanes
    gate, _ = hold_batches(
        oracle.engine, lambda batch: any(p.session.session_id == "a" for p in batch)
    )
    held = oracle.stream()
    await held.open("a", PROMPT)
    first = asyncio.ensure_future(held.block(0, len(PROMPT), reference[:3]))
    await asyncio.sleep(0.2)  # its batch is held in a lane
    other = oracle.stream()
    prompt_b = PROMPTS[1]

    async def session_b() -> list[int]:
        await other.open("b", prompt_b)
        return await other.decode(list(prompt_b), 3)

    b = asyncio.ensure_future(session_b())
    try:
        # One lane: b's open waits behind a's batch. Two: b is served beside it.
        assert await finished(b, 5.0 if lanes == 2 else 0.5) == (lanes == 2)
    finally:
        gate.set()
    assert await b == greedy_reference(oracle_model, prompt_b)[:3]
    verdict = await first
    assert (verdict.num_accepted, verdict.next_token_id) == (3, reference[3])
    await held.finish()
    await other.finish()


async def test_sessions_through_two_lanes_keep_their_outputs_and_one_lane_each(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    oracle_model: LoadedModel,  # noqa: F811
) -> None:
    # Every session pipelines: block j + 1 (assuming block j's verdict) is queued while
    # block j is verified, so it must wait for that lane instead of taking the other.
    oracle = await make_oracle(lanes=2, static_kv="on", batch_wait_s=0.005)
    _, overlaps = hold_batches(oracle.engine, lambda batch: False)
    expected = [greedy_reference(oracle_model, prompt) for prompt in PROMPTS]
    blocks = NEW_TOKENS // 3  # of 2 tokens and a bonus each

    async def session(index: int) -> list[int]:
        stream = oracle.stream()
        prompt, want = PROMPTS[index], expected[index]
        await stream.open(f"s{index}", prompt)

        async def write(j: int) -> None:
            await stream.write_block(
                j, len(prompt) + 3 * j, want[3 * j : 3 * j + 2], assumed=want[3 * j - 3 : 3 * j]
            )

        await write(0)
        output: list[int] = []
        for j in range(blocks):
            if j + 1 < blocks:
                await write(j + 1)
            verdict = await stream.read_verdict()
            assert verdict.round == j and not verdict.skipped
            output.extend([*want[3 * j : 3 * j + verdict.num_accepted], verdict.next_token_id])
        await stream.finish()
        return output

    outputs = await asyncio.gather(*(session(i) for i in range(len(PROMPTS))))
    for output, want in zip(outputs, expected, strict=True):
        assert output == want[: 3 * blocks]
    assert max(overlaps) == 2  # batches ran side by side (and never shared a session)


async def test_a_reopen_waits_for_its_sessions_batch_in_the_other_lane(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    reference: list[int],  # noqa: F811
) -> None:
    oracle = await make_oracle(lanes=2, static_kv="on")
    gate, _ = hold_batches(oracle.engine, lambda batch: True)
    old = oracle.stream()
    await old.open("a", PROMPT)
    pending = asyncio.ensure_future(old.block(0, len(PROMPT), reference[:2]))
    await asyncio.sleep(0.2)  # held in lane 0; lane 1 is free
    new = oracle.stream()
    reopen = asyncio.ensure_future(new.open("a", PROMPT))
    try:
        assert not await finished(reopen, 0.5)  # the session's cache is in use
    finally:
        gate.set()
    opened = await reopen
    assert opened.cached_tokens + opened.computed_tokens == len(PROMPT) - 1
    committed = list(PROMPT)
    assert await new.decode(committed, 4) == reference[:4]
    await new.finish()
    # The old stream's block ran on the session before or after the reopen: either way
    # it changed nothing the new stream saw.
    with contextlib.suppress(grpc.aio.AioRpcError):  # refused: the stream went stale
        await pending


def test_verify_lanes_are_configured_and_checked(oracle_model: LoadedModel) -> None:  # noqa: F811
    assert load_config(OracleConfig, [], {}).verify_lanes == 0  # auto
    config = load_config(OracleConfig, ["--verify-lanes", "2"], {})
    config.validate()
    assert config.verify_lanes == 2
    assert load_config(OracleConfig, [], {"SPECDEC_VERIFY_LANES": "1"}).verify_lanes == 1
    for argv, message in [
        (["--verify-lanes", "-1"], "--verify-lanes must be in"),
        (["--verify-lanes", "2", "--rescue-draft", "demo"], "needs one verify lane"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            load_config(OracleConfig, argv, {}).validate()
    with pytest.raises(InvalidArgument, match="needs one verify lane"):
        OracleEngine(
            oracle_model,
            oracle_id="x",
            kv_budget_bytes=1 << 20,
            max_sessions=1,
            max_cached_sessions=1,
            lanes=2,
            rescue_draft=oracle_model,
        )
