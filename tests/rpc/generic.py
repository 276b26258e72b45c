"""Test services of GetSession-shaped methods (GetSessionRequest in, GetSessionResponse
out) for ``specdec.rpc.server.start_server``, one behaviour per method name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from specdec.v1 import gateway_pb2

# The method handler factory of each RPC shape.
SHAPES = {
    "UU": grpc.unary_unary_rpc_method_handler,
    "US": grpc.unary_stream_rpc_method_handler,
    "SU": grpc.stream_unary_rpc_method_handler,
    "SS": grpc.stream_stream_rpc_method_handler,
}


def session_methods(
    service: str, methods: dict[str, tuple[str, Callable[..., Any]]]
) -> Callable[[Any, grpc.aio.Server], None]:
    """An adder for ``start_server``: ``methods`` maps each method's name to its shape
    (a key of ``SHAPES``) and its behaviour."""

    def add(servicer: Any, server: grpc.aio.Server) -> None:
        handlers = {
            name: SHAPES[shape](
                behavior,
                request_deserializer=gateway_pb2.GetSessionRequest.FromString,
                response_serializer=gateway_pb2.GetSessionResponse.SerializeToString,
            )
            for name, (shape, behavior) in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    return add
