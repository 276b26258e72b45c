"""Overload: admission limits answer RESOURCE_EXHAUSTED at once, the KV budget evicts
instead of crashing, and a 30 s soak of 64 clients keeps every answer exact.

One cluster for the module: a gateway holding at most GATEWAY_SESSIONS sessions,
one oracle serving at most ORACLE_STREAMS verify streams with a KV budget of a
few sessions (KV_BUDGET_MB), one draft drafting at most DRAFT_TURNS turns. The
oracle sits behind a fault proxy (tests/fault_proxy.py) whose delay makes turns
overlap when the test needs them to.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from specdec.client import AsyncClient, Client
from specdec.launch import Cluster, cluster, free_port
from tests.cluster_tools import list_workers, oracle_info, quiescent, reference, rss_bytes
from tests.fault_proxy import FaultProxy

GATEWAY_SESSIONS = 48
ORACLE_STREAMS = 8
DRAFT_TURNS = 2
KV_BUDGET_MB = 0.02  # 20 KiB: about two idle sessions of the tiny llama (256 B per token)
PROMPTS = [[1, 5, 9, 12], [1, 30, 31, 32, 33, 34], [1, 7], [1, 20, 21, 22, 40, 41, 42]]
SOAK_S = 30.0
SOAK_CLIENTS = 64
RSS_GROWTH_LIMIT = 64 * 1024 * 1024  # bytes a service may grow by over the soak


@dataclass
class Rig:
    cluster: Cluster
    oracle_path: Path
    oracle_port: int
    proxy: FaultProxy

    @property
    def address(self) -> str:
        return self.cluster.address


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[Rig]:
    oracle_path = model_dir("llama", "oracle")
    port = free_port()
    proxy = FaultProxy("127.0.0.1", port)
    with cluster(tmp_path_factory.mktemp("overload")) as c:
        c.start_gateway("--tokenizer", str(oracle_path), "--max-sessions", str(GATEWAY_SESSIONS))
        c.start_oracle(
            oracle_path,
            "--advertise-address", proxy.address,
            "--max-sessions", str(ORACLE_STREAMS),
            "--kv-budget-mb", str(KV_BUDGET_MB),
            oracle_id="oracle-a", port=port,
        )  # fmt: skip
        c.start_draft(
            model_dir("llama", "close_draft"), "--max-sessions", str(DRAFT_TURNS), draft_id="d"
        )
        try:
            c.wait_workers(oracles=1, drafts=1)
            yield Rig(c, oracle_path, port, proxy)
        finally:
            for service in c.services:
                service.kill()  # a graceful stop waits out streams' grace periods
            proxy.close()


def test_a_flood_beyond_capacity_is_refused_at_once_and_the_admitted_are_exact(
    rig: Rig,
) -> None:
    """3x the oracle's stream limit at once: the excess gets RESOURCE_EXHAUSTED while the
    admitted turns are still running (no queueing, no hang); the admitted are exact."""
    quiescent(rig.address)
    rig.proxy.delay_s = 0.02  # admitted turns last a second or more
    flood = 3 * ORACLE_STREAMS
    outcomes: dict[int, tuple[float, object]] = {}
    start = threading.Barrier(flood)

    def one(i: int) -> None:
        prompt = [*PROMPTS[i % len(PROMPTS)], 50 + i]
        with Client(rig.address, timeout=120) as client:
            start.wait()
            try:
                result = client.generate(
                    prompt, max_new_tokens=40, k=[0, 4][i % 2], ignore_eos=True
                )
                outcome: object = (prompt, result.token_ids)
            except grpc.RpcError as exc:
                outcome = exc
        outcomes[i] = (time.monotonic(), outcome)

    peak: Counter[str] = Counter()  # the most sessions each worker held at once
    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(flood)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            for worker_id, worker in list_workers(rig.address).items():
                peak[worker_id] = max(peak[worker_id], worker.active_sessions)
            own = oracle_info(rig.oracle_port).active_sessions  # the oracle's own count
            peak["oracle streams"] = max(peak["oracle streams"], own)
            time.sleep(0.05)
        for thread in threads:
            thread.join(180)
    finally:
        rig.proxy.delay_s = 0.0
    assert len(outcomes) == flood
    admitted = {i: o for i, (_, o) in outcomes.items() if isinstance(o, tuple)}
    refused = {i: o for i, (_, o) in outcomes.items() if isinstance(o, grpc.RpcError)}
    assert len(admitted) + len(refused) == flood
    print(f"flood of {flood}: {len(admitted)} admitted, {len(refused)} refused; peaks {peak}")
    # No worker ever held more than its limit (a busy draft means oracle-only turns).
    assert peak["d"] <= DRAFT_TURNS
    assert peak["oracle-a"] <= ORACLE_STREAMS and peak["oracle streams"] <= ORACLE_STREAMS
    assert 1 <= len(admitted) <= ORACLE_STREAMS, len(admitted)
    for error in refused.values():
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "limit" in error.details() and "retry" in error.details(), error.details()
    # Refusals come back before the first admitted turn has even finished: nothing waits.
    first_done = min(outcomes[i][0] for i in admitted)
    assert all(outcomes[i][0] < first_done for i in refused)
    for prompt, tokens in admitted.values():
        assert tokens == reference(rig.oracle_path, prompt, 40)


def test_the_gateway_session_table_is_bounded(rig: Rig) -> None:
    with Client(rig.address, timeout=10) as client:
        created = []
        with pytest.raises(grpc.RpcError) as error:
            for _ in range(GATEWAY_SESSIONS + 1):
                created.append(client.create_session())
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum" in error.value.details()
        assert len(created) <= GATEWAY_SESSIONS
        for session in created:
            client.close_session(session)
        client.close_session(client.create_session())  # room again


def test_kv_budget_evicts_idle_sessions_which_continue_exactly_later(rig: Rig) -> None:
    """Many sessions against a budget of about two: idle ones are evicted (never an OOM),
    and each one's next turn re-prefills its context and is exactly the oracle alone's."""
    quiescent(rig.address)
    follow_up = [40, 41, 42]
    with Client(rig.address, timeout=60) as client:
        sessions = []
        for i in range(10):
            prompt = [*PROMPTS[i % len(PROMPTS)], 60 + i]
            session = client.create_session()
            first = client.generate(prompt, session_id=session, max_new_tokens=24, k=4)
            sessions.append((session, prompt + first.token_ids))
        info = oracle_info(rig.oracle_port)
        assert info.kv_cache_bytes <= info.kv_cache_budget_bytes
        assert info.cached_sessions < len(sessions)  # the budget forced evictions
        reprefilled = 0
        for session, context in sessions:
            second = client.generate(
                follow_up, session_id=session, max_new_tokens=16, k=4, ignore_eos=True
            )
            assert second.token_ids == reference(rig.oracle_path, context + follow_up, 16)
            reprefilled += second.stats.cached_tokens == 0
            client.close_session(session)
    assert reprefilled >= len(sessions) // 2
    assert all(service.alive() for service in rig.cluster.services)


@pytest.mark.slow
def test_soak_64_clients_for_30_seconds(rig: Rig) -> None:
    """64 clients for exactly 30 s of load: one-off turns and two-turn sessions, greedy,
    k in {0, 2, 4, n-gram}. Only RESOURCE_EXHAUSTED may fail; every completed output is
    the oracle alone's; the services' memory stays bounded; all is idle afterwards."""
    quiescent(rig.address)
    follow_up = [44, 45]
    firsts = {tuple(p): reference(rig.oracle_path, p, 16) for p in PROMPTS}
    seconds = {
        p: reference(rig.oracle_path, [*p, *first, *follow_up], 12) for p, first in firsts.items()
    }
    services = {s.name + str(s.process.pid): s.process.pid for s in rig.cluster.services}

    async def warm_up() -> None:
        async with AsyncClient(rig.address, timeout=60) as client:
            for prompt in PROMPTS:
                await client.generate(prompt, max_new_tokens=16, k=4, ignore_eos=True)

    asyncio.run(warm_up())
    rss_before = {name: rss_bytes(pid) for name, pid in services.items()}
    tally: Counter[str] = Counter()
    wrong: list[str] = []
    errors: list[str] = []

    async def client_loop(index: int, deadline: float) -> None:
        rng = random.Random(index)
        async with AsyncClient(rig.address, timeout=60) as client:
            for _ in range(100_000):  # bounded; the deadline ends it first
                if time.monotonic() >= deadline:
                    return
                prompt = PROMPTS[rng.randrange(len(PROMPTS))]
                k, drafter = rng.choice([(0, None), (2, None), (4, None), (4, "ngram")])
                try:
                    if index % 4 == 0:  # a two-turn session
                        session = await client.create_session()
                        try:
                            first = await client.generate(
                                prompt, session_id=session, max_new_tokens=16, k=k,
                                drafter=drafter, ignore_eos=True,
                            )  # fmt: skip
                            second = await client.generate(
                                follow_up, session_id=session, max_new_tokens=12, k=k,
                                drafter=drafter, ignore_eos=True,
                            )  # fmt: skip
                        finally:
                            await client.close_session(session)
                        ok = (first.token_ids, second.token_ids) == (
                            firsts[tuple(prompt)],
                            seconds[tuple(prompt)],
                        )
                    else:
                        result = await client.generate(
                            prompt, max_new_tokens=16, k=k, drafter=drafter, ignore_eos=True
                        )
                        ok = result.token_ids == firsts[tuple(prompt)]
                    tally["completed"] += 1
                    if not ok:
                        wrong.append(f"client {index}: {prompt} k={k} {drafter}")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        tally["refused"] += 1
                        await asyncio.sleep(rng.uniform(0.05, 0.3))  # "retry later"
                    else:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                        await asyncio.sleep(0.1)

    async def soak() -> None:
        deadline = time.monotonic() + SOAK_S
        await asyncio.gather(*(client_loop(i, deadline) for i in range(SOAK_CLIENTS)))

    asyncio.run(soak())
    print(f"soak: {dict(tally)}, {len(errors)} errors, {len(wrong)} wrong outputs")
    assert not errors, errors[:10]
    assert not wrong, wrong[:10]
    assert tally["completed"] >= SOAK_CLIENTS  # real work got done, not only refusals
    assert all(service.alive() for service in rig.cluster.services)
    workers = quiescent(rig.address)  # every stream ended
    assert all(w.active_sessions == 0 for w in workers.values())
    info = oracle_info(rig.oracle_port)
    assert info.active_sessions == 0
    assert info.kv_cache_bytes <= info.kv_cache_budget_bytes
    rss_after = {name: rss_bytes(pid) for name, pid in services.items()}
    growth = {name: rss_after[name] - rss_before[name] for name in services}
    print("rss growth (MiB):", {name: round(g / 2**20, 1) for name, g in growth.items()})
    assert all(g < RSS_GROWTH_LIMIT for g in growth.values()), growth
    assert set(list_workers(rig.address)) == {"oracle-a", "d"}
