"""The gateway's configuration: flags, SPECDEC_* variables, defaults (in that order)."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.config import setting


@dataclass
class GatewayConfig:
    """specdec gateway: the public API, sessions and worker routing."""

    host: str = setting("0.0.0.0", "interface to listen on")
    port: int = setting(50051, "port of the public API and of the worker registry")
    tokenizer: str = setting("", "tokenizer folder or hub id (default: the demo oracle's)")
    default_k: int = setting(4, "tokens drafted per round when a request does not say")
    default_max_new_tokens: int = setting(128, "max_new_tokens when a request does not say")
    max_sessions: int = setting(10_000, "sessions held at once; beyond: RESOURCE_EXHAUSTED")
    session_ttl_s: float = setting(3600.0, "idle seconds after which a session expires")
    max_failovers: int = setting(3, "times a turn may move to another worker after a failure")
    worker_wait_s: float = setting(
        5.0, "how long a request waits for a worker to register before UNAVAILABLE"
    )
    log_level: str = setting("info", "debug, info, warning or error")
    metrics_port: int = setting(0, "Prometheus scrape port (0 = off)")
