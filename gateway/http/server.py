"""Serve the HTTP API with uvicorn on the gateway's own event loop, beside grpc.aio.

``start_http`` starts uvicorn's ``Server.serve()`` as a task of the running loop (no
thread, no second loop: handlers call ``GatewayApi`` directly) and returns once it
listens. The gateway's signal handling stays the gateway's: uvicorn installs none.
TLS is the gateway's: its certificate and key, and with ``--tls-ca`` client
certificates required (mutual TLS), as on the gRPC port.

``Traced`` makes each request's span the root of its trace (or a child of the
caller's, from a ``traceparent`` header), current while the request runs, so the
turn's spans hang under it as under a gRPC Generate call's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import GatewayApi
from gateway.http.app import build_app
from specdec.config import SecuritySettings
from specdec.core.errors import InvalidArgument
from specdec.rpc.security import TokenTable
from specdec.telemetry.setup import tracer

log = logging.getLogger(__name__)

# An idle kept-alive connection stays open this long (uvicorn's default, 5 s, closes it
# under clients that pause between requests; 75 s is nginx's).
KEEP_ALIVE_S = 75

# Paths whose requests are not traced (probes), as gRPC health checks are not.
UNTRACED_PATHS = ("/health",)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the gateway handles SIGTERM / SIGINT and stops this server itself


class Traced:
    """ASGI middleware: one server span per HTTP request, current while it runs."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        active = tracer()
        if active is None or scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self._app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        route = _route(scope["path"])
        with active.start_as_current_span(
            f"{scope['method']} {route}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "http.route": route},
        ) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self._app(scope, receive, send_traced)


def _route(path: str) -> str:
    """The route of a path: a session's id is not part of the span's name."""
    return "/v1/sessions/{id}" if path.startswith("/v1/sessions/") else path


class HttpServer:
    """A started HTTP API; ``stop`` lets the streams in flight end within ``grace_s``."""

    def __init__(
        self, server: uvicorn.Server, task: asyncio.Task[None], app: Any, sock: socket.socket
    ) -> None:
        self._server = server
        self._socket = sock
        self._task = task
        self._app = app

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def drain(self) -> None:
        """The gateway is stopping: /health says so (503) while the streams finish."""
        self._app.state.http_api.serving = False

    async def stop(self) -> None:
        self.drain()
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def start_http(
    api: GatewayApi,
    tokens: TokenTable | None,
    *,
    host: str,
    port: int,
    security: SecuritySettings,
    grace_s: int = 5,
) -> HttpServer:
    """Serve the HTTP API on ``host:port`` (0 = any free port) until ``stop``;
    ``InvalidArgument`` when it cannot listen there or use the TLS files."""
    app = build_app(api, tokens)
    tls: dict[str, Any] = {}
    if security.tls_cert:
        tls = {"ssl_certfile": security.tls_cert, "ssl_keyfile": security.tls_key}
        if security.tls_ca:
            tls |= {"ssl_ca_certs": security.tls_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        Traced(app),
        host=host,
        port=port,
        lifespan="off",
        log_config=None,  # the gateway's logging
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=grace_s,
        **tls,
    )
    try:
        config.load()  # the TLS context: a bad certificate fails here
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"the HTTP API cannot use the TLS settings: {exc}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise InvalidArgument(
            f"the HTTP API cannot listen on {host}:{port} ({exc}); choose another --http-port"
        ) from None
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-api")
    while not server.started:
        if task.done():
            task.result()
            raise OSError(f"the HTTP API stopped while starting on {host}:{port}")
        await asyncio.sleep(0.01)
    running = HttpServer(server, task, app, sock)
    log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if tls else "http", host,
             running.port)  # fmt: skip
    return running
