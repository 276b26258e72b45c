"""Worker identity: a live worker's id cannot be taken over; each edge device has its own
token, which registers drafts only.

Real gateway, oracle and draft processes over mutual TLS, with a shared worker token
for the oracle and per-device tokens for the edge (``--worker-tokens``) on the gateway
and the oracle. The intruders are registrations made here over real sockets, each with
a certificate from the test CA (tests/pki.py) and a token it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from specdec.client import Client
from specdec.core.messages import WorkerKind, WorkerRegistration
from specdec.launch import Cluster, cluster
from specdec.rpc import convert
from specdec.rpc.channels import open_channel
from specdec.rpc.security import ChannelSecurity, gateway_auth
from specdec.v1 import registry_pb2, registry_pb2_grpc
from tests.cluster_tools import reference
from tests.pki import Pki

APP, WORKER, EDGE1, EDGE2 = "app-t0ken", "w0rker-t0ken", "edge1-t0ken", "edge2-t0ken"
DEVICES = f"edge1:{EDGE1},edge2:{EDGE2}"
ORACLE_NAME = "oracle.specdec.internal"
ORACLE_ID, DRAFT_ID = "oracle-w", "draft-edge1"
PROMPT = [1, 5, 9, 12]


@dataclass
class Rig:
    cluster: Cluster
    pki: Pki
    oracle_path: Path
    certs: dict[str, tuple[Path, Path]]

    def client(self) -> Client:
        cert, key = self.certs["app"]
        return Client.tls(
            self.cluster.address, ca=self.pki.ca_path, cert=cert, key=key, token=APP, timeout=60
        )

    def security(self, cert: str, token: str) -> ChannelSecurity:
        crt, key = self.certs[cert]
        return ChannelSecurity.from_settings(
            tls_ca=str(self.pki.ca_path), tls_cert=str(crt), tls_key=str(key), token=token
        )

    def workers(self) -> dict[str, Any]:
        with self.client() as client:
            return {w.worker_id: w for w in client.list_workers()}


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[Rig]:
    oracle_path = model_dir("llama", "oracle")
    pki = Pki(tmp_path_factory.mktemp("pki"))
    certs = {
        # The draft's --tls-server-name names both services it dials.
        "gateway": pki.add("gateway", ["127.0.0.1", "localhost", ORACLE_NAME]),
        "oracle": pki.add("oracle", [ORACLE_NAME]),
        **{name: pki.add(name, server=False) for name in ("app", "edge1", "edge2", "other")},
    }
    ca = str(pki.ca_path)

    def tls(name: str) -> list[str]:
        return ["--tls-ca", ca, "--tls-cert", str(certs[name][0]), "--tls-key", str(certs[name][1])]

    with cluster(tmp_path_factory.mktemp("identity")) as c:
        c.start_gateway(
            "--tokenizer", str(oracle_path),
            *tls("gateway"), "--tls-server-name", ORACLE_NAME, "--auth-token", APP,
            "--worker-token", WORKER, "--worker-tokens", DEVICES,
        )  # fmt: skip
        c.start_oracle(
            oracle_path, *tls("oracle"), "--auth-token", WORKER, "--worker-tokens", DEVICES,
            oracle_id=ORACLE_ID,
        )  # fmt: skip
        # A real edge device: its own certificate and its own token, to gateway and oracle.
        c.start_draft(
            model_dir("llama", "close_draft"), *tls("edge1"), "--tls-server-name", ORACLE_NAME,
            "--auth-token", EDGE1, draft_id=DRAFT_ID,
        )  # fmt: skip
        built = Rig(c, pki, oracle_path, certs)
        deadline = time.monotonic() + 300
        while not {ORACLE_ID, DRAFT_ID} <= set(_listed(built)):
            assert time.monotonic() < deadline, "\n".join(s.log()[-2000:] for s in c.services)
            assert all(s.alive() for s in c.services), "\n".join(
                s.log()[-2000:] for s in c.services
            )
            time.sleep(0.2)
        yield built


def _listed(rig: Rig) -> set[str]:
    with contextlib.suppress(grpc.RpcError):
        return set(rig.workers())
    return set()


class Intruder:
    """One registration over the real Connect stream, kept open until ``close``."""

    def __init__(self, rig: Rig, cert: str, token: str, registration: WorkerRegistration) -> None:
        self._channel = open_channel(rig.cluster.address, rig.security(cert, token))
        self._registration = registration
        self._stop = asyncio.Event()
        stub = registry_pb2_grpc.WorkerRegistryStub(self._channel)
        self._call = stub.Connect(self._requests())

    async def _requests(self) -> AsyncIterator[registry_pb2.ConnectRequest]:
        await asyncio.sleep(0.3)  # after the verdict on the headers: grpc/grpc#36066
        yield convert.worker_message_to_pb(self._registration)
        await self._stop.wait()

    async def answer(self) -> grpc.StatusCode:
        """OK once registered, else the status the gateway refused it with."""
        try:
            async for _ in self._call:
                return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def end(self, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
        """How the gateway ended the stream (status and details)."""
        try:
            async for _ in self._call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    async def close(self) -> None:
        self._stop.set()
        self._call.cancel()
        await self._channel.close()


def _oracle(worker_id: str, address: str, fingerprint: str = "") -> WorkerRegistration:
    return WorkerRegistration(
        worker_id, WorkerKind.ORACLE, vocab_fingerprint=fingerprint, address=address, vocab_size=96
    )


def _draft(worker_id: str) -> WorkerRegistration:
    return WorkerRegistration(worker_id, WorkerKind.DRAFT, vocab_size=96)


async def test_a_registration_under_a_live_oracles_id_is_refused(rig: Rig) -> None:
    """The attack of issue 23: an oracle named like a live one, pointing at a dead address,
    with the shared worker token; it must neither take the id nor evict the real one."""
    live = rig.workers()[ORACLE_ID]
    impostor = Intruder(
        rig, "other", WORKER, _oracle(ORACLE_ID, "127.0.0.1:1", live.vocab_fingerprint)
    )
    try:
        assert await impostor.answer() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        await impostor.close()
    workers = rig.workers()
    assert workers[ORACLE_ID].address != "127.0.0.1:1"
    assert workers[ORACLE_ID].uptime_s >= live.uptime_s  # the same registration, never replaced
    with rig.client() as client:
        result = client.generate(PROMPT, max_new_tokens=8, k=4, ignore_eos=True)
    assert result.token_ids == reference(rig.oracle_path, PROMPT, 8)
    assert (result.stats.oracle_id, result.stats.draft_id) == (ORACLE_ID, DRAFT_ID)


async def test_a_stolen_device_cannot_take_another_devices_id_or_register_an_oracle(
    rig: Rig,
) -> None:
    for cert, token, registration, refused in [
        ("edge2", EDGE2, _draft(DRAFT_ID), grpc.StatusCode.ALREADY_EXISTS),  # another device
        ("edge1", WORKER, _draft(DRAFT_ID), grpc.StatusCode.ALREADY_EXISTS),  # no device token
        ("edge2", EDGE2, _oracle("oracle-edge2", "127.0.0.1:1"), grpc.StatusCode.PERMISSION_DENIED),
        ("edge2", "revoked-t0ken", _draft("draft-edge2"), grpc.StatusCode.UNAUTHENTICATED),
    ]:
        intruder = Intruder(rig, cert, token, registration)
        try:
            assert await intruder.answer() == refused, (cert, token, registration)
        finally:
            await intruder.close()
    assert set(rig.workers()) == {ORACLE_ID, DRAFT_ID}


async def test_the_same_worker_reconnecting_replaces_its_old_stream(rig: Rig) -> None:
    """Proving the same device and certificate is the same worker: the new stream takes
    the id, and the old one is ended, not left open and unregistered."""
    first = Intruder(rig, "edge2", EDGE2, _draft("draft-edge2"))
    streams = [first]
    try:
        assert await first.answer() == grpc.StatusCode.OK
        assert "draft-edge2" in rig.workers()
        # Opened only now: two streams opened together may register in either order.
        second = Intruder(rig, "edge2", EDGE2, _draft("draft-edge2"))
        streams.append(second)
        assert await second.answer() == grpc.StatusCode.OK
        code, details = await asyncio.wait_for(first.end(), 10)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "registered again" in details
        assert "draft-edge2" in rig.workers()
    finally:
        for stream in streams:
            await stream.close()


def test_revoking_one_device_leaves_the_others() -> None:
    """Revocation: the device's entry leaves --worker-tokens (gateway and oracles, then a
    restart); every other token keeps working."""
    before = gateway_auth(APP, "", WORKER, DEVICES)
    after = gateway_auth(APP, "", WORKER, f"edge2:{EDGE2}")
    assert before is not None and after is not None
    table_before = before._protected["specdec.v1.WorkerRegistry"]
    table_after = after._protected["specdec.v1.WorkerRegistry"]
    assert table_before.principal_of(EDGE1) == "edge1"
    assert table_after.principal_of(EDGE1) is None
    for token, principal in ((EDGE2, "edge2"), (WORKER, "worker")):
        assert table_before.principal_of(token) == table_after.principal_of(token) == principal
