"""Verification of many sessions' blocks in one forward pass of the oracle.

Each item is one session's verify (its cache, committed tokens, block, sampling,
seed), exactly what ``Oracle.verify_timed`` takes. The batch is laid out the way
HF batched generation with left padding is:

    row b inputs     [committed_b[-1], x_0, ..., x_{k_b-1}] + pads        n_b = k_b + 1 real
    queries          [B, N],  N = max n_b; pads come after the real queries, so
                     causality alone hides them from the real ones; their logits are dropped
    past KV          [B, H, L, D],  L = max L_b; row b's L_b = len(committed_b) - 1
                     cached positions right-aligned, zeros on the left
    attention_mask   [B, L + N]: 0 on row b's left pads and its pad queries, else 1
    position_ids     [B, N] = L_b + arange(n_b), then L_b + n_b - 1 repeated on pads

so row b's query i sits at its own absolute position L_b + i and attends exactly
to its own L_b + i + 1 tokens, as in the per-session forward. The mask zeroes the
pads' attention weights (exp(-inf) = 0), so a row's logits are the per-session
ones up to float rounding (the reductions run over a different length). After
the forward, row b's cache becomes its own KV (the L_b + n_b positions of its
row), ``verify_block`` judges logits[b, :n_b] with the same seed and positions
as the per-session path (its randomness depends only on (seed, position)), and
the cache is rolled back exactly as ``Oracle.verify_timed`` does.

Rows fall back to per-session verification (``Oracle.verify_timed``) when:

* the model is one where padding may change results (``batch_unsupported``):
  - a sliding window shorter than the context, or chunked attention: the window
    is enforced by index arithmetic (the mask's q_idx - kv_idx, a sliding cache
    layer's kv offset, or a kernel's own window on unpadded positions). Left
    padding shifts a row's queries and keys alike, so the mask-based path keeps
    distances (the tiny mistral of the tests does match), but that is not
    guaranteed across transformers versions and kernels, so these verify row by row;
  - layers that are not all full attention (sliding, recurrent or linear layers
    keep state that cannot be left-padded or cropped per row);
  - an attention implementation other than eager/sdpa (padding not checked here);
* a row's cache is not plain full-attention layers (``SequenceCache.layer_kv``);
* the batched forward fails (e.g. out of memory): each row is then retried alone, so
  every error belongs to its own session. The rows' caches are only read by the
  batched forward (it runs on a separate batch cache), so a forward that died
  leaves them as they were, holding committed[:-1].
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as replace_fields
from typing import cast

import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock, Verdict
from specdec.core.verifier import greedy_verdict, validate_block, verify_block, with_logprobs
from specdec.engine.kv_cache import SequenceCache, dynamic_cache_of, forward_arguments
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle, PrefillResult, VerifyTiming
from specdec.engine.paged_kv import PagedCache, PagedPool
from specdec.engine.static_kv import SlotCache, SlotPool

log = logging.getLogger(__name__)

# Attention implementations whose padding mask has been checked against per-row forwards.
BATCHED_ATTENTION = frozenset({"eager", "sdpa"})

KV = list[tuple[torch.Tensor, torch.Tensor]]
# One row's result: what ``Oracle.verify_timed`` gives its item, or the error that refused it.
RowResult = tuple[Verdict, VerifyTiming] | Exception


@dataclass(frozen=True)
class BatchItem:
    """One session's verify: what ``Oracle.verify_timed`` takes."""

    cache: SequenceCache
    committed: Sequence[int]
    block: DraftBlock
    params: SamplingParams
    seed: int


@dataclass
class BatchVerification:
    """results[i]: item i's (verdict, timing), or the error that refused it (its cache intact).

    forward_rows: rows that went through the one batched forward (0: every row ran alone).
    fallback: why the rows ran alone, when they did and there was more than one.
    """

    results: list[RowResult] = field(default_factory=list)
    forward_rows: int = 0
    fallback: str | None = None


def batch_unsupported(loaded: LoadedModel) -> str | None:
    """Why ``loaded`` cannot run padded (or holed) rows in one forward, or None if it can."""
    model = loaded.model
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    if isinstance(window, int) and window < loaded.max_context:
        return f"sliding window of {window} < context of {loaded.max_context}"
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return f"layer types {sorted(set(layer_types))} are not all full attention"
    if getattr(text, "attention_chunk_size", None):
        return "chunked attention"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in BATCHED_ATTENTION:
        return f"attention implementation {attention!r} is not one of {sorted(BATCHED_ATTENTION)}"
    parameters = inspect.signature(model.forward).parameters
    for name in ("attention_mask", "position_ids"):
        if name not in parameters:
            return f"the forward takes no {name}"
    return None


def verify_batch(oracle: Oracle, items: Sequence[BatchItem]) -> BatchVerification:
    """Verify every item's block, in one forward pass where possible (see the module doc).

    Each item's outcome is what ``oracle.verify_timed`` would give it: the same
    verdict (greedy: identical tokens; sampled: the same draws) and its cache left
    holding the new committed[:-1]; or its error, with the cache as it was (or reset,
    when its own prefill died). The items must belong to different sessions (no two
    share a cache). A row's timing: its own prefill, the shared forward, and
    verify_ns = the whole batch (every row's verdict comes out together).

    Rows on the oracle's KV pool (``PagedCache`` blocks or ``SlotCache`` slots) share one
    forward over the pool; the others share one over their HF caches.
    """
    caches = {id(item.cache) for item in items}
    if len(caches) != len(items):
        raise InvalidArgument("the items of a batch must have different caches (sessions)")
    slotted = [i for i, item in enumerate(items) if _pooled(oracle, item.cache)]
    if not slotted:
        return _verify_dynamic(oracle, items)
    dynamic = sorted(set(range(len(items))) - set(slotted))
    parts = [(slotted, _verify_slotted(oracle, [items[i] for i in slotted]))]
    if dynamic:
        parts.append((dynamic, _verify_dynamic(oracle, [items[i] for i in dynamic])))
    results: list[RowResult | None] = [None] * len(items)
    for indices, part in parts:
        for index, result in zip(indices, part.results, strict=True):
            results[index] = result
    fallback = next((part.fallback for _, part in parts if part.fallback), None)
    forward_rows = sum(part.forward_rows for _, part in parts)
    return BatchVerification(_settled(results), forward_rows, fallback)


def _verify_slotted(oracle: Oracle, items: Sequence[BatchItem]) -> BatchVerification:
    """Items on the KV pool: one ``forward_rows`` of the pool (CUDA graphs on a GPU)."""
    start = time.perf_counter_ns()
    results: list[RowResult | None] = [None] * len(items)
    prefills = _prefill_all(oracle, items, results)
    rows = list(prefills)
    pool = oracle.slots
    fallback: str | None = None
    forward = None
    if rows and pool is not None:
        try:
            inputs = [[items[index].committed[-1], *items[index].block.token_ids] for index in rows]
            if isinstance(pool, PagedPool):
                forward = pool.forward_rows(
                    [cast(PagedCache, items[index].cache) for index in rows], inputs
                )
            else:
                forward = pool.forward_rows([_slot_cache(items[index]) for index in rows], inputs)
        except Exception as exc:  # the slots' kept positions are untouched: verify alone
            log.warning("verify of %d slot rows failed (%s); verifying one by one", len(rows), exc)
            fallback = f"the slot forward failed: {type(exc).__name__}: {exc}"
    if forward is None:
        return _one_by_one(oracle, items, prefills, results, fallback)
    verdicts = _judge(items, rows, forward.logits, results)
    for index, verdict in verdicts.items():
        item = items[index]
        assert isinstance(item.cache, PagedCache | SlotCache)
        # Keep committed[-1] and the accepted draft tokens, already written in the slot.
        item.cache.adopt([item.committed[-1], *item.block.token_ids[: verdict.num_accepted]])
    _record_timings(results, verdicts, prefills, forward.forward_ns, time.perf_counter_ns() - start)
    return BatchVerification(_settled(results), len(rows), None)


def _pooled(oracle: Oracle, cache: SequenceCache) -> bool:
    """Whether ``cache`` lives in the oracle's KV pool."""
    if isinstance(oracle.slots, PagedPool):
        return isinstance(cache, PagedCache) and cache.pool is oracle.slots
    return isinstance(oracle.slots, SlotPool) and isinstance(cache, SlotCache)


def _slot_cache(item: BatchItem) -> SlotCache:
    cache = item.cache
    assert isinstance(cache, SlotCache) and cache.slot is not None, cache
    return cache


def _verify_dynamic(oracle: Oracle, items: Sequence[BatchItem]) -> BatchVerification:
    """Items on HF caches: one padded forward over copies of their KV (the module doc)."""
    reason = batch_unsupported(oracle.model) if len(items) > 1 else None
    if len(items) <= 1 or reason is not None:
        return BatchVerification([_verify_alone(oracle, item) for item in items], 0, reason)

    start = time.perf_counter_ns()
    results: list[RowResult | None] = [None] * len(items)
    prefills = _prefill_all(oracle, items, results)
    rows = list(prefills)
    if len(rows) == 1:
        return _one_by_one(oracle, items, prefills, results, None)
    fallback: str | None = None
    forward: BatchForward | None = None
    try:
        forward = batch_forward(oracle, [items[index] for index in rows])
    except Exception as exc:
        log.warning(
            "batched verify of %d rows failed (%s); verifying them one by one", len(rows), exc
        )
        fallback = f"the batched forward failed: {type(exc).__name__}: {exc}"
    if forward is None:
        return _one_by_one(oracle, items, prefills, results, fallback)
    verdicts = _judge(items, rows, forward.logits, results)
    for row, index in enumerate(rows):
        if index in verdicts:
            item = items[index]
            # The cache keeps committed[-1] and the accepted draft tokens (the rejected tail
            # is never stored): the state the per-session verify leaves after its rollback.
            kept = [item.committed[-1], *item.block.token_ids[: verdicts[index].num_accepted]]
            item.cache.replace_kv([*item.cache.tokens, *kept], forward.row_kv(row, len(kept)))
    _record_timings(results, verdicts, prefills, forward.forward_ns, time.perf_counter_ns() - start)
    return BatchVerification(_settled(results), len(rows), None)


def _one_by_one(
    oracle: Oracle,
    items: Sequence[BatchItem],
    prefills: dict[int, PrefillResult],
    results: list[RowResult | None],
    fallback: str | None,
) -> BatchVerification:
    """Every prefilled item verified alone, its prefill counted as its own."""
    for index, prefill in prefills.items():
        results[index] = _verify_alone(oracle, items[index], prefill)
    return BatchVerification(_settled(results), 0, fallback)


def _prefill_all(
    oracle: Oracle, items: Sequence[BatchItem], results: list[RowResult | None]
) -> dict[int, PrefillResult]:
    """Each item's cache brought to committed[:-1]; an item whose prefill fails gets its error."""
    prefills: dict[int, PrefillResult] = {}
    for index, item in enumerate(items):
        try:
            prefills[index] = _prefill(oracle, item)
        except Exception as exc:  # its own error; prefill resets a cache it broke
            results[index] = exc
    return prefills


def _judge(
    items: Sequence[BatchItem],
    rows: Sequence[int],
    logits: torch.Tensor,
    results: list[RowResult | None],
) -> dict[int, Verdict]:
    """Verdicts of items[rows[r]] from logits [R, N, V]; an item that fails gets its error."""
    # Greedy rows need only the argmax: one reduction and one transfer for all of them.
    greedy = [row for row, index in enumerate(rows) if items[index].params.greedy]
    targets = logits[greedy].argmax(dim=-1).tolist() if greedy else []  # [G, N]
    target_of = dict(zip(greedy, targets, strict=True))
    verdicts: dict[int, Verdict] = {}
    for row, index in enumerate(rows):
        item = items[index]
        k = len(item.block.token_ids)
        rows_logits = logits[row, : k + 1]
        try:
            if row in target_of:
                verdict = greedy_verdict(target_of[row], item.block)
            else:
                # Row i predicts block position i, at absolute position len(committed) + i.
                verdict = verify_block(
                    rows_logits, item.block, item.params, len(item.committed), item.seed
                )
            verdicts[index] = with_logprobs(verdict, rows_logits, item.block, item.params)
        except Exception as exc:  # its own error; its cache still holds committed[:-1]
            results[index] = exc
    return verdicts


def _record_timings(
    results: list[RowResult | None],
    verdicts: dict[int, Verdict],
    prefills: dict[int, PrefillResult],
    forward_ns: int,
    verify_ns: int,
) -> None:
    """Each judged item's outcome: its verdict, its own prefill and the shared forward."""
    for index, verdict in verdicts.items():
        prefill = prefills[index]
        results[index] = (
            verdict,
            VerifyTiming(
                prefill_ns=prefill.prefill_ns,
                forward_ns=forward_ns,
                verify_ns=verify_ns,
                prefill_computed=prefill.computed,
            ),
        )


def _prefill(oracle: Oracle, item: BatchItem) -> PrefillResult:
    """The checks of ``Oracle.verify_timed``, then the cache brought to committed[:-1]."""
    k = len(item.block.token_ids)
    validate_block(item.block, oracle.vocab_size)
    if len(item.committed) + k > oracle.max_context:
        raise InvalidArgument(
            f"{len(item.committed)} committed + {k} draft tokens exceed the oracle's context of "
            f"{oracle.max_context}; send a shorter block"
        )
    prefill = oracle.prefill(item.cache, item.committed)
    assert len(item.cache) == len(item.committed) - 1, (len(item.cache), len(item.committed))
    return prefill


def _verify_alone(
    oracle: Oracle, item: BatchItem, prefill: PrefillResult | None = None
) -> RowResult:
    """``oracle.verify_timed`` of one item; ``prefill``: the one already done for it."""
    try:
        verdict, timing = oracle.verify_timed(
            item.cache, item.committed, item.block, item.params, item.seed
        )
    except Exception as exc:
        return exc
    if prefill is not None:  # its cache was already in sync: count that prefill as its own
        timing = replace_fields(
            timing,
            prefill_ns=prefill.prefill_ns + timing.prefill_ns,
            verify_ns=prefill.prefill_ns + timing.verify_ns,
            prefill_computed=prefill.computed + timing.prefill_computed,
        )
    return verdict, timing


def _settled(results: list[RowResult | None]) -> list[RowResult]:
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


@dataclass(frozen=True)
class BatchForward:
    """The batch's one forward.

    logits: float32 [B, N, V]; row b's first n_b = k_b + 1 rows are its block's logits.
    keys, values: the batch's KV, [layers, B, H, L + N, D] (row b's positions are
        [L - L_b, L + n_b)); ``row_kv`` copies a row's out.
    lengths: L_b, the cached positions of each row before the forward.
    forward_ns: wall time of the forward.
    """

    logits: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    lengths: list[int]
    forward_ns: int

    def row_kv(self, row: int, new: int) -> KV:
        """Row ``row``'s own KV, per layer [1, H, L_b + new, D]: its cached positions and its
        first ``new`` new ones, copied apart from the batch (two kernels for all layers)."""
        past = self.keys.shape[-2] - self.logits.shape[1]  # L
        span = slice(past - self.lengths[row], past + new)
        keys = self.keys[:, row, :, span].clone()  # [layers, H, L_b + new, D]
        values = self.values[:, row, :, span].clone()
        return [(keys[i : i + 1], values[i : i + 1]) for i in range(keys.shape[0])]


@torch.inference_mode()
def batch_forward(oracle: Oracle, items: Sequence[BatchItem]) -> BatchForward:
    """One forward over the items' inputs [committed[-1], *block]; reads their caches only.

    Every item's cache must hold its committed[:-1] (``Oracle.prefill``). Raises
    ``ValueError`` when a cache is not plain full attention or the rows' layers do not
    line up; whatever the forward itself raises propagates.
    """
    kv: list[KV] = []
    for item in items:
        if len(item.cache) != len(item.committed) - 1:
            raise ValueError(
                f"a cache holds {len(item.cache)} tokens, not committed[:-1] "
                f"({len(item.committed) - 1}): prefill it first"
            )
        layers = item.cache.layer_kv()
        if layers is None:
            raise ValueError(f"{item.cache!r} is not plain full-attention layers")
        kv.append(layers)
    model = oracle.model
    device = model.device
    batch = len(items)
    lengths = [len(item.committed) - 1 for item in items]  # L_b: cached positions per row
    inputs = [[item.committed[-1], *item.block.token_ids] for item in items]
    widths = [len(row) for row in inputs]  # n_b = k_b + 1
    past, width = max(lengths), max(widths)  # L, N

    input_ids = torch.zeros(batch, width, dtype=torch.long)  # [B, N]; pads are token 0
    position_ids = torch.empty(batch, width, dtype=torch.long)  # [B, N]
    attention_mask = torch.ones(batch, past + width, dtype=torch.long)  # [B, L + N]
    steps = torch.arange(width)
    for b, (row, length) in enumerate(zip(inputs, lengths, strict=True)):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        # Pad queries repeat the last real position: in range for learned position tables.
        position_ids[b] = length + steps.clamp(max=len(row) - 1)
        attention_mask[b, : past - length] = 0
        attention_mask[b, past + len(row) :] = 0

    cache = dynamic_cache_of(_left_padded(kv, lengths, past) if past else [])
    cache_argument, _ = forward_arguments(model)
    forward_start = time.perf_counter_ns()
    output = model.model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=True,
        **{cache_argument: cache},
    )
    logits = output.logits.float()  # [B, N, V]
    assert logits.shape == (batch, width, model.vocab_size), tuple(logits.shape)
    keys = torch.stack([layer.keys for layer in cache.layers])  # [layers, B, H, L + N, D]
    values = torch.stack([layer.values for layer in cache.layers])
    assert keys.shape[1] == batch and keys.shape[-2] == past + width, tuple(keys.shape)
    assert values.shape[:2] == keys.shape[:2] and values.shape[-2] == past + width
    if logits.device.type == "cuda":
        torch.cuda.current_stream(logits.device).synchronize()  # this thread's stream
    return BatchForward(logits, keys, values, lengths, time.perf_counter_ns() - forward_start)


def _left_padded(kv: list[KV], lengths: list[int], past: int) -> KV:
    """Per layer (keys, values) [B, H, L, D]: row b's L_b positions right-aligned, zeros left.

    One concatenation of every row's layers behind a zero slot, then one gather
    (index_select) for keys and one for values: a fixed number of kernels however
    many rows and layers there are. Raises ``ValueError`` when the rows' layers do
    not line up (layer count, heads, head size, dtype, device).
    """
    filled = [row for row in kv if row]
    template = filled[0]
    num_layers = len(template)
    keys0, values0 = template[0]
    for row in filled:
        if len(row) != num_layers:
            raise ValueError(f"rows have {len(row)} and {num_layers} layers")
        for keys, values in row:
            if (
                keys.shape[1] != keys0.shape[1]
                or keys.shape[-1] != keys0.shape[-1]
                or values.shape[-1] != values0.shape[-1]
                or keys.dtype != keys0.dtype
                or values.dtype != values0.dtype
                or keys.device != keys0.device
            ):
                raise ValueError("the rows' layers differ in heads, head size, dtype or device")
    heads, key_dim, value_dim = keys0.shape[1], keys0.shape[-1], values0.shape[-1]

    # Flat layout along the sequence axis: [zero slot, row 0 layer 0, row 0 layer 1, ...,
    # row 1 layer 0, ...]; rows with nothing cached contribute nothing.
    sizes = torch.tensor(lengths, dtype=torch.long)  # [B] L_b
    counts = sizes * num_layers
    starts = 1 + torch.cumsum(counts, 0) - counts  # [B] flat index of row b, layer 0, position 0
    rel = torch.arange(past)[None, :] - (past - sizes)[:, None]  # [B, L] position in row; <0: pad
    layer = torch.arange(num_layers)[:, None, None]  # [layers, 1, 1]
    flat = starts[None, :, None] + layer * sizes[None, :, None] + rel[None]  # [layers, B, L]
    index = torch.where(rel[None] >= 0, flat, 0).reshape(-1).to(keys0.device)  # pads -> slot 0

    def gather(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        zero = parts[0].new_zeros(1, heads, 1, dim)
        joined = torch.cat([zero, *parts], dim=2)  # [1, H, 1 + layers * sum L_b, D]
        padded = joined.index_select(2, index)  # [1, H, layers * B * L, D]
        # -> [layers, B, H, L, D]
        return padded.view(heads, num_layers, len(lengths), past, dim).permute(1, 2, 0, 3, 4)

    keys = gather([k for row in filled for k, _ in row], key_dim)
    values = gather([v for row in filled for _, v in row], value_dim)
    return [(keys[i], values[i]) for i in range(num_layers)]
