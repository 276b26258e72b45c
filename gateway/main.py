"""`specdec gateway`: start the public API and the worker registry on one port."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from transformers import AutoTokenizer

from gateway.api import GatewayApi
from gateway.chat import ChatTemplate
from gateway.config import GatewayConfig
from gateway.generation import TurnRunner
from gateway.http.server import start_http
from gateway.limits import RequestLimits, longest_token_chars
from gateway.registry import Registry, RegistryServicer
from gateway.servicer import GatewayServicer
from gateway.sessions import SessionTable
from gateway.store import describe, open_store
from specdec.config import load_config
from specdec.core.errors import NotFound
from specdec.engine.models import DEMO_ORACLE, vocab_fingerprint
from specdec.rpc.grants import GrantSigner
from specdec.rpc.health_endpoint import start_health_endpoint
from specdec.rpc.logs import configure_logging
from specdec.rpc.request_guard import ByteLimit
from specdec.rpc.security import (
    ChannelSecurity,
    application_tokens,
    gateway_auth,
    server_credentials,
)
from specdec.rpc.server import ServiceServer, start_server
from specdec.telemetry import configure_telemetry
from specdec.v1 import gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc

log = logging.getLogger("gateway")


async def start(config: GatewayConfig) -> ServiceServer:
    """Load the tokenizer, start serving; returns the running server."""
    # Before the server: its interceptors depend on it.
    telemetry = configure_telemetry("gateway", config.metrics_port, config.trace_file)
    source = config.tokenizer or str(DEMO_ORACLE)
    try:
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, source)
    except (OSError, ValueError) as exc:
        raise NotFound(
            f"cannot load the tokenizer {source!r} ({exc}); set --tokenizer / "
            "SPECDEC_TOKENIZER to the oracle model's folder or hub id"
        ) from None
    limits = RequestLimits(
        max_request_bytes=config.max_request_bytes,
        max_prompt_chars=config.max_prompt_chars,
        max_stop_strings=config.max_stop_strings,
        max_stop_chars=config.max_stop_chars,
        token_chars=longest_token_chars(tokenizer),
    )
    # Security (docs/security.md): each part off unless configured.
    auth = gateway_auth(
        config.auth_token, config.auth_tokens, config.worker_token, config.worker_tokens
    )
    credentials = server_credentials(config)
    grants = GrantSigner(config.grant_secret, config.grant_ttl_s) if config.grant_secret else None
    dial_oracles = ChannelSecurity.of(config, token=config.worker_token or config.auth_token)
    registry = Registry(
        vocab_fingerprint(tokenizer),
        security=dial_oracles,
        grants=grants,
        commit_secret=config.grant_secret,
    )
    runner = TurnRunner(
        registry,
        lambda ids: str(tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)),
        lambda ids: str(tokenizer.decode(list(ids), skip_special_tokens=True)),
        max_failovers=config.max_failovers,
        worker_wait_s=config.worker_wait_s,
        worker_silence_s=config.worker_silence_s,
    )
    store = await open_store(config.session_store, config.state_dir)
    sessions = SessionTable(store, config.max_sessions, config.session_ttl_s)
    api = GatewayApi(
        runner,
        sessions,
        tokenizer,
        chat=ChatTemplate.load(tokenizer, config.chat_template),
        default_k=config.default_k,
        default_max_new_tokens=config.default_max_new_tokens,
        default_adaptive=config.default_adaptive,
        limits=limits,
    )
    servicer = GatewayServicer(api)
    server = await start_server(
        f"{config.host}:{config.port}",
        [
            (
                gateway_pb2_grpc.add_GatewayServicer_to_server,
                servicer,
                gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
            ),
            (
                registry_pb2_grpc.add_WorkerRegistryServicer_to_server,
                RegistryServicer(registry, sessions.known),
                registry_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name,
            ),
        ],
        credentials=credentials,
        interceptors=[auth] if auth else [],
        request_limits={
            gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name: ByteLimit(
                config.max_request_bytes, "--max-request-bytes"
            )
        },
        max_receive_bytes=limits.receive_bytes,
    )
    await start_health_endpoint(config.health_host, config.health_port, server)
    if config.http_port >= 0:
        tokens = application_tokens(config.auth_token, config.auth_tokens)
        http = await start_http(
            api, tokens or None, host=config.host, port=config.http_port, security=config
        )
        server.on_drain.append(http.drain)
        server.on_stop.insert(0, http.stop)
    server.on_drain.append(api.drain)
    server.on_stop.append(store.close)
    server.on_stop.append(telemetry.shutdown)  # flushes the spans of the last requests

    async def stop_tokenizing() -> None:
        api.close()

    server.on_stop.append(stop_tokenizing)
    await server.set_serving(True)
    log.info(
        "gateway listening on %s:%d (tokenizer %s, sessions in %s)",
        config.host,
        server.port,
        source,
        describe(store),
    )
    return server


async def serve(config: GatewayConfig) -> None:
    server = await start(config)
    await server.run_until_signalled()


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(GatewayConfig, argv)
    configure_logging(config.log_level, "gateway")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
