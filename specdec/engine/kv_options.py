"""The oracle's KV settings as plain data (no torch import: the config reads them).

What each one means: ``oracle_service.kv_pool`` (layouts, budget, admission) and
``specdec.engine.paged_kv`` (batch invariance, attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.core.types import MAX_SPECULATIVE_TOKENS

LAYOUTS = ("paged", "slots")
ATTENTIONS = ("auto", "sdpa", "chunked")
MAX_ROW_TOKENS = MAX_SPECULATIVE_TOKENS + 1  # committed[-1] and a block of at most k tokens
DEFAULT_VERIFY_TOKENS = 128  # M of every forward with batch invariance
PREFILL_THREADS_FROM = 32  # tokens: a CPU prefill this long runs on --prefill-threads


@dataclass(frozen=True)
class KVSettings:
    """The oracle's KV settings (``OracleConfig``'s flags of the same names).

    budget_bytes: None = auto (``oracle_service.kv_pool``).
    """

    static_kv: str = "off"
    layout: str = "paged"
    budget_bytes: int | None = None
    memory_fraction: float = 0.9
    cuda_graphs: bool = True
    batch_invariant: bool = True
    verify_tokens: int = DEFAULT_VERIFY_TOKENS
    attention: str = "auto"
    lean_forward: bool = True


def turn_positions(prompt_tokens: int, max_new_tokens: int) -> int:
    """KV positions a turn can reach: its prompt, its output, and the last verify's block."""
    return prompt_tokens + max_new_tokens + MAX_ROW_TOKENS
