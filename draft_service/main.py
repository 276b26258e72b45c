"""`specdec draft`: load the draft model, dial out to the gateway, draft until stopped.

Nothing dials into a draft service: the only listening socket is an optional
health endpoint on the loopback interface, for container and k8s probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence

import torch

from draft_service.config import DraftConfig
from draft_service.worker import DraftWorker
from specdec.config import load_config
from specdec.engine.lean_forward import lean_unsupported
from specdec.engine.models import DEMO_DRAFT
from specdec.engine.quantize import load_draft_model
from specdec.rpc.logs import configure_logging
from specdec.rpc.registration import stay_registered_everywhere
from specdec.rpc.security import ChannelSecurity
from specdec.rpc.server import ServiceServer, start_server
from specdec.telemetry import configure_telemetry, observe

log = logging.getLogger("draft")


async def serve(config: DraftConfig) -> None:
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    telemetry = configure_telemetry("draft", config.metrics_port, config.trace_file)
    security = ChannelSecurity.of(config)  # TLS and worker token to gateway and oracles
    health: ServiceServer | None = None
    if config.health_port >= 0:
        health = await start_server(f"{config.health_host}:{config.health_port}", [])
        log.info("health endpoint on %s:%d", config.health_host, health.port)
    source = config.model or str(DEMO_DRAFT)
    log.info("loading draft model %s on %s ...", source, config.device)
    model = await asyncio.to_thread(
        load_draft_model, source, config.device, config.dtype, config.quantize
    )
    unsupported = lean_unsupported(model)
    if config.lean_forward and unsupported:
        log.info("drafting on HF's forward: the lean forward does not take %s", unsupported)
    worker_id = config.draft_id or f"draft-{socket.gethostname()}-{os.getpid()}"
    worker = DraftWorker(config, model, worker_id, security)
    observe(
        active_sessions=lambda: worker.active_turns,
        kv_cache_bytes=lambda: worker.load().kv_cache_bytes,
    )
    if health is not None:
        await health.set_serving(True)
    log.info("draft %s ready (model %s); dialling gateway %s", worker_id, source, config.gateway)
    lifeline = asyncio.create_task(
        stay_registered_everywhere(
            config.gateway,
            worker.registration,
            worker.on_message,
            worker.load,
            worker.on_disconnect,
            security,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    lifeline.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await lifeline
    await worker.close()
    if health is not None:
        await health.stop(1.0)
    await telemetry.shutdown()  # flushes the spans of the last rounds


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(DraftConfig, argv)
    config.validate()
    configure_logging(config.log_level, "draft")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
