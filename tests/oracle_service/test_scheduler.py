"""The batch policy on hand-built queues: which blocks form the next batch, and which are stale.

``oracle_service.scheduler.BlockQueue`` and ``known_stale`` with real sessions of a
store (tiny llama caches, never touched here) and real futures; no model runs. The
batch wait and the batcher itself are checked through the engine in
``tests/engine/test_batched_verify.py`` (the order verdicts come back in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from oracle_service.scheduler import BlockQueue, PendingBlock, known_stale
from oracle_service.sessions import Lease, SessionStore
from specdec.core.types import DraftBlock, VerifyResult
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle


@pytest.fixture
def store(loaded: Callable[[str, str], LoadedModel]) -> SessionStore:
    return SessionStore(
        Oracle(loaded("llama", "oracle")).new_cache,
        budget_bytes=1 << 20,
        max_cached_sessions=16,
        max_active_streams=16,
    )


def lease_of(store: SessionStore, session_id: str, committed: list[int]) -> Lease:
    lease = store.admit(session_id)
    lease.session.committed = list(committed)
    return lease


def block(
    lease: Lease,
    base_length: int,
    assumed: tuple[int, ...] = (),
    enqueued_ns: int = 0,
    k: int = 0,
) -> PendingBlock:
    future: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
    return PendingBlock(lease, base_length, DraftBlock((5,) * k), assumed, future, enqueued_ns)


def names(blocks: list[PendingBlock]) -> list[tuple[str, int]]:
    return [(p.session.session_id, p.base_length) for p in blocks]


async def test_one_block_per_session_oldest_first_up_to_max_batch(store: SessionStore) -> None:
    a, b, c = (lease_of(store, name, [1, 2, 3]) for name in "abc")
    queue = BlockQueue(max_batch=2)
    for pending in [block(a, 3), block(a, 4), block(b, 3), block(c, 3), block(b, 4)]:
        queue.put(pending)
    batch, skipped = queue.take()
    # a's second block waits for its first one's batch; the scan stops at two.
    assert names(batch) == [("a", 3), ("b", 3)] and skipped == []
    assert len(queue) == 3
    # What was passed over keeps its order: the next batch starts with a's second block.
    assert names(queue.take()[0]) == [("a", 4), ("c", 3)]
    assert names(queue.take()[0]) == [("b", 4)]
    assert queue.take() == ([], []) and len(queue) == 0


async def test_a_session_that_keeps_sending_does_not_pass_an_older_block(
    store: SessionStore,
) -> None:
    a, b = lease_of(store, "a", [1]), lease_of(store, "b", [1])
    queue = BlockQueue(max_batch=1)  # first come, first served
    for i in range(3):
        queue.put(block(a, 1 + i))
    queue.put(block(b, 1))
    for i in range(3, 6):
        queue.put(block(a, 1 + i))
    order = []
    while batch := queue.take()[0]:
        order += names(batch)
    assert order.index(("b", 1)) == 3  # after a's three older blocks, before any later one


async def test_busy_sessions_and_abandoned_blocks_take_no_place(store: SessionStore) -> None:
    a, b, c = (lease_of(store, name, [1, 2]) for name in "abc")
    queue = BlockQueue(max_batch=8)
    gone = block(c, 2)
    for pending in [block(a, 2), block(b, 2), gone]:
        queue.put(pending)
    gone.future.cancel()  # its caller gave up: dropped
    store.hold(a.session)  # a job of a's (its open, a batch) runs in a lane
    assert queue.sessions_waiting() == 1
    assert names(queue.take()[0]) == [("b", 2)]
    assert len(queue) == 1  # a's block, waiting for its session
    store.hold(a.session, -1)
    assert names(queue.take()[0]) == [("a", 2)]


async def test_a_stale_pipelined_block_gives_its_place_to_its_sessions_next_block(
    store: SessionStore,
) -> None:
    # a's verdict committed 7 (not the 5 its pipelined block assumed): that block is
    # skipped, and a's re-drafted block behind it joins this batch.
    a, b = lease_of(store, "a", [1, 2, 7]), lease_of(store, "b", [1])
    queue = BlockQueue(max_batch=8)
    stale, redrafted, other = block(a, 3, (2, 5)), block(a, 3, (2, 7)), block(b, 1)
    for pending in [stale, redrafted, other]:
        queue.put(pending)
    assert known_stale(stale) and not known_stale(redrafted) and not known_stale(other)
    batch, skipped = queue.take(known_stale)
    assert batch == [redrafted, other] and skipped == [stale]


async def test_prune_drops_only_stale_blocks_at_the_front_of_a_sessions_line(
    store: SessionStore,
) -> None:
    a, b = lease_of(store, "a", [1, 2, 7]), lease_of(store, "b", [1, 2, 7])
    queue = BlockQueue(max_batch=8)
    # a: only blocks drafted for outcomes its verdict did not have; b: one that holds,
    # then one whose assumption is checked only once b's first block has run.
    a1, a2 = block(a, 3, (5,)), block(a, 4, (2, 5, 6))
    b1, b2 = block(b, 3, (7,)), block(b, 4, (7, 9))
    for pending in [a1, b1, a2, b2]:
        queue.put(pending)
    assert queue.prune(known_stale) == [a1, a2]
    assert queue.sessions_waiting() == 1 and queue.waiting(b.session) == [b1, b2]


async def test_a_rescue_block_goes_ahead_of_its_sessions_waiting_blocks(
    store: SessionStore,
) -> None:
    a, b = lease_of(store, "a", [1]), lease_of(store, "b", [1])
    queue = BlockQueue(max_batch=8)
    first_b, later_a = block(b, 1), block(a, 2, (4,), enqueued_ns=10)
    queue.put(first_b)
    queue.put(later_a)
    rescue = block(a, 1)
    queue.put_next(rescue)
    assert queue.waiting(a.session) == [rescue, later_a]
    assert queue.take()[0] == [first_b, rescue]
    queue.restart_clocks({a.session}, now_ns=50)
    assert later_a.enqueued_ns == 50 and first_b.enqueued_ns == 0
    assert [p.future.cancelled() for p in queue.drain()] == [False] and len(queue) == 0


async def test_known_stale_needs_the_exact_length_and_tail(store: SessionStore) -> None:
    a = lease_of(store, "a", [1, 2, 3])
    assert not known_stale(block(a, 3))  # not pipelined: never stale here
    assert not known_stale(block(a, 3, (2, 3)))
    assert known_stale(block(a, 3, (3, 3)))
    assert known_stale(block(a, 2, (2,)))  # the session is past that length
    assert known_stale(block(a, 4, (3,)))  # or not there yet


async def test_a_batch_is_what_one_forward_holds_and_the_rest_runs_next(
    store: SessionStore,
) -> None:
    a, b, c, d = (lease_of(store, name, [1]) for name in "abcd")
    # A forward of at most 12 tokens (rows of k + 1).
    queue = BlockQueue(max_batch=8, fits=lambda sizes: sum(sizes) <= 12)
    for pending in [block(a, 1, k=4), block(b, 1, k=4), block(c, 1, k=4), block(d, 1)]:
        queue.put(pending)
    assert queue.fills_forward()
    # c's 5 tokens would make 15: the batch stops before it (d, younger, does not pass it).
    assert names(queue.take()[0]) == [("a", 1), ("b", 1)]
    assert not queue.fills_forward()
    assert names(queue.take()[0]) == [("c", 1), ("d", 1)]


async def test_the_batch_wait_expects_only_sessions_due_back_in_time(
    store: SessionStore,
) -> None:
    a, b = lease_of(store, "a", [1]), lease_of(store, "b", [1])
    queue = BlockQueue(max_batch=8)
    ms = 1_000_000
    # No history yet: a session answered is expected back at once (the wait as before).
    queue.answered([a.session, b.session], now_ns=0)
    assert queue.late_by(deadline_ns=5 * ms) == 0
    # a comes back 9 ms after its verdict (drafting), b after 1 ms (a round trip).
    queue.put(block(b, 1, enqueued_ns=1 * ms))
    queue.put(block(a, 1, enqueued_ns=9 * ms))
    assert a.session.return_ns == pytest.approx(0.2 * 9 * ms)
    for _ in range(20):  # verified, answered, back: the running means settle
        queue.take()
        queue.answered([a.session, b.session], now_ns=0)
        queue.put(block(b, 1, enqueued_ns=1 * ms))
        queue.put(block(a, 1, enqueued_ns=9 * ms))
    queue.take()
    queue.answered([a.session, b.session], now_ns=100 * ms)
    # Within a wait of 5 ms only b is due; a is still drafting: late.
    assert queue.late_by(deadline_ns=105 * ms) == 1
    assert queue.late_by(deadline_ns=110 * ms) == 0
    # A session with a block already waiting is not late; a closed stream neither.
    queue.put(block(b, 1, enqueued_ns=101 * ms))
    queue.answered([b.session], now_ns=102 * ms)
    assert queue.late_by(deadline_ns=105 * ms) == 1
    a.session.active_streams = 0
    assert queue.late_by(deadline_ns=105 * ms) == 0
