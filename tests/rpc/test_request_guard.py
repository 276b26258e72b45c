"""The request guard (``specdec.rpc.request_guard``), in the standard server stack.

A real grpc.aio server made by ``start_server`` serves one echo method per RPC shape on
real protobuf messages; the client sends raw bytes, so it can send what no protobuf
library would: a string field of invalid UTF-8, and requests over a byte limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from specdec.rpc.request_guard import ByteLimit
from specdec.rpc.server import ServiceServer, start_server
from specdec.v1 import gateway_pb2
from tests.rpc.generic import session_methods

SERVICE = "t.Guarded"
LIMIT = 64
GOOD = gateway_pb2.GetSessionRequest(session_id="s1").SerializeToString()
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (session_id): two bytes that are not UTF-8
LARGE = gateway_pb2.GetSessionRequest(session_id="x" * (LIMIT + 1)).SerializeToString()


def _echo(request: gateway_pb2.GetSessionRequest) -> gateway_pb2.GetSessionResponse:
    return gateway_pb2.GetSessionResponse(session_id=request.session_id)


async def _unary_unary(request: Any, context: Any) -> Any:
    return _echo(request)


async def _unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield _echo(request)


async def _stream_unary(requests: Any, context: Any) -> Any:
    ids = [request.session_id async for request in requests]
    return gateway_pb2.GetSessionResponse(session_id=",".join(ids))


async def _stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield _echo(request)


_ADD = session_methods(
    SERVICE,
    {
        "UU": ("UU", _unary_unary),
        "US": ("US", _unary_stream),
        "SU": ("SU", _stream_unary),
        "SS": ("SS", _stream_stream),
    },
)


@pytest.fixture
async def server() -> AsyncIterator[ServiceServer]:
    running = await start_server(
        "127.0.0.1:0",
        [(_ADD, None, SERVICE)],
        request_limits={f"/{SERVICE}/UU": ByteLimit(LIMIT, "--max-test-bytes")},
    )
    yield running
    await running.stop(0)


async def _call(port: int, shape: str, *requests: bytes) -> tuple[grpc.StatusCode, str, list[str]]:
    """(status, its details, the session ids echoed) of one call of ``shape``."""
    parse = gateway_pb2.GetSessionResponse.FromString
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = f"/{SERVICE}/{shape}"
        try:
            if shape == "UU":
                answers = [
                    await channel.unary_unary(method, response_deserializer=parse)(requests[0])
                ]
            elif shape == "US":
                call = channel.unary_stream(method, response_deserializer=parse)(requests[0])
                answers = [answer async for answer in call]
            elif shape == "SU":
                call = channel.stream_unary(method, response_deserializer=parse)
                answers = [await call(iter(requests))]
            else:
                call = channel.stream_stream(method, response_deserializer=parse)(iter(requests))
                answers = [answer async for answer in call]
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", []
        return grpc.StatusCode.OK, "", [a.session_id for a in answers]


@pytest.mark.parametrize("shape", ["UU", "US", "SU", "SS"])
async def test_invalid_utf8_is_invalid_argument_in_one_line(
    server: ServiceServer, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert await _call(server.port, shape, GOOD) == (grpc.StatusCode.OK, "", ["s1"])
    with caplog.at_level(logging.WARNING):
        code, details, _ = await _call(server.port, shape, BAD_UTF8)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in details and f"/{SERVICE}/{shape}" in details
    refusals = [r for r in caplog.records if "unparsable" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].exc_info is None  # one line, no traceback


@pytest.mark.parametrize("shape", ["SU", "SS"])
async def test_a_bad_request_in_a_stream_ends_it_there(server: ServiceServer, shape: str) -> None:
    code, details, _ = await _call(server.port, shape, GOOD, BAD_UTF8, GOOD)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details


async def test_a_request_over_its_byte_limit_is_refused_naming_the_flag(
    server: ServiceServer,
) -> None:
    code, details, _ = await _call(server.port, "UU", LARGE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{len(LARGE)} bytes" in details and f"limit of {LIMIT}" in details
    assert "--max-test-bytes" in details
    # The limit is per method: the same request to another one passes.
    assert (await _call(server.port, "US", LARGE))[0] == grpc.StatusCode.OK
