"""`specdec oracle`: start the oracle service and keep it registered at the gateway.

Start-up order, so that nothing is sent to a half-ready oracle:

1. the gRPC server binds and starts with health NOT_SERVING (calls get UNAVAILABLE);
2. the model loads in a background thread (SIGTERM still shuts down meanwhile);
3. the engine is installed and health turns SERVING;
4. with ``--gateway``, the oracle dials every gateway replica and stays registered,
   telling each the sessions it caches (those no gateway knows are released).

SIGTERM/SIGINT: health NOT_SERVING, in-flight streams get a grace period, the
gateway link and the model thread stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from oracle_service.config import OracleConfig
from oracle_service.engine import OracleEngine
from oracle_service.servicer import SERVICE_NAME, OracleServicer
from specdec.config import add_arguments as add_config_arguments
from specdec.config import from_namespace, load_config
from specdec.core.errors import SpecdecError
from specdec.core.messages import (
    GatewayMessage,
    Registered,
    ReleaseSessions,
    WorkerKind,
    WorkerLoad,
    WorkerRegistration,
)
from specdec.engine.models import LoadedModel, check_compatible, load_model
from specdec.engine.quantize import load_draft_model
from specdec.rpc.grants import GrantSigner
from specdec.rpc.health_endpoint import start_health_endpoint
from specdec.rpc.logs import configure_logging
from specdec.rpc.registration import GatewayConnection, stay_registered_everywhere
from specdec.rpc.security import ChannelSecurity, oracle_auth, server_credentials
from specdec.rpc.server import ServiceServer, start_server
from specdec.telemetry import configure_telemetry
from specdec.telemetry.oracle import observe_store
from specdec.v1 import oracle_pb2_grpc

log = logging.getLogger("oracle_service")

T = TypeVar("T")
ModelLoader = Callable[[OracleConfig], LoadedModel]
SHUTDOWN_GRACE_S = 5.0


def load_oracle_model(config: OracleConfig) -> LoadedModel:
    """The model named by ``config`` (the demo oracle when none is given)."""
    return load_model(config.model_name(), device=config.device, dtype=config.dtype)


def load_rescue_draft(config: OracleConfig, oracle: LoadedModel) -> LoadedModel:
    """The rescue draft (``--rescue-draft``) on the oracle's device; it must share the
    oracle's vocabulary (``VocabularyMismatch`` otherwise)."""
    draft = load_draft_model(
        config.rescue_draft_name(), config.device, config.dtype, config.rescue_quantize
    )
    check_compatible(draft, oracle)
    return draft


class OracleService:
    """A started oracle: its server, its servicer and, once the model is loaded, its engine."""

    def __init__(self, config: OracleConfig, server: ServiceServer, servicer: OracleServicer):
        self.config = config
        self.server = server
        self.servicer = servicer
        self.oracle_id = config.resolved_oracle_id()
        self.engine: OracleEngine | None = None
        self._registration: asyncio.Task[None] | None = None
        self.gateway_security: ChannelSecurity | None = None  # TLS and token to the gateway
        server.on_stop.append(self._on_stop)

    @property
    def port(self) -> int:
        return self.server.port

    async def load(self, loader: ModelLoader = load_oracle_model) -> OracleEngine:
        """Load the model off the event loop, then serve it (health SERVING) and register."""
        config = self.config
        log.info("loading model %s on %s (%s)...", config.model_name(), config.device, config.dtype)
        start = time.monotonic()
        model = await _in_daemon_thread(lambda: loader(config))
        draft = None
        if config.rescue_draft:
            draft = await _in_daemon_thread(lambda: load_rescue_draft(config, model))
            log.info("drafting rescue blocks with %s", draft.name)
        engine = OracleEngine(
            model,
            oracle_id=self.oracle_id,
            kv_budget_bytes=config.kv_settings().budget_bytes,
            max_sessions=config.max_sessions,
            max_cached_sessions=config.max_cached_sessions,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_ms / 1000,
            static_kv=config.static_kv,
            cuda_graphs=config.cuda_graphs,
            lanes=config.verify_lanes,
            rescue_draft=draft,
            kv=config.kv_settings(),
            prefill_threads=config.resolved_prefill_threads(),
        )
        await engine.warm_up()
        self.engine = engine
        self.servicer.engine = engine
        observe_store(engine.sessions)
        await self.server.set_serving(True)
        log.info(
            "model %s loaded in %.1fs (vocab %d, %d padded logit rows dropped, context %d, "
            "fingerprint %s); serving as %s",
            model.name,
            time.monotonic() - start,
            model.vocab_size,
            model.padded_logits,
            model.max_context,
            model.fingerprint,
            self.oracle_id,
        )
        if config.gateway:
            self._registration = asyncio.create_task(
                stay_registered_everywhere(
                    config.gateway,
                    self.registration,
                    self._on_gateway_message,
                    self.load_report,
                    security=self.gateway_security,
                ),
                name="oracle-registration",
            )
            log.info("registering at gateway %s as %s", config.gateway, self.advertise_address)
        return engine

    @property
    def advertise_address(self) -> str:
        return self.config.resolved_advertise_address(self.port)

    def registration(self) -> WorkerRegistration:
        """What the gateway is told about this oracle (sent at every (re)connect)."""
        assert self.engine is not None, "register only once the model is loaded"
        info = self.engine.info()
        return WorkerRegistration(
            worker_id=self.oracle_id,
            kind=WorkerKind.ORACLE,
            model=info.model,
            vocab_fingerprint=info.vocab_fingerprint,
            address=self.advertise_address,
            public_address=self.config.public_address,
            max_sessions=self.config.max_sessions,
            device=info.device,
            vocab_size=info.vocab_size,
            max_context=info.max_context,
            eos_token_ids=tuple(info.eos_token_ids),
            cached_session_ids=tuple(self.engine.sessions.session_ids()),
        )

    def load_report(self) -> WorkerLoad:
        if self.engine is None:
            return WorkerLoad()
        sessions = self.engine.sessions
        return WorkerLoad(
            active_sessions=sessions.active_streams, kv_cache_bytes=sessions.kv_cache_bytes
        )

    async def _on_gateway_message(
        self, message: GatewayMessage, connection: GatewayConnection
    ) -> None:
        if isinstance(message, Registered) and message.commit_key is not None:
            # What this oracle proves its commits to that gateway with (docs/security.md).
            self.servicer.keyring.add(message.commit_key)
            return
        if isinstance(message, ReleaseSessions) and self.engine is not None:
            # Sessions no gateway knows: their KV lease ended.
            released = [s for s in message.session_ids if await self.engine.release(s)]
            log.info("released the KV of %d sessions no gateway knows", len(released))
            return
        # Assignments and draft releases are for drafts.
        log.debug("ignoring gateway message %s", type(message).__name__)

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        await self.server.stop(grace_s)

    async def _on_stop(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
            await asyncio.gather(self._registration, return_exceptions=True)
        if self.engine is not None:
            self.engine.shutdown()


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start(config: OracleConfig) -> OracleService:
    """Bind and start the server (health NOT_SERVING); the model is not loaded yet."""
    config.validate()
    # Before the server: its interceptors depend on it.
    telemetry = configure_telemetry("oracle", config.metrics_port, config.trace_file)
    # Security (docs/security.md): each part off unless configured.
    grants = GrantSigner(config.grant_secret) if config.grant_secret else None
    auth = oracle_auth(config.auth_token, config.worker_tokens)
    credentials = server_credentials(config)
    gateway_security = ChannelSecurity.of(config)
    servicer = OracleServicer(grants=grants)
    server = await start_server(
        _bind_address(config.host, config.port),
        [(oracle_pb2_grpc.add_OracleServicer_to_server, servicer, SERVICE_NAME)],
        credentials=credentials,
        interceptors=[auth] if auth else [],
    )
    await start_health_endpoint(config.health_host, config.health_port, server)
    service = OracleService(config, server, servicer)
    service.gateway_security = gateway_security
    server.on_stop.append(telemetry.shutdown)  # last: flushes the spans of the final requests
    log.info(
        "oracle listening on %s:%d (model %s, device %s)",
        config.host,
        service.port,
        config.model_name(),
        config.device,
    )
    return service


async def serve(config: OracleConfig, loader: ModelLoader = load_oracle_model) -> None:
    """Run the oracle until SIGTERM/SIGINT; raises the loader's error if the model fails to load."""
    service = await start(config)
    loading = asyncio.create_task(service.load(loader), name="oracle-load")

    stopping: list[asyncio.Task[None]] = []

    def stop_if_failed(task: asyncio.Task[OracleEngine]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Ends run_until_signalled: an oracle without a model has nothing to serve.
            stopping.append(asyncio.create_task(service.server.server.stop(None)))

    loading.add_done_callback(stop_if_failed)
    try:
        await service.server.run_until_signalled(SHUTDOWN_GRACE_S)
    finally:
        if not loading.done():
            loading.cancel()
    if not loading.cancelled() and loading.exception() is not None:
        raise loading.exception()  # type: ignore[misc]


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """fn() in a daemon thread: a shutdown during a long model load need not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:
            result, error = None, exc
        # RuntimeError: the loop is gone, nobody waits for the model any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="oracle-load", daemon=True).start()
    return future


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The oracle's flags, for a ``specdec oracle`` subparser."""
    add_config_arguments(parser, OracleConfig)


def run(config: OracleConfig) -> None:
    """Configure logging and serve ``config`` until signalled; exit 1 on a startup error."""
    configure_logging(config.log_level, service="oracle")
    try:
        asyncio.run(serve(config))
    except SpecdecError as exc:
        log.error("oracle failed to start: %s", exc)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


def main_from_namespace(namespace: argparse.Namespace) -> None:
    """Entry point for a subparser built with ``add_arguments``."""
    run(from_namespace(OracleConfig, namespace))


def main(argv: Sequence[str] | None = None) -> None:
    """``specdec oracle [flags]`` (also ``python -m oracle_service``)."""
    run(load_config(OracleConfig, argv))


if __name__ == "__main__":
    main()
