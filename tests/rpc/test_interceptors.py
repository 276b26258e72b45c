"""The error interceptor (``specdec.rpc.interceptors``) in the standard server stack: a
stray CancelledError ends the RPC with a status; a client's cancellation stays one.

A real grpc.aio server made by ``start_server``. The stray cancellation is the one grpc
raises from an awaited call that something else cancelled (as closing a channel does):
the handler's own task was never cancelled, and without the interceptor the client would
wait out its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from specdec.rpc.server import ServiceServer, start_server
from specdec.v1 import gateway_pb2
from tests.rpc.generic import session_methods

SERVICE = "t.Cancelled"
REQUEST = gateway_pb2.GetSessionRequest(session_id="s1").SerializeToString()
PARSE = gateway_pb2.GetSessionResponse.FromString


async def _stray() -> None:
    """Await a future someone else cancels: CancelledError here, no task cancelled."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.05, future.cancel)
    await future


async def _unary(request: Any, context: Any) -> Any:
    await _stray()
    return gateway_pb2.GetSessionResponse()


async def _stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield gateway_pb2.GetSessionResponse(session_id="first")
    await _stray()
    yield gateway_pb2.GetSessionResponse(session_id="never")


class _Slow:
    """A stream that waits until its client cancels it."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def stream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield gateway_pb2.GetSessionResponse(session_id="first")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


SLOW = _Slow()


_ADD = session_methods(
    SERVICE, {"UU": ("UU", _unary), "US": ("US", _stream), "Slow": ("US", SLOW.stream)}
)


@pytest.fixture
async def server() -> AsyncIterator[ServiceServer]:
    running = await start_server("127.0.0.1:0", [(_ADD, None, SERVICE)])
    yield running
    await running.stop(0)


@pytest.mark.parametrize("shape", ["UU", "US"])
async def test_a_stray_cancellation_ends_the_call_unavailable(
    server: ServiceServer, shape: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        method = f"/{SERVICE}/{shape}"
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            if shape == "UU":
                await channel.unary_unary(method, response_deserializer=PARSE)(REQUEST, timeout=30)
            else:
                call = channel.unary_stream(method, response_deserializer=PARSE)(
                    REQUEST, timeout=30
                )
                assert [r.session_id async for r in call] == ["first"]
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry" in (raised.value.details() or "")
    assert time.monotonic() - started < 10  # at once, not at the deadline


async def test_a_client_cancellation_still_cancels_the_handler(server: ServiceServer) -> None:
    SLOW.cancelled.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_stream(f"/{SERVICE}/Slow", response_deserializer=PARSE)(REQUEST)
        assert (await call.read()).session_id == "first"
        call.cancel()
        await asyncio.wait_for(SLOW.cancelled.wait(), 10)
        assert await call.code() == grpc.StatusCode.CANCELLED
