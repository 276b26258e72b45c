"""Configuration of the oracle service: flags, ``SPECDEC_*`` variables, defaults."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from specdec.config import (
    QUANTIZE_CHOICES,
    SECURITY,
    SecuritySettings,
    TelemetrySettings,
    setting,
)
from specdec.core.errors import InvalidArgument
from specdec.engine.kv_options import (
    ATTENTIONS,
    DEFAULT_VERIFY_TOKENS,
    LAYOUTS,
    MAX_ROW_TOKENS,
    PREFILL_THREADS_FROM,
    KVSettings,
)

MIB = 1024 * 1024
MAX_VERIFY_LANES = 8
MAX_BATCH_WAIT_S = 1.0
MAX_AUTO_PREFILL_THREADS = 8


@dataclass
class OracleConfig(SecuritySettings, TelemetrySettings):
    """Serve an oracle model: verify drafted blocks for drafts and the gateway."""

    host: str = setting("0.0.0.0", "interface to listen on")
    port: int = setting(50052, "port to listen on (0 = any free port)")
    model: str = setting("", "model folder or hub id (empty = the bundled demo oracle)")
    device: str = setting("cpu", "torch device of the model: cpu, cuda, cuda:N")
    dtype: str = setting(
        "float32",
        "weights' dtype",
        choices=("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"),
    )
    oracle_id: str = setting("", "name of this worker (empty = HOSTNAME-PID)")
    advertise_address: str = setting(
        "", "host:port that drafts and the gateway dial (empty = HOSTNAME:PORT)"
    )
    public_address: str = setting(
        "", "host:port that drafts dial, when it differs from advertise_address (edge drafts)"
    )
    gateway: str = setting(
        "",
        "gateway host:port to register with (empty = standalone); several replicas: "
        "a,b or a DNS name resolving to each (a headless Service)",
    )
    kv_budget_mb: float = setting(
        0.0,
        "KV cache memory, in MiB: the paged pool's size, or with HF caches what idle "
        "sessions keep before LRU eviction (0 = auto: on a GPU what --gpu-memory-fraction "
        "leaves after the weights and activations, else 1024)",
    )
    gpu_memory_fraction: float = setting(
        0.9,
        "share of the GPU's memory this oracle may use in all (weights, activations, CUDA "
        "graphs, KV); the KV pool gets what is left (as vLLM's gpu_memory_utilization)",
    )
    kv_layout: str = setting(
        "paged",
        "KV memory of the static-KV forward: paged = blocks taken as sessions grow, slots = "
        "one full-context slot per session (sessions beyond them use HF caches)",
        choices=LAYOUTS,
    )
    batch_invariant: bool = setting(
        True,
        "paged KV: every forward runs --verify-tokens token rows, so a session's logits, "
        "and its greedy output, do not depend on what else is in its batch",
    )
    verify_tokens: int = setting(
        DEFAULT_VERIFY_TOKENS,
        "with --batch-invariant: token rows of every forward (rows x (k + 1) beyond it run "
        "as several forwards); at least --max-batch and 34",
    )
    attention: str = setting(
        "auto",
        "paged KV attention: sdpa = PyTorch's fused kernel, chunked = the batch-invariant "
        "reference (auto: sdpa on a GPU, chunked elsewhere)",
        choices=ATTENTIONS,
    )
    max_sessions: int = setting(
        64, "verify streams served at once; more are refused with RESOURCE_EXHAUSTED"
    )
    max_cached_sessions: int = setting(1024, "sessions whose KV cache is kept between turns")
    max_batch: int = setting(
        16, "most blocks of different sessions verified in one forward pass (1 = one at a time)"
    )
    batch_wait_ms: float = setting(
        5.0,
        "when fewer sessions have a block waiting than have a verify stream open, wait up to "
        "this long for theirs before starting a batch (0 = never wait)",
    )
    static_kv: str = setting(
        "auto",
        "preallocated KV slots (llama-family oracles), the verify forward replayed as CUDA "
        "graphs: auto = on a CUDA device, on = also on the CPU (eager), off = HF's forward",
        choices=("auto", "on", "off"),
    )
    cuda_graphs: bool = setting(
        True, "with static KV on a GPU, replay the verify and prefill forwards as CUDA graphs"
    )
    prefill_threads: int = setting(
        0,
        f"CPU oracle: compute threads of a prefill of {PREFILL_THREADS_FROM} tokens or more, "
        "which seldom runs beside a draft (0 = auto: the CPUs this process may use, at most "
        f"{MAX_AUTO_PREFILL_THREADS}; 1 = its one compute thread)",
    )
    lean_forward: bool = setting(
        True,
        "sessions outside a KV pool (a CPU oracle, --static-kv off) on specdec's lean forward "
        "where the model qualifies (llama, mistral, qwen2), without HF's per-op machinery "
        "(off: HF's forward)",
    )
    verify_lanes: int = setting(
        0,
        "verify batches run at once, each in its own thread and CUDA stream (0 = auto: 2 "
        "with CUDA graphs for a model under 1 GiB of weights, else 1; a rescue draft needs 1)",
    )
    rescue_draft: str = setting(
        "",
        "a small draft model (folder or hub id; 'demo' = the bundled demo draft) the oracle "
        "drafts a session's next block with after a verdict that no block sent ahead "
        "extends, instead of idling for a round trip (greedy streams that allow it; "
        "empty = never)",
    )
    rescue_quantize: str = setting(
        "auto",
        "int8 weights for the rescue draft: auto = where they run (CPU, float32), none = off",
        choices=QUANTIZE_CHOICES,
    )
    log_level: str = setting(
        "info", "log level", choices=("debug", "info", "warning", "error", "critical")
    )
    grant_secret: str = setting(
        "",
        "the gateway's grant secret: serve only sessions it granted (empty = any)",
        group=SECURITY,
    )
    worker_tokens: str = setting(
        "",
        "edge devices' own worker tokens, as the gateway's --worker-tokens "
        "(edge1:TOKEN1,edge2:TOKEN2): accepted besides --auth-token",
        group=SECURITY,
    )
    health_host: str = setting("127.0.0.1", "interface of the plaintext health endpoint")
    health_port: int = setting(-1, "plaintext health-only port (-1 = off: health on --port)")

    def resolved_oracle_id(self) -> str:
        return self.oracle_id or f"{socket.gethostname()}-{os.getpid()}"

    def resolved_advertise_address(self, bound_port: int) -> str:
        """What to tell the gateway; ``bound_port`` is the real port when ``port`` is 0."""
        return self.advertise_address or f"{socket.gethostname()}:{bound_port}"

    def model_name(self) -> str:
        if self.model:
            return self.model
        from specdec.engine.models import DEMO_ORACLE

        return str(DEMO_ORACLE)

    def rescue_draft_name(self) -> str:
        if self.rescue_draft == "demo":
            from specdec.engine.models import DEMO_DRAFT

            return str(DEMO_DRAFT)
        return self.rescue_draft

    def resolved_prefill_threads(self) -> int:
        if self.prefill_threads > 0:
            return self.prefill_threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return min(MAX_AUTO_PREFILL_THREADS, cpus or 1)

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.kv_budget_mb * MIB)

    def kv_settings(self) -> KVSettings:
        """The KV settings the engine takes (``oracle_service.kv_pool``)."""
        return KVSettings(
            static_kv=self.static_kv,
            layout=self.kv_layout,
            budget_bytes=self.kv_budget_bytes if self.kv_budget_mb > 0 else None,
            memory_fraction=self.gpu_memory_fraction,
            cuda_graphs=self.cuda_graphs,
            batch_invariant=self.batch_invariant,
            verify_tokens=self.verify_tokens,
            attention=self.attention,
            lean_forward=self.lean_forward,
        )

    def validate(self) -> None:
        """Raise ``InvalidArgument`` naming the first setting out of range (the engine's
        by ``check_settings``: here before the model loads)."""
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"--port must be in [0, 65535], got {self.port}")
        check_settings(
            max_sessions=self.max_sessions,
            max_cached_sessions=self.max_cached_sessions,
            kv_budget_bytes=self.kv_budget_bytes,
            max_batch=self.max_batch,
            batch_wait_s=self.batch_wait_ms / 1000,
            lanes=self.verify_lanes,
            rescue=bool(self.rescue_draft),
            kv=self.kv_settings(),
        )
        if self.prefill_threads < 0:
            raise InvalidArgument(
                f"--prefill-threads must be >= 0 (0 = auto), got {self.prefill_threads}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")


def check_settings(
    *,
    max_sessions: int,
    max_cached_sessions: int,
    kv_budget_bytes: int | None,
    max_batch: int,
    batch_wait_s: float,
    lanes: int,
    rescue: bool,
    kv: KVSettings | None = None,
) -> None:
    """Raise ``InvalidArgument`` naming the first engine setting out of range (and its flag).

    The one home of these rules: ``OracleConfig.validate`` and the engine's constructor
    (``oracle_service.engine``, also built without a config) both call it.
    ``rescue``: the engine has a rescue draft, which needs one verify lane.
    ``kv_budget_bytes``: None = auto; ``kv``: the other KV settings.
    """
    if max_sessions < 1:
        raise InvalidArgument(f"--max-sessions must be >= 1, got {max_sessions}")
    if max_cached_sessions < 0:
        raise InvalidArgument(f"--max-cached-sessions must be >= 0, got {max_cached_sessions}")
    if kv_budget_bytes is not None and kv_budget_bytes < 0:
        raise InvalidArgument(f"--kv-budget-mb must be >= 0, got {kv_budget_bytes / MIB:g}")
    if kv is not None and not 0 < kv.memory_fraction <= 1:
        raise InvalidArgument(f"--gpu-memory-fraction must be in (0, 1], got {kv.memory_fraction}")
    least = max(max_batch, MAX_ROW_TOKENS + 1)
    if kv is not None and kv.batch_invariant and kv.verify_tokens < least:
        raise InvalidArgument(
            f"--verify-tokens must be at least {least} (--max-batch and one block of "
            f"{MAX_ROW_TOKENS} tokens), got {kv.verify_tokens}"
        )
    if max_batch < 1:
        raise InvalidArgument(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= batch_wait_s <= MAX_BATCH_WAIT_S:
        raise InvalidArgument(
            f"--batch-wait-ms must be in [0, {MAX_BATCH_WAIT_S * 1000:g}], got "
            f"{batch_wait_s * 1000:g}"
        )
    if not 0 <= lanes <= MAX_VERIFY_LANES:
        raise InvalidArgument(
            f"--verify-lanes must be in [0, {MAX_VERIFY_LANES}] (0 = auto), got {lanes}"
        )
    if rescue and lanes > 1:
        raise InvalidArgument(
            f"--rescue-draft needs one verify lane, got {lanes}: set --verify-lanes to 0 or 1, "
            "or drop the rescue draft"
        )
