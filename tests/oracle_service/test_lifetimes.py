"""Session lifetimes: opens prefill in a lane, closes evict over the budget, releases free.

``oracle_service.lifetimes.Lifetimes`` with the real oracle (tiny llama), store and
lanes; a gate job holds the one lane where a test needs two calls to overlap.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest

from oracle_service.lanes import Lanes
from oracle_service.lifetimes import Lifetimes
from oracle_service.sessions import SessionStore
from specdec.core.errors import FailedPrecondition
from specdec.core.sampling import SamplingParams
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle

PROMPT = [1, 5, 17, 33, 60, 8]
GREEDY = SamplingParams()


class Rig:
    def __init__(self, model: LoadedModel, budget_bytes: int) -> None:
        oracle = Oracle(model)
        self.store = SessionStore(
            oracle.new_cache,
            budget_bytes=budget_bytes,
            max_cached_sessions=16,
            max_active_streams=4,
        )
        self.lanes = Lanes(1, lambda lane: None, self.store, lambda: None)
        self.lifetimes = Lifetimes(oracle, self.store, self.lanes, "o", rescue=False)

    async def drained(self) -> None:
        """Once every job submitted to the lane so far has run."""
        await self.lanes.run(lambda: None)


@pytest.fixture
def make_rig(loaded: Callable[[str, str], LoadedModel]) -> Iterator[Callable[[int], Rig]]:
    rigs: list[Rig] = []

    def make(budget_bytes: int) -> Rig:
        rigs.append(Rig(loaded("llama", "oracle"), budget_bytes))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.lanes.shutdown()


async def test_the_next_turn_reuses_the_cached_prefix(make_rig: Callable[[int], Rig]) -> None:
    rig = make_rig(64 << 20)
    lease, first = await rig.lifetimes.open("a", PROMPT, GREEDY, 3, allow_rescue=True)
    assert (first.cached_tokens, first.computed_tokens, first.oracle_id) == (0, 5, "o")
    assert lease.session.committed == PROMPT and lease.session.seed == 3
    assert not lease.rescue  # this oracle has no rescue draft
    rig.lifetimes.close(lease)
    longer = [*PROMPT, 40, 41]
    lease, second = await rig.lifetimes.open("a", longer, GREEDY, 3, allow_rescue=False)
    assert (second.cached_tokens, second.computed_tokens) == (5, 2)
    assert lease.opened_length == len(longer) and rig.store.active_streams == 1


async def test_a_closed_session_over_the_budget_is_evicted(make_rig: Callable[[int], Rig]) -> None:
    rig = make_rig(0)  # no idle session fits
    lease, _ = await rig.lifetimes.open("a", PROMPT, GREEDY, 0, allow_rescue=False)
    assert rig.store.get("a") is not None  # an open stream is never evicted
    rig.lifetimes.close(lease)
    await rig.drained()
    assert rig.store.get("a") is None and rig.store.counters.evictions == 1
    assert rig.store.kv_cache_bytes == 0


async def test_an_open_superseded_before_its_prefill_fails_and_frees_its_slot(
    make_rig: Callable[[int], Rig],
) -> None:
    rig = make_rig(64 << 20)
    gate = threading.Event()
    held = asyncio.ensure_future(rig.lanes.run(lambda: gate.wait(30)))
    first = asyncio.ensure_future(rig.lifetimes.open("a", PROMPT, GREEDY, 0, allow_rescue=False))
    await asyncio.sleep(0)  # its lease is taken; its prefill waits for the lane
    second = asyncio.ensure_future(
        rig.lifetimes.open("a", [*PROMPT, 9], GREEDY, 0, allow_rescue=False)
    )
    await asyncio.sleep(0)
    gate.set()
    await held
    with pytest.raises(FailedPrecondition, match="reopened by a newer verify stream"):
        await first
    lease, opened = await second
    assert opened.computed_tokens == len(PROMPT)
    assert rig.store.active_streams == 1 and lease.session.committed == [*PROMPT, 9]


async def test_release_frees_the_cache_and_makes_an_open_stream_stale(
    make_rig: Callable[[int], Rig],
) -> None:
    rig = make_rig(64 << 20)
    lease, _ = await rig.lifetimes.open("a", PROMPT, GREEDY, 0, allow_rescue=False)
    assert await rig.lifetimes.release("a")
    assert rig.store.get("a") is None and rig.store.kv_cache_bytes == 0
    with pytest.raises(FailedPrecondition, match="released or evicted"):
        rig.store.check(lease)
    assert not await rig.lifetimes.release("a")
    assert not await rig.lifetimes.release("never-seen")
