"""Registrations (``gateway.registry`` with ``gateway.identity``): who may take a worker id;
what a turn sees of an oracle that leaves while the gateway is asking it something."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from gateway.identity import WorkerIdentity
from gateway.registry import MAX_WORKER_ID_CHARS, Registry
from specdec.core.errors import AlreadyExists, InvalidArgument, PermissionDenied
from specdec.core.messages import WorkerKind, WorkerRegistration
from specdec.v1 import oracle_pb2, oracle_pb2_grpc

ORACLE = WorkerRegistration("o1", WorkerKind.ORACLE, address="127.0.0.1:9")
DRAFT = WorkerRegistration("d1", WorkerKind.DRAFT)
SHARED = WorkerIdentity()  # the shared worker token, no certificate
EDGE1 = WorkerIdentity(device="edge1", peer="edge1.example")


async def test_a_live_workers_id_is_not_taken_without_proof() -> None:
    registry = Registry()
    live = await registry.register(ORACLE, SHARED)
    for newcomer in (SHARED, WorkerIdentity(peer="other")):
        with pytest.raises(AlreadyExists, match="belongs to a live worker"):
            await registry.register(ORACLE, newcomer)
    assert registry.get("o1") is live and live.alive and not live.dismissed.is_set()
    await registry.unregister(live)  # its stream is gone: the id is free
    assert (await registry.register(ORACLE, SHARED)) is registry.get("o1")


async def test_the_same_worker_replaces_its_old_stream() -> None:
    registry = Registry()
    old = await registry.register(DRAFT, EDGE1)
    new = await registry.register(DRAFT, EDGE1)
    assert registry.get("d1") is new
    assert old.dismissed.is_set() and not old.alive and "registered again" in old.dismissal
    with pytest.raises(AlreadyExists):
        await registry.register(DRAFT, WorkerIdentity(device="edge1"))  # not the same peer


async def test_a_device_token_registers_drafts_only() -> None:
    registry = Registry()
    with pytest.raises(PermissionDenied, match="registers drafts only"):
        await registry.register(ORACLE, WorkerIdentity(device="edge1"))
    assert registry.workers() == []


async def test_oracles_get_a_commit_key_and_drafts_none() -> None:
    registry = Registry()
    oracle, draft = await registry.register(ORACLE), await registry.register(DRAFT)
    assert oracle.commit_key is not None and draft.commit_key is None
    derived = Registry(commit_secret="0123456789abcdef-grant-secret")
    first = await derived.register(ORACLE)
    await derived.unregister(first)
    again = await derived.register(ORACLE)
    assert first.commit_key == again.commit_key  # what every replica derives


async def test_worker_ids_are_bounded() -> None:
    long = WorkerRegistration("w" * (MAX_WORKER_ID_CHARS + 1), WorkerKind.DRAFT)
    with pytest.raises(InvalidArgument, match=f"1 to {MAX_WORKER_ID_CHARS} characters"):
        await Registry().register(long)


class _HangingOracle(oracle_pb2_grpc.OracleServicer):  # type: ignore[misc]
    """Answers GetInfo only when told to (the oracle is slow to answer)."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def GetInfo(self, request: Any, context: Any) -> oracle_pb2.GetInfoResponse:
        self.asked.set()
        await self.answer.wait()
        return oracle_pb2.GetInfoResponse()


async def test_an_oracle_leaving_mid_question_is_unreachable_not_a_cancelled_turn() -> None:
    """Regression: the gateway asked an oracle whether it was reachable (a draft had
    reported it broken) just as its stream ended. Unregistering closed the channel, grpc
    raised the cancelled GetInfo as CancelledError in the turn, and the client's stream
    was left without a status until its deadline."""
    oracle = _HangingOracle()
    server = grpc.aio.server()
    oracle_pb2_grpc.add_OracleServicer_to_server(oracle, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        registry = Registry()
        info = WorkerRegistration("o1", WorkerKind.ORACLE, address=f"127.0.0.1:{port}")
        worker = await registry.register(info)
        oracle.answer.set()
        assert await worker.reachable()
        oracle.answer.clear()
        turn = asyncio.create_task(worker.reachable(timeout_s=30))
        await asyncio.wait_for(oracle.asked.wait(), 10)
        oracle.asked.clear()
        await registry.unregister(worker)  # its stream ended: the channel closes
        assert await asyncio.wait_for(turn, 10) is False
        assert not turn.cancelled()
        assert await worker.reachable() is False  # gone: not asked at all
        assert not oracle.asked.is_set()
    finally:
        oracle.answer.set()
        await server.stop(None)
