"""A worker's lifeline to the gateway: dial out, register, stay connected, reconnect.

Drafts and oracles both call ``stay_registered``: it opens the gateway's
``WorkerRegistry.Connect`` stream, sends the registration, reports load
periodically, hands every gateway message to ``on_message`` and, when the
stream breaks, reconnects with capped exponential backoff. Nothing ever dials
into the worker. The stream's edge: the worker sends and receives the core's
``specdec.core.messages``, converted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
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
                elif message is not None:
                    await on_message(message, connection)
            log.warning("gateway %s closed the worker stream", gateway_address)
        except grpc.aio.AioRpcError as exc:
            refused = exc.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
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
                await on_disconnect()
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
