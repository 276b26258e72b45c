"""Server interceptors: cross-cutting concerns kept out of the handlers.

``ErrorInterceptor`` turns the core's typed errors into gRPC statuses (and any
other exception into INTERNAL, logged once with its traceback), for all four
RPC shapes in one place, the way OpenTelemetry's ``_wrap_rpc_behavior`` does.
A CancelledError that no one cancelled the handler with (grpc raises one from an
awaited call that its channel's close cancelled) ends the RPC UNAVAILABLE: left to
grpc, the handler would end with no status and the client would wait out its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from specdec.core.errors import SpecdecError

log = logging.getLogger(__name__)

# Services whose handlers are not async generators (health Watch uses context.write).
UNWRAPPED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def status_of(error: SpecdecError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


def _stray(exc: BaseException, context: grpc.aio.ServicerContext) -> bool:
    """``exc`` is a CancelledError that did not cancel this handler: neither the client
    (the RPC is not cancelled) nor anyone cancelling its task."""
    if not isinstance(exc, asyncio.CancelledError) or context.cancelled():
        return False
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is not None and cancelling() == 0


def _ours(exc: BaseException, context: grpc.aio.ServicerContext) -> bool:
    """Whether the wrapper ends the RPC for ``exc``: any error but an abort under way, and
    a stray cancellation; a real one (and GeneratorExit) goes on to grpc."""
    if isinstance(exc, grpc.aio.AbortError):
        return False
    return isinstance(exc, Exception) or _stray(exc, context)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if _stray(exc, context):
        log.error("%s was interrupted by a stray cancellation", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "the request was interrupted inside the server; retry it"
        )
    if isinstance(exc, SpecdecError):
        await context.abort(status_of(exc), str(exc))
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except BaseException as exc:
            if not _ours(exc, context):
                raise
            await _abort(context, exc, method)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            if not _ours(exc, context):
                raise
            await _abort(context, exc, method)

    return handler


def rewrap(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    wrap_stream: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: ``wrap_unary`` for RPCs that return one
    response, ``wrap_stream`` for RPCs that stream responses; all four shapes in one place.
    ``request_deserializer`` replaces the handler's own."""
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kwargs)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps ``SpecdecError`` subclasses to their status; anything else to INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNWRAPPED_PREFIXES):
            return handler
        return rewrap(
            handler,
            lambda behavior: _wrap_unary(behavior, method),
            lambda behavior: _wrap_stream(behavior, method),
        )
