"""A worker's lifeline to the gateway: dial out, register, stay connected, reconnect.

Drafts and oracles both call ``stay_registered_everywhere``: one Connect stream
per gateway replica. ``--gateway`` lists the replicas (``a:50051,b:50051``), or
names a DNS name that resolves to every one of them (a Kubernetes headless
Service, a scaled compose service): it is resolved again every
``RESOLVE_INTERVAL_S``, and each address it gives gets its own stream. Each
stream (``stay_registered``) sends the registration, reports load periodically,
hands every gateway message to ``on_message`` and, when it breaks, reconnects with
capped exponential backoff. Nothing ever dials into the worker. The stream's
edge: the worker sends and receives the core's ``specdec.core.messages``,
converted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

import grpc

from specdec.core.errors import SpecdecError
from specdec.core.messages import (
    AssignmentFailed,
    GatewayMessage,
    Registered,
    WorkerLoad,
    WorkerMessage,
    WorkerRegistration,
)
from specdec.rpc import convert
from specdec.rpc.channels import open_channel
from specdec.rpc.security import ChannelSecurity
from specdec.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0
RESOLVE_INTERVAL_S = 10.0


class GatewayConnection:
    """The current Connect stream; ``send`` queues a message for the gateway."""

    def __init__(self) -> None:
        self._outbox: asyncio.Queue[registry_pb2.ConnectRequest] = asyncio.Queue()
        self.connected = asyncio.Event()

    async def send(self, message: WorkerMessage) -> None:
        await self._outbox.put(convert.worker_message_to_pb(message))

    async def _requests(self, register: WorkerRegistration):  # type: ignore[no-untyped-def]
        yield convert.worker_message_to_pb(register)
        while True:
            yield await self._outbox.get()

    def _drain(self) -> None:
        """Messages queued for a dead stream are dropped: the gateway fails that work over."""
        while not self._outbox.empty():
            self._outbox.get_nowait()


async def stay_registered(
    gateway_address: str,
    register: Callable[[], WorkerRegistration],
    on_message: Callable[[GatewayMessage, GatewayConnection], Awaitable[None]],
    load: Callable[[], WorkerLoad],
    connection: GatewayConnection | None = None,
    on_disconnect: Callable[[GatewayConnection], Awaitable[None]] | None = None,
    security: ChannelSecurity | None = None,
) -> None:
    """Run forever (until cancelled): keep this worker registered at the gateway.

    ``security``: TLS material and worker token for the gateway (None: plaintext).
    """
    connection = connection or GatewayConnection()
    backoff = BACKOFF_INITIAL_S
    failures = 0  # consecutive: only the first is logged at INFO
    while True:
        channel = open_channel(gateway_address, security)
        reporter: asyncio.Task[None] | None = None
        try:
            stub = registry_pb2_grpc.WorkerRegistryStub(channel)
            call = stub.Connect(connection._requests(register()))
            async for pb in call:
                message = await _from_gateway(pb, connection)
                if isinstance(message, Registered):
                    log.info("registered at gateway %s", gateway_address)
                    connection.connected.set()
                    backoff = BACKOFF_INITIAL_S
                    failures = 0
                    interval = max(message.load_interval_ms, 100) / 1000
                    reporter = asyncio.create_task(_report_load(connection, load, interval))
                if message is not None:  # (an oracle takes its commit key from Registered)
                    await on_message(message, connection)
            log.warning("gateway %s closed the worker stream", gateway_address)
        except grpc.aio.AioRpcError as exc:
            refused = exc.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.ALREADY_EXISTS,
            )
            level = logging.WARNING if refused else logging.INFO if failures == 0 else logging.DEBUG
            log.log(level, "gateway %s: %s %s", gateway_address, exc.code().name, exc.details())
            failures += 1
            if refused:
                backoff = BACKOFF_MAX_S  # refused: do not hammer the gateway
        finally:
            connection.connected.clear()
            if reporter is not None:
                reporter.cancel()
            connection._drain()
            with contextlib.suppress(Exception):
                await channel.close()
            if on_disconnect is not None:
                await on_disconnect(connection)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX_S)


async def _from_gateway(
    pb: registry_pb2.ConnectResponse, connection: GatewayConnection
) -> GatewayMessage | None:
    """The gateway's message as a core one; None for one this worker cannot take (an
    assignment it refuses is reported failed, so that its turn fails over at once)."""
    try:
        return convert.gateway_message_from_pb(pb)
    except SpecdecError as exc:
        log.warning("refusing the gateway's %s: %s", pb.WhichOneof("kind"), exc)
        if pb.HasField("assignment"):
            refusal = AssignmentFailed(pb.assignment.assignment_id, exc.status, str(exc))
            await connection.send(refusal)
        return None


async def _report_load(
    connection: GatewayConnection, load: Callable[[], WorkerLoad], interval_s: float
) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await connection.send(load())


def gateway_entries(spec: str) -> list[str]:
    """The comma-separated addresses of ``--gateway``."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


async def resolve_gateways(spec: str) -> dict[str, str]:
    """Every gateway replica to dial: address -> the TLS name its certificate carries
    ("" = the address's own host). A name that resolves to several addresses is dialled
    at each of them; one that resolves to one (or not at all yet) is dialled by name."""
    loop = asyncio.get_running_loop()
    targets: dict[str, str] = {}
    for entry in gateway_entries(spec):
        host, port = _split(entry)
        try:
            ipaddress.ip_address(host)
            targets[entry] = ""
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            infos = []
        # One family (IPv4 when there is any): "localhost" is 127.0.0.1 and ::1, one
        # gateway, and a worker registered twice at one gateway would replace itself.
        v4 = {str(i[4][0]) for i in infos if i[0] == socket.AF_INET}
        ips = sorted(v4 or {str(i[4][0]) for i in infos})
        if len(ips) <= 1:
            targets[entry] = ""
            continue
        for ip in ips:
            targets[f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"] = host
    return targets


async def stay_registered_everywhere(
    spec: str,
    register: Callable[[], WorkerRegistration],
    on_message: Callable[[GatewayMessage, GatewayConnection], Awaitable[None]],
    load: Callable[[], WorkerLoad],
    on_disconnect: Callable[[GatewayConnection], Awaitable[None]] | None = None,
    security: ChannelSecurity | None = None,
) -> None:
    """Run forever (until cancelled): one ``stay_registered`` per gateway replica of
    ``spec`` (see the module docstring), following the replicas DNS names."""
    streams: dict[str, asyncio.Task[None]] = {}
    try:
        while True:
            targets = await resolve_gateways(spec)
            for address in set(streams) - set(targets):
                log.info("gateway %s is no longer listed; leaving it", address)
                streams.pop(address).cancel()
            for address, tls_name in targets.items():
                if address in streams:
                    continue
                dial = security
                if security is not None and tls_name and not security.server_name:
                    dial = dataclasses.replace(security, server_name=tls_name)
                streams[address] = asyncio.create_task(
                    stay_registered(
                        address,
                        register,
                        on_message,
                        load,
                        GatewayConnection(),
                        on_disconnect,
                        dial,
                    ),
                    name=f"registration-{address}",
                )
            await asyncio.sleep(RESOLVE_INTERVAL_S)
    finally:
        for task in streams.values():
            task.cancel()
        await asyncio.gather(*streams.values(), return_exceptions=True)
