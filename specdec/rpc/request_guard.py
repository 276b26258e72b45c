"""Requests refused at the edge, before they are parsed: too large, or not parsable.

grpc hands each request's bytes to the method's deserializer before any handler or
interceptor code sees the request. Two things go wrong there that a caller must
hear about as INVALID_ARGUMENT, in one log line and without any work done:

* a request larger than the service wants (``limits``: method or service -> its most
  bytes, and the flag that sets it): refused by its length alone, unparsed;
* bytes protobuf cannot parse, e.g. a string field holding invalid UTF-8: grpc would
  log a traceback and answer UNKNOWN.

``RequestGuard`` gives every method a deserializer that never raises: it returns the
message, or a ``Refusal`` that the method's handler turns into the status before
the real handler runs (for a stream of requests, where that request would be read).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from specdec.core.errors import InvalidArgument
from specdec.rpc.interceptors import UNWRAPPED_PREFIXES, rewrap

log = logging.getLogger(__name__)

# A refused request at least this large is followed by a heap trim (see _trim_soon).
TRIM_AFTER_BYTES = 1 << 20
TRIM_DELAY_S = 0.2


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    return trim  # type: ignore[no-any-return]


_TRIM = _malloc_trim()
_trimming: set[asyncio.AbstractEventLoop] = set()


def _trim_soon() -> None:
    """Once the refused request's buffers are freed, hand their pages back to the system.

    grpc assembles a request in many small heap blocks, and glibc keeps freed heap pages
    for reuse: without this, each large refused request would leave the process tens of
    megabytes larger. At most one trim is pending per event loop.
    """
    if _TRIM is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if loop in _trimming:
        return
    _trimming.add(loop)

    def trim() -> None:
        _trimming.discard(loop)
        _TRIM(0)

    loop.call_later(TRIM_DELAY_S, trim)


@dataclass(frozen=True)
class ByteLimit:
    """The most bytes one request may have, and the setting that says so."""

    max_bytes: int
    flag: str


@dataclass(frozen=True)
class Refusal:
    """What the guard's deserializer returns instead of a request it refused."""

    message: str


def _deserializer(
    parse: Callable[[bytes], Any] | None, method: str, limit: ByteLimit | None
) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if limit is not None and len(data) > limit.max_bytes:
            if len(data) >= TRIM_AFTER_BYTES:
                _trim_soon()
            return Refusal(
                f"the request is {len(data)} bytes, over the limit of {limit.max_bytes} "
                f"({limit.flag})"
            )
        if parse is None:
            return data
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, and anything a parser raises
            log.warning("refused an unparsable request to %s: %s", method, exc)
            return Refusal(
                f"the request to {method} is not a valid message (string fields must be "
                f"valid UTF-8): {exc}"
            )

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Refusal):
            raise InvalidArgument(request.message)
        yield request


async def _request(request: Any, context: grpc.aio.ServicerContext) -> Any:
    """The request as the handler takes it: one (refused here), or a stream of them
    (refused where a bad one would be read)."""
    if isinstance(request, Refusal):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
    return _checked(request) if hasattr(request, "__aiter__") else request


# grpc.aio tells a handler's shape by its function: a coroutine function answers once,
# an async generator function streams.
def _guard_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await _request(request, context), context)

    return handler


def _guard_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in behavior(await _request(request, context), context):
            yield response

    return handler


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses oversized and unparsable requests with INVALID_ARGUMENT (module docstring).

    limits: full method ("/specdec.v1.Gateway/Generate") or service ("specdec.v1.Gateway")
    name -> its ``ByteLimit``; methods of neither are only guarded against parse errors.
    """

    def __init__(self, limits: Mapping[str, ByteLimit] | None = None) -> None:
        self._limits = dict(limits or {})

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNWRAPPED_PREFIXES):
            return handler
        service = method.lstrip("/").rpartition("/")[0]
        limit = self._limits.get(method) or self._limits.get(service)
        deserialize = _deserializer(handler.request_deserializer, method, limit)
        return rewrap(handler, _guard_unary, _guard_stream, deserialize)
