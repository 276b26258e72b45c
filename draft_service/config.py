"""The draft service's configuration: flags, SPECDEC_* variables, defaults (in that order)."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.config import QUANTIZE_CHOICES, SecuritySettings, TelemetrySettings, setting
from specdec.core.errors import InvalidArgument
from specdec.core.types import MAX_BRANCHES, SPECULATION_DEFAULTS, Speculation

_DEFAULTS = SPECULATION_DEFAULTS


@dataclass
class DraftConfig(SecuritySettings, TelemetrySettings):
    """specdec draft: dials OUT to the gateway and to the oracles it is assigned."""

    gateway: str = setting(
        "localhost:50051",
        "gateway address to register with; several replicas: a,b or a DNS name resolving "
        "to each (a headless Service)",
    )
    model: str = setting("", "draft model folder or hub id (default: the demo draft)")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    dtype: str = setting("float32", "float32, bfloat16 or float16")
    draft_id: str = setting("", "worker id (default: draft-<hostname>-<pid>)")
    max_sessions: int = setting(8, "turns drafted at once; the gateway sends no more")
    max_cached_sessions: int = setting(64, "sessions whose draft KV cache is kept between turns")
    max_support: int = setting(32, "largest support of a sampled draft distribution q")
    draft_ahead: bool = setting(
        _DEFAULTS.draft_ahead,
        "draft the next block while the current one is verified (hides the round trip)",
    )
    pipeline_depth: int = setting(
        _DEFAULTS.pipeline_depth,
        "blocks in flight to the oracle at once: 2 sends the block drafted ahead before the "
        "verdict it depends on, hiding the round trip when the guess is right (1 = off)",
    )
    branches: int = setting(
        _DEFAULTS.branches,
        "greedy: also draft ahead for this many likely corrections of each block in flight, "
        f"so a rejection too finds its next block ready (0 = off, at most {MAX_BRANCHES})",
    )
    rescue: bool = setting(
        _DEFAULTS.rescue,
        "greedy: let the oracle draft the next block itself after a verdict that no block "
        "drafted ahead extends, where it has a rescue draft (saves a round trip)",
    )
    quantize: str = setting(
        "auto",
        "int8 weights for the draft's Linear layers: faster steps on a CPU, the same output "
        "(the oracle verifies every token). auto = where it runs (CPU, float32), none = off",
        choices=QUANTIZE_CHOICES,
    )
    lean_forward: bool = setting(
        True,
        "draft Llama-family models (llama, mistral, qwen2) on specdec's lean forward, "
        "without HF's per-call overhead (off: HF's forward)",
    )
    bench_acceptance: float = setting(
        -1.0,
        "BENCHMARKS ONLY: instead of the model, propose the oracle's greedy output (from "
        "--bench-reference) with this per-token acceptance, e.g. 0.8 (-1 = off)",
    )
    bench_reference: str = setting(
        "", "BENCHMARKS ONLY: JSON of the oracle's greedy outputs per prompt (a k = 0 pass)"
    )
    bench_step_ms: float = setting(
        0.0, "BENCHMARKS ONLY: with --bench-acceptance, the draft's cost per proposed token, ms"
    )
    verify_timeout_s: float = setting(
        30.0, "seconds to wait for each verdict (and the prefill) before failing the turn over"
    )
    health_host: str = setting("127.0.0.1", "interface of the local health endpoint")
    health_port: int = setting(50053, "port of the local health endpoint (0 = any, -1 = off)")
    torch_threads: int = setting(0, "CPU threads for the model (0 = torch's default)")
    log_level: str = setting("info", "debug, info, warning or error")

    def speculation(self) -> Speculation:
        """This draft's speculation settings: what an assignment leaves unset."""
        return Speculation(
            draft_ahead=self.draft_ahead,
            pipeline_depth=self.pipeline_depth,
            branches=self.branches,
            rescue=self.rescue,
        )

    def validate(self) -> None:
        """Raise ``InvalidArgument`` naming the first setting out of range."""
        self.speculation().validate(lambda name: "--" + name.replace("_", "-"))
        if self.bench_acceptance != -1.0:
            if not 0.0 <= self.bench_acceptance <= 1.0:
                raise InvalidArgument(
                    f"--bench-acceptance must be in [0, 1] (or -1: off), got "
                    f"{self.bench_acceptance}"
                )
            if not self.bench_reference:
                raise InvalidArgument("--bench-acceptance needs --bench-reference")
            if self.bench_step_ms < 0:
                raise InvalidArgument(f"--bench-step-ms must be >= 0, got {self.bench_step_ms}")
        if self.verify_timeout_s <= 0:
            raise InvalidArgument(f"--verify-timeout-s must be > 0, got {self.verify_timeout_s}")
