"""Client channels: one place for options (message size, keepalive) and credentials."""

from __future__ import annotations

import grpc

from specdec.rpc.security import ChannelSecurity
from specdec.rpc.server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def open_channel(address: str, security: ChannelSecurity | None = None) -> grpc.aio.Channel:
    """An aio channel to ``address`` ("host:port"); ``security``: TLS and token (None: plain)."""
    if security is not None:
        return security.open(address, CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
