"""Start and stop a grpc.aio server the same way in every service.

Every server gets: the error interceptor, the request guard (oversized or
unparsable requests: INVALID_ARGUMENT, ``specdec.rpc.request_guard``) and, when
tracing is on, the OpenTelemetry interceptor (health checks excluded), the standard health service
(NOT_SERVING until the service says it is ready), server reflection, and a
graceful shutdown on SIGTERM/SIGINT (health goes NOT_SERVING, in-flight RPCs
get ``grace_s`` to finish, then ``on_stop`` callbacks run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.rpc.interceptors import ErrorInterceptor
from specdec.rpc.request_guard import ByteLimit, RequestGuard
from specdec.telemetry import server_interceptors

log = logging.getLogger(__name__)

# Large enough for a long session's token list in one OpenVerify / Assignment.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class ServiceServer:
    """A started server, its health servicer, and what to run when it stops."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: tuple[str, ...]
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run when the stop begins, before in-flight calls get their grace period.
    on_drain: list[Callable[[], None]] = field(default_factory=list)

    async def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        for drain in self.on_drain:
            drain()
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        for callback in self.on_stop:
            try:
                await callback()
            except Exception:
                log.exception("error while stopping")

    async def run_until_signalled(self, grace_s: float = 5.0) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(self.server.wait_for_termination())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down (grace %.1fs)", grace_s)
        await self.stop(grace_s)
        for task in (waiter, stopper):
            task.cancel()


async def start_server(
    bind: str,
    services: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    *,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    maximum_concurrent_rpcs: int | None = None,
    request_limits: Mapping[str, ByteLimit] | None = None,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
) -> ServiceServer:
    """Start a server on ``bind`` ("host:port", port 0 = any free port).

    services: (add_XServicer_to_server, servicer, full service name) triples.
    request_limits: method or service name -> the most bytes of one request, refused
    (INVALID_ARGUMENT) once read but before it is parsed.
    max_receive_bytes: the most bytes grpc reads of one request at all: beyond, it
    refuses it unread (RESOURCE_EXHAUSTED). Reading a request costs the event loop and
    the heap about its size, so a server whose requests are small keeps this low.
    Health starts NOT_SERVING; call ``set_serving()`` once the model is loaded.
    """
    server = grpc.aio.server(
        # Tracing outermost ([] when off): its span sees the status the others set.
        interceptors=[
            *server_interceptors(),
            *interceptors,
            RequestGuard(request_limits),
            ErrorInterceptor(),
        ],
        options=[("grpc.max_receive_message_length", max_receive_bytes), *SERVER_OPTIONS[1:]],
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    names = tuple(name for _, _, name in services)
    for add, servicer, _ in services:
        add(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if credentials is None:
        port = server.add_insecure_port(bind)
    else:
        port = server.add_secure_port(bind, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind {bind}")
    running = ServiceServer(server, health_servicer, port, names)
    await running.set_serving(False)
    await server.start()
    return running
