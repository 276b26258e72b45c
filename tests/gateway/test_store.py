"""The session stores (memory, SQLite, Redis) against one contract, on the real backends:
a SQLite file, a real ``redis-server``. Plus what only one of them promises: SQLite's
commits survive a SIGKILL of the process that wrote them, one gateway per state
directory; Redis's turn locks expire when their holder dies, and fence its writes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.sessions import SessionTable
from gateway.store import SessionRecord, SessionStore, TurnRecord, open_store
from gateway.store.base import ChatRecord
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SqliteStore
from specdec.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason
from specdec.core.types import ChatMessage, DrafterKind, Speculation
from tests.redis_server import redis_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        opened: SessionStore = await open_store(url)
        await opened._redis.flushdb()  # type: ignore[attr-defined]
    else:
        opened = await open_store(request.param, str(tmp_path / "state"))
    yield opened
    await opened.close()


# A chat turn's conversation, quotes and newlines included (it travels as JSON).
CHAT = ChatRecord(
    (ChatMessage("system", 'be "brief"'), ChatMessage("user", "hi\nthere")),
    '<|im_start|>system\nbe "brief"<|im_end|>\n<|im_start|>user\nhi\nthere<|im_end|>\n',
)


def a_turn(turn_id: str = "t1", start: int = 3, finish: FinishReason | None = None) -> TurnRecord:
    return TurnRecord(
        turn_id,
        start,
        2,
        SamplingParams(
            temperature=0.7,
            top_k=5,
            seed=2**63 + 5,
            max_new_tokens=9,
            stop_token_ids=(2,),
            stop=("x y",),
            logprobs=3,
        ),
        Speculation(k=3, adaptive=True, drafter=DrafterKind.NGRAM, branches=0),
        finish,
        chat=CHAT,
    )


async def test_a_session_and_its_turn_come_back_as_stored(store: SessionStore) -> None:
    record = SessionRecord("s1", "alice", ephemeral=False, tokens=[1, 2, 3])
    await store.create(record)
    async with store.lock("s1") as fence:
        await store.append(fence, 3, [70, 71], a_turn())
        await store.append(fence, 5, [5, 6, 7], None)
    loaded = await store.load("s1")
    assert loaded is not None
    assert loaded.tokens == [1, 2, 3, 70, 71, 5, 6, 7] and loaded.owner == "alice"
    # The seed beyond 2^63, the stop strings, the drafter, logprobs, the chat.
    assert loaded.turn == a_turn()
    assert loaded.turn.prompt_end == 5
    assert await store.load("nope") is None
    assert await store.count() == 1


async def test_an_append_must_extend_the_committed_length(store: SessionStore) -> None:
    await store.create(SessionRecord("s1", "", ephemeral=False, tokens=[1, 2]))
    async with store.lock("s1") as fence:
        with pytest.raises(FailedPrecondition, match="length 1 found 2"):
            await store.append(fence, 1, [9], None)
        await store.append(fence, 2, [9], None)
    loaded = await store.load("s1")
    assert loaded is not None and loaded.tokens == [1, 2, 9]


async def test_one_turn_at_a_time_and_a_released_fence_writes_nothing(
    store: SessionStore,
) -> None:
    await store.create(SessionRecord("s1", "", ephemeral=False))
    async with store.lock("s1") as first:
        assert await store.locked("s1")
        with pytest.raises(FailedPrecondition, match="already generating"):
            async with store.lock("s1"):
                pass
    assert not await store.locked("s1")
    with pytest.raises(FailedPrecondition):
        await store.append(first, 0, [4], None)

    async def second_turn() -> list[int]:
        async with store.lock("s1", wait_s=5) as fence:
            await store.append(fence, 1, [8], None)
            return [8]

    async with store.lock("s1") as fence:
        waiting = asyncio.create_task(second_turn())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # it waits for the lock
        await store.append(fence, 0, [4], None)
    assert await waiting == [8]
    loaded = await store.load("s1")
    assert loaded is not None and loaded.tokens == [4, 8]


async def test_truncate_drops_a_turn_that_produced_nothing(store: SessionStore) -> None:
    await store.create(SessionRecord("s1", "", ephemeral=False, tokens=[1, 2, 3]))
    async with store.lock("s1") as fence:
        await store.append(fence, 3, [40, 41], a_turn())
        await store.truncate(fence, 3)
    loaded = await store.load("s1")
    assert loaded is not None and loaded.tokens == [1, 2, 3] and loaded.turn is None


async def test_a_rolled_back_turn_leaves_the_one_before_it_the_latest(
    store: SessionStore,
) -> None:
    # A turn that produced nothing never happened: a chat goes on from the turn before.
    table = SessionTable(store, max_sessions=10, ttl_s=60)
    created = await table.create("alice")
    async with table.turn(created) as session:
        await session.begin_turn([5, 6], a_turn("t1", start=0))
        await session.commit([7])
        await session.finish_turn(FinishReason.LENGTH, "o1", "")
    async with table.turn(created) as session:
        await session.begin_turn([8], a_turn("t2", start=3))
        await session.rollback(3)
        assert session.turn is not None and session.turn.turn_id == "t1"
    loaded = await store.load(created.session_id)
    assert loaded is not None and loaded.tokens == [5, 6, 7]
    assert loaded.turn == a_turn("t1", start=0, finish=FinishReason.LENGTH)


async def test_update_writes_the_fields_but_never_the_tokens(store: SessionStore) -> None:
    await store.create(SessionRecord("s1", "bob", ephemeral=True, tokens=[1]))
    record = await store.load("s1")
    assert record is not None
    async with store.lock("s1") as fence:
        await store.append(fence, 1, [2, 3], None)
    record.turns, record.oracle_id, record.draft_id = 4, "o", "d"
    record.last_used_unix_ms += 1000
    record.turn = a_turn(finish=FinishReason.EOS)
    await store.update(record)  # its stale token list is not written
    loaded = await store.load("s1")
    assert loaded is not None
    assert (loaded.turns, loaded.oracle_id, loaded.draft_id) == (4, "o", "d")
    assert loaded.tokens == [1, 2, 3] and loaded.ephemeral and loaded.turn == record.turn
    assert loaded.last_used_unix_ms == record.last_used_unix_ms
    # A session deleted meanwhile (closed on another replica) stays deleted.
    assert await store.delete("s1")
    await store.update(record)
    assert await store.load("s1") is None and await store.count() == 0
    assert not await store.delete("s1")


async def test_idle_and_known_sessions(store: SessionStore) -> None:
    old = SessionRecord("old", "", ephemeral=False, last_used_unix_ms=1_000)
    new = SessionRecord("new", "", ephemeral=False, last_used_unix_ms=5_000)
    await store.create(old)
    await store.create(new)
    assert await store.idle(2_000) == ["old"]
    assert await store.known(["old", "gone", "new"]) == {"old", "new"}
    assert await store.known([]) == set()
    many = [f"x{i}" for i in range(1200)]  # beyond SQLite's parameters per statement
    assert await store.known([*many, "new"]) == {"new"}


async def test_an_unknown_store_is_refused_with_the_choices() -> None:
    with pytest.raises(InvalidArgument, match="sqlite, memory or redis://"):
        await open_store("postgres://x")


async def test_an_unreachable_redis_is_unavailable() -> None:
    from specdec.launch import free_port

    with pytest.raises(Unavailable, match="unreachable"):
        await open_store(f"redis://:secret@127.0.0.1:{free_port()}/0")
    store = RedisStore(f"redis://:secret@127.0.0.1:{free_port()}/0")
    assert "secret" not in store.url  # logged and put in errors
    await store.close()


async def test_sqlite_one_gateway_per_state_directory(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path)
    with pytest.raises(FailedPrecondition, match="another gateway uses"):
        SqliteStore(tmp_path)
    await first.close()
    second = SqliteStore(tmp_path)  # the directory is free again
    await second.close()


_WRITER = textwrap.dedent(
    """
    import asyncio, os, sys
    from gateway.store.base import SessionRecord
    from gateway.store.sqlite import SqliteStore

    async def main():
        store = SqliteStore(sys.argv[1])
        await store.create(SessionRecord("s1", "alice", ephemeral=False, tokens=[1, 2]))
        async with store.lock("s1") as fence:
            for i in range(50):
                await store.append(fence, 2 + i, [100 + i], None)
            print("written", flush=True)
            await asyncio.sleep(60)  # killed here, holding the database and the lock

    asyncio.run(main())
    """
)


async def test_sqlite_commits_survive_a_sigkill_of_the_writer(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"written"
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    store = SqliteStore(tmp_path)  # the dead writer's flock is gone with it
    loaded = await store.load("s1")
    await store.close()
    assert loaded is not None
    assert loaded.tokens == [1, 2, *range(100, 150)]


async def test_redis_lock_of_a_dead_replica_expires_and_its_writes_are_fenced(
    redis_url: str,
) -> None:
    a, b = RedisStore(redis_url, lock_ttl_s=0.5), RedisStore(redis_url, lock_ttl_s=0.5)
    try:
        await a._redis.flushdb()
        await a.create(SessionRecord("s1", "", ephemeral=False))
        # A dead replica's lock: set, never renewed nor released.
        await a._redis.set("specdec:s1:lock", "dead-replica", px=500)
        async with b.lock("s1", wait_s=5) as fence:  # waits for the expiry
            await b.append(fence, 0, [1], None)
            await asyncio.sleep(1.0)  # past the TTL: renewed while held
            assert await a.locked("s1")
        # A replica whose lock was taken over cannot write past its successor.
        async with a.lock("s1") as stale_fence:
            await a._redis.set("specdec:s1:lock", "successor")
            with pytest.raises(FailedPrecondition, match="lock expired"):
                await a.append(stale_fence, 1, [2], None)
        loaded = await b.load("s1")
        assert loaded is not None and loaded.tokens == [1]
        assert await b._redis.get("specdec:s1:lock") == b"successor"  # not released by a
    finally:
        await a.close()
        await b.close()
