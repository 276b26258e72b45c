"""The oracle's KV memory: which pool its sessions' caches live in, how large, and who gets in.

Layouts (``--kv-layout``, with ``--static-kv`` auto/on/off deciding whether there is a
pool at all):

* ``paged`` (default): KV blocks taken as sessions grow (``specdec.engine.paged_kv``).
  Its size: ``--kv-budget-mb`` when set, else what ``--gpu-memory-fraction`` of the GPU
  leaves after the weights, the CUDA context, other processes, and the measured
  activations and graph pools (vLLM's ``gpu_memory_utilization``).
* ``slots``: one full-context slot per session, as many as the budget holds
  (``specdec.engine.static_kv``); the sessions beyond them use HF caches.

Admission rule (paged): an opening stream reserves the blocks its turn can reach,
prompt + max_new_tokens + one block of k + 1 tokens. When the unreserved free blocks do
not cover it, idle sessions (no open stream, no job running) are evicted, least recently
used first, until they do; when even that is not enough, the stream is refused with
RESOURCE_EXHAUSTED before any prefill, and no other session is touched. A stream never
runs out of blocks within its reservation; the reservation ends with the stream.
"""

from __future__ import annotations

from collections.abc import Callable

from specdec.core.errors import ResourceExhausted
from specdec.engine.kv_options import KVSettings
from specdec.engine.models import LoadedModel
from specdec.engine.paged_kv import PagedPool, paged_pool_for
from specdec.engine.static_kv import SlotPool, slot_pool_for

DEFAULT_BUDGET_BYTES = 1 << 30  # idle sessions' HF caches, or slots, when no budget is given

KVPool = PagedPool | SlotPool


def make_pool(model: LoadedModel, kv: KVSettings, *, max_rows: int, lanes: int) -> KVPool | None:
    """The sessions' KV pool (None: every session on an HF cache)."""
    if kv.layout == "slots":
        budget = DEFAULT_BUDGET_BYTES if kv.budget_bytes is None else kv.budget_bytes
        return slot_pool_for(
            model, kv.static_kv, max_slots=max_rows, max_rows=max_rows, budget_bytes=budget,
            cuda_graphs=kv.cuda_graphs, lanes=lanes,
        )  # fmt: skip
    return paged_pool_for(
        model, kv.static_kv, max_rows=max_rows, cuda_graphs=kv.cuda_graphs, lanes=lanes,
        memory_fraction=kv.memory_fraction, budget_bytes=kv.budget_bytes,
        batch_invariant=kv.batch_invariant, verify_tokens=kv.verify_tokens,
        attention=kv.attention,
    )  # fmt: skip


def store_budget(pool: KVPool | None, kv: KVSettings) -> int:
    """Bytes of KV the session store keeps for idle sessions before it evicts by LRU: a
    paged pool's whole size (it evicts on demand instead), else the budget."""
    if isinstance(pool, PagedPool):
        return pool.kv_bytes
    return DEFAULT_BUDGET_BYTES if kv.budget_bytes is None else kv.budget_bytes


def reserve_turn(
    reserve: Callable[[], bool], evict: Callable[[Callable[[], bool]], object], what: str
) -> None:
    """Reserve a stream's KV (``reserve``), evicting idle sessions when short (``evict``
    until ``reserve`` succeeds); RESOURCE_EXHAUSTED, naming ``what``, if still short."""
    if reserve():
        return
    evict(reserve)
    if not reserve():
        raise ResourceExhausted(
            f"the oracle's KV memory cannot hold this stream ({what}): open streams hold or "
            "reserve the rest and no idle session is left to evict; retry later, ask for "
            "fewer max_new_tokens, use another oracle, or give this one more memory "
            "(--gpu-memory-fraction, --kv-budget-mb)"
        )
