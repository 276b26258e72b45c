"""The gateway's configuration: flags, SPECDEC_* variables, defaults (in that order)."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.config import SECURITY, SecuritySettings, TelemetrySettings, setting
from specdec.core.types import SPECULATION_DEFAULTS


@dataclass
class GatewayConfig(SecuritySettings, TelemetrySettings):
    """specdec gateway: the public API, sessions and worker routing."""

    host: str = setting("0.0.0.0", "interface to listen on")
    port: int = setting(50051, "port of the public API and of the worker registry")
    tokenizer: str = setting("", "tokenizer folder or hub id (default: the demo oracle's)")
    chat_template: str = setting(
        "", "Jinja chat template FILE for chat requests (default: the tokenizer's own)"
    )
    http_port: int = setting(
        -1, "port of the OpenAI-compatible HTTP API on --host (-1 = off, 0 = any free port)"
    )
    default_k: int = setting(
        SPECULATION_DEFAULTS.k,
        "tokens drafted per round when a request does not say (with --default-adaptive: "
        "the most the controller drafts)",
    )
    default_adaptive: bool = setting(
        SPECULATION_DEFAULTS.adaptive,
        "requests that set neither k nor adaptive get the controller: k chosen per round "
        "up to --default-k, 0 (the oracle alone) when drafting does not pay",
    )
    default_max_new_tokens: int = setting(128, "max_new_tokens when a request does not say")
    max_sessions: int = setting(10_000, "sessions held at once; beyond: RESOURCE_EXHAUSTED")
    session_ttl_s: float = setting(3600.0, "idle seconds after which a session expires")
    session_store: str = setting(
        "sqlite",
        "where sessions live: sqlite (a database under --state-dir; survives restarts), "
        "redis://host:port/db (shared by several gateway replicas), or memory (lost on "
        "restart)",
    )
    state_dir: str = setting(
        "",
        "directory of the SQLite session store, one gateway each (default: "
        "$XDG_STATE_HOME/specdec, else ~/.local/state/specdec)",
    )
    max_failovers: int = setting(3, "times a turn may move to another worker after a failure")
    worker_wait_s: float = setting(
        5.0, "how long a request waits for a worker to register before UNAVAILABLE"
    )
    worker_silence_s: float = setting(
        60.0,
        "seconds a turn waits for the next report of its worker (a draft's commit, an oracle's "
        "verdict) before failing over: a hung worker or a stalled link sends nothing",
    )
    max_request_bytes: int = setting(
        8 * 1024 * 1024,
        "most bytes of one request to the public API: beyond, INVALID_ARGUMENT before it is "
        "parsed; beyond twice this, gRPC refuses it unread (RESOURCE_EXHAUSTED)",
    )
    max_prompt_chars: int = setting(
        0,
        "most characters of a text prompt, refused before tokenising (0 = what the "
        "largest oracle's context could hold: its tokens x the longest token's characters)",
    )
    max_stop_strings: int = setting(16, "most stop strings of one request")
    max_stop_chars: int = setting(256, "most characters of each stop string")
    log_level: str = setting("info", "debug, info, warning or error")
    auth_tokens: str = setting(
        "",
        "application tokens, each its own principal: alice:TOKEN1,bob:TOKEN2",
        group=SECURITY,
    )
    worker_token: str = setting(
        "",
        "token oracles and drafts must present (their SPECDEC_AUTH_TOKEN); default --auth-token",
        group=SECURITY,
    )
    worker_tokens: str = setting(
        "",
        "edge devices' own worker tokens, each its own principal: edge1:TOKEN1,edge2:TOKEN2; "
        "they register drafts only (revoke one: remove it here and on the oracles, restart)",
        group=SECURITY,
    )
    grant_secret: str = setting(
        "",
        "secret shared with the oracles to sign session grants (empty = no grants); every "
        "gateway replica derives the oracles' commit keys from it (empty = random ones)",
        group=SECURITY,
    )
    grant_ttl_s: float = setting(600.0, "seconds a session grant stays valid", group=SECURITY)
    health_host: str = setting("127.0.0.1", "interface of the plaintext health endpoint")
    health_port: int = setting(-1, "plaintext health-only port (-1 = off: health on --port)")
