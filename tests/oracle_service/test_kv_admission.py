"""Paged KV in the real oracle service: a stream gets in when its turn's blocks can be
reserved, idle sessions make room for it, and otherwise it is refused before any work.

The tiny llama: 2 layers, 2 key/value heads of 8, float32: 4 KiB a block of 16 positions;
a stream opened with 10 tokens and max_new_tokens 64 reserves 10 + 64 + 33 positions
(7 blocks).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest

from oracle_service.config import OracleConfig
from specdec.config import load_config
from specdec.core.errors import InvalidArgument
from specdec.engine.kv_options import turn_positions
from specdec.engine.models import LoadedModel
from specdec.engine.paged_kv import PagedCache, PagedPool
from tests.oracle_service.test_oracle_service import (  # noqa: F401
    Running,
    greedy_reference,
    make_oracle,
    oracle_model,
)

BLOCKS = 30


def prompt(n: int, salt: int = 0) -> list[int]:
    return [1, *(3 + (salt * 7 + i) % 90 for i in range(n - 1))]


async def paged_oracle(
    make: Callable[..., Awaitable[Running]], blocks: int = BLOCKS
) -> tuple[Running, PagedPool]:
    running = await make(static_kv="on", kv_budget_bytes=blocks * 4096, max_sessions=8)
    pool = running.engine.oracle.slots
    assert isinstance(pool, PagedPool) and pool.block_bytes == 4096 and pool.num_blocks == blocks
    return running, pool


async def test_streams_reserve_their_turn_and_the_one_that_does_not_fit_is_refused(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    oracle_model: LoadedModel,  # noqa: F811
) -> None:
    oracle, pool = await paged_oracle(make_oracle)
    assert turn_positions(10, 64) == 107  # 7 blocks
    streams = [oracle.stream() for _ in range(4)]
    for i, stream in enumerate(streams):
        await stream.open(f"s{i}", prompt(10, i))
    assert pool.available_blocks == BLOCKS - 4 * 7
    refused = oracle.stream()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await refused.open("late", prompt(10, 9))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV memory cannot hold this stream" in (error.value.details() or "")
    # The admitted streams decode exactly as HF does, the refusal touched none of them.
    for i, stream in enumerate(streams[:2]):
        committed = prompt(10, i)
        assert (
            await stream.decode(committed, 6) == greedy_reference(oracle_model, prompt(10, i))[:6]
        )
    await streams[0].finish()  # its turn's reservation ends; its session stays cached
    again = oracle.stream()
    await again.open("late", prompt(10, 9))
    session = oracle.engine.sessions.get("s0")
    assert session is not None and isinstance(session.cache, PagedCache)
    assert session.cache.reserved == 0 and session.cache.blocks  # idle, holding its blocks
    for stream in [*streams[1:], again]:
        await stream.finish()


async def test_idle_sessions_are_evicted_to_admit_a_stream_and_come_back_exact(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    oracle_model: LoadedModel,  # noqa: F811
) -> None:
    oracle, pool = await paged_oracle(make_oracle)
    long = [prompt(90, i) for i in range(3)]  # 89 cached positions: 6 blocks each
    for i, tokens in enumerate(long):
        stream = oracle.stream()
        await stream.open(f"idle{i}", tokens)
        await stream.finish()
    assert pool.free_blocks == BLOCKS - 3 * 6
    busy = [oracle.stream() for _ in range(2)]
    for i, stream in enumerate(busy):  # 7 blocks each: the second needs an idle one's
        await stream.open(f"busy{i}", prompt(10, i))
    assert oracle.engine.sessions.get("idle0") is None  # the least recently used went
    assert oracle.engine.sessions.get("idle2") is not None
    back = oracle.stream()
    opened = await back.open("idle0", long[0])
    assert (opened.cached_tokens, opened.computed_tokens) == (0, 89)  # recomputed
    committed = list(long[0])
    assert await back.decode(committed, 5) == greedy_reference(oracle_model, long[0])[:5]
    for stream in [*busy, back]:
        await stream.finish()


def test_kv_flags_are_read_and_checked() -> None:
    config = load_config(OracleConfig, [], env={})
    assert (config.kv_budget_mb, config.gpu_memory_fraction, config.kv_layout) == (0, 0.9, "paged")
    assert (config.batch_invariant, config.verify_tokens, config.attention) == (True, 128, "auto")
    assert config.kv_settings().budget_bytes is None  # auto
    argv = ["--kv-budget-mb", "2", "--no-batch-invariant", "--kv-layout", "slots"]
    settings = load_config(OracleConfig, argv, env={"SPECDEC_ATTENTION": "chunked"}).kv_settings()
    assert (settings.budget_bytes, settings.batch_invariant) == (2 << 20, False)
    assert (settings.layout, settings.attention) == ("slots", "chunked")
    for argv, message in [
        (["--gpu-memory-fraction", "0"], "--gpu-memory-fraction must be in"),
        (["--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction must be in"),
        (["--verify-tokens", "20"], "--verify-tokens must be at least 34"),
        (["--max-batch", "64", "--verify-tokens", "48"], "--verify-tokens must be at least 64"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            load_config(OracleConfig, argv, env={}).validate()
    load_config(OracleConfig, ["--no-batch-invariant", "--verify-tokens", "1"], env={}).validate()
