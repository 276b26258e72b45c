"""Paged KV for the oracle: blocks taken as sessions grow, one verify forward per batch.

A real oracle (7-8B parameters) is bound by reading its weights: a forward costs about
weight bytes / memory bandwidth whether it carries 1 token or 100, so a batch of
sessions should share one forward, and KV memory is what limits how many sessions run.
``SlotPool`` (``static_kv``) preallocates the whole context for every session (512 MiB
at 4,096 positions of an 8B model); here, as in vLLM's PagedAttention:

* ``PagedPool`` holds, per layer, keys and values [blocks + lanes, BLOCK_SIZE, H_kv, D].
  A session's ``PagedCache`` owns a list of blocks (its block table); position p lives
  in block table[p // BLOCK_SIZE] at offset p % BLOCK_SIZE. A cache takes a block when
  it grows into it and gives its blocks back when released. The last blocks are
  scratch, one per lane: padding writes go there.
* Admission (``PagedCache.reserve``): an opening stream reserves the blocks its turn can
  reach (prompt + max_new_tokens + one block's lookahead); the reservation is refused
  when the free blocks, less those reserved by other streams, do not cover it. Growing
  within a reservation never fails. The oracle then evicts idle sessions, least
  recently used first, and refuses the stream (RESOURCE_EXHAUSTED) only when that does
  not free enough (``oracle_service.engine``). Beyond its reservation a cache grows
  while free blocks last (the pool's ``reclaim`` hook evicts idle sessions first).
* One verify forward of R rows (session r: L_r cached tokens, n_r new ones) runs on a
  grid of B >= R rows x T >= max n_r query tokens (buckets), flattened to M tokens:

      ids, positions, writes   [M]       token, L_r + t, and the slot of the pool where its
                                         key/value goes (pads: the lane's scratch block)
      linear layers            [M, ...]  every projection and norm over M token rows
      attention                grid [B, T]: queries of the G = H / H_kv heads that share
                               a key/value head stacked as G*T queries of that head,
                               [B, H_kv, G*T, D], against the row's blocks gathered
                               [B, H_kv, W, D] (one copy per key/value head, none per
                               query head), under bias [B, 1, G*T, W]: query t sees
                               positions <= L_r + t

  so the weights are read once for the whole batch.
* Batch invariance (``batch_invariant``, the default): M is always ``verify_tokens``
  (pads after the grid), so every matmul has the same shape whatever the batch, and a
  GEMM's row i does not depend on the other rows; attention reduces over the row's own
  keys only (masked keys add exact zeros). A session's logits are then bit-identical
  alone or in any batch, so greedy output does not depend on the load. Batches that do
  not fit M tokens run as several forwards. Without it M = B x T (fewer FLOPs, but
  cuBLAS picks kernels by M, and rounding then depends on the batch).
* With CUDA graphs every (B, T, W) bucket is captured once (``capture_all``) and
  replayed (launch-bound models also time each row bucket's graph, to route a batch
  to a larger bucket when that replays faster); the graphs of a lane share one memory
  pool and write their logits into one buffer. Prefill runs the same forward on one
  row in chunks (``prefill_chunk`` tokens). On the CPU everything runs eagerly, with
  the same shapes.
* Lanes (as ``SlotPool``): forwards that run at once in their own threads and CUDA
  streams. They pay off for launch-bound models only; auto gives 2 lanes to models
  under LAUNCH_BOUND_BYTES of weights, 1 to larger ones (two forwards of an 8B model
  at once each read all the weights: 7.5 rows took 23 ms against 8.6 for one).

Only models the lean forward supports qualify (``lean_unsupported``).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from specdec.core.errors import InvalidArgument, ResourceExhausted
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.kv_options import ATTENTIONS, DEFAULT_VERIFY_TOKENS, MAX_ROW_TOKENS
from specdec.engine.lean_forward import LeanModel, lean_unsupported
from specdec.engine.models import LoadedModel
from specdec.engine.static_kv import (
    LanedPool,
    RowsForward,
    fastest_row_buckets,
    replay_seconds,
)

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # positions per KV block
ROW_TOKEN_BUCKETS = (1, 2, 3, 5, 9, 17, MAX_ROW_TOKENS)  # T of a verify grid (k + 1 rounded up)
FAST_PREFILL_BUCKETS = (64, 128, 256)  # T of a one-row prefill chunk without batch invariance
MIN_WIDTH = 256  # the smallest attended-width bucket, positions
ATTENTION_CHUNK = 64  # keys per step of ``chunked_attention``
LAUNCH_BOUND_BYTES = 1 << 30  # below this much weight, a forward is bound by kernel launches
DEFAULT_CPU_KV_BYTES = 1 << 30  # the pool on a CPU, unless a budget is given
GRAPH_POOL_MARGIN = 2.0  # graph memory pools, per lane, as a multiple of the measured peak
FIXED_OVERHEAD_BYTES = 512 << 20  # allocator fragmentation, cuBLAS workspaces, the unforeseen


def _bucket(value: int, buckets: Sequence[int]) -> int:
    return next(bucket for bucket in buckets if bucket >= value)


def _blocks(positions: int) -> int:
    return -(-positions // BLOCK_SIZE)


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of the model's parameters (what one forward reads at least once)."""
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None  # a view of the lane's output buffer (None: a prefill)


@dataclass
class _Lane:
    """One lane's scratch block, stream, static inputs, graphs and output buffer."""

    scratch: int
    stream: Any = None
    packed: Any = None  # the graphs' inputs, a _Grid's layout at the front
    out: Any = None  # [max grid tokens, V] float32: every verify graph's logits
    graphs: dict[tuple[int, int, int], _Graph] = field(default_factory=dict)
    memory_pool: Any = None


@dataclass
class _Grid:
    """One forward's layout, packed in one int64 tensor (one host-to-device copy):
    ids, positions, writes [M] each, then table [B, W / BLOCK_SIZE], then lengths [B]."""

    rows: int  # B
    tokens: int  # T
    width_blocks: int  # W / BLOCK_SIZE
    total: int  # M
    packed: torch.Tensor

    def parts(
        self, packed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, positions, writes, table, lengths): views of ``packed`` (this layout)."""
        m, rows, width = self.total, self.rows, self.width_blocks
        table_end = 3 * m + rows * width
        return (
            packed[:m],
            packed[m : 2 * m],
            packed[2 * m : 3 * m],
            packed[3 * m : table_end].view(rows, width),
            packed[table_end : table_end + rows],
        )


class PagedPool(LanedPool):
    """Paged keys/values of one model and the forward over them (module doc).

    num_blocks: KV blocks shared by all sessions (plus one scratch block per lane).
    max_rows: the most blocks one forward verifies. lanes: 0 = auto.
    batch_invariant, verify_tokens: see the module doc.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        *,
        max_rows: int = 16,
        cuda_graphs: bool = True,
        lanes: int = 0,
        batch_invariant: bool = True,
        verify_tokens: int = DEFAULT_VERIFY_TOKENS,
        attention: str = "auto",
    ) -> None:
        if attention not in ATTENTIONS:
            raise InvalidArgument(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if num_blocks < 0 or max_rows < 1 or lanes < 0:
            raise ValueError(
                f"a paged pool needs blocks >= 0, rows >= 1 and lanes >= 0, got {num_blocks}, "
                f"{max_rows}, {lanes}"
            )
        if batch_invariant and verify_tokens < max(max_rows, MAX_ROW_TOKENS + 1):
            raise InvalidArgument(
                f"--verify-tokens must be at least the max batch ({max_rows}) and "
                f"{MAX_ROW_TOKENS + 1}, got {verify_tokens}"
            )
        self.loaded = loaded
        self.lean = LeanModel(loaded)  # raises InvalidArgument for models that do not qualify
        self.max_rows = max_rows
        self.capacity = loaded.max_context + MAX_ROW_TOKENS
        self.device = loaded.device
        # auto: the fused kernel on a GPU, the batch-invariant chunked reference elsewhere.
        if attention == "auto":
            attention = "sdpa" if self.device.type == "cuda" else "chunked"
        self.attention = attention
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        launch_bound = weight_bytes(loaded) < LAUNCH_BOUND_BYTES
        self.launch_bound = launch_bound
        self.lanes = lanes or (2 if self.cuda_graphs and launch_bound else 1)
        self.batch_invariant = batch_invariant
        self.verify_tokens = verify_tokens if batch_invariant else 0
        self.prefill_buckets = (verify_tokens,) if batch_invariant else FAST_PREFILL_BUCKETS
        self.prefill_chunk = self.prefill_buckets[-1]
        self.max_row_blocks = _blocks(self.capacity)
        widths, width = [], MIN_WIDTH
        while width < self.capacity:  # steps of 1.5x, whole blocks: 256, 384, 576, ...
            widths.append(_blocks(width))
            width = _blocks(width * 3 // 2) * BLOCK_SIZE
        self.width_buckets = (*(w for w in widths if w < self.max_row_blocks), self.max_row_blocks)
        self.row_buckets = tuple(
            sorted({*(1 << i for i in range(max_rows.bit_length())), max_rows})
        )
        self.kv_heads, self.head_dim = self.lean.kv_heads, self.lean.head_dim
        itemsize = self.lean.embed.weight.element_size()
        layers = len(self.lean.layers)
        self.block_bytes = 2 * layers * BLOCK_SIZE * self.kv_heads * self.head_dim * itemsize
        self.vocab_size = loaded.vocab_size  # the width of the logits
        self._fastest: dict[tuple[int, int, int], int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        # Evicts idle sessions until available_blocks >= the argument (set by the oracle).
        self.reclaim: Callable[[int], object] | None = None
        self._allocate(num_blocks)

    # -- memory ------------------------------------------------------------------

    def _allocate(self, num_blocks: int) -> None:
        """(Re)allocate the KV of ``num_blocks`` blocks plus the lanes' scratch blocks;
        before any cache or graph exists."""
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # drop the old ones first
        shape = (num_blocks + self.lanes, BLOCK_SIZE, self.kv_heads, self.head_dim)
        weight = self.lean.embed.weight
        # Zeros: a masked position still enters attention as 0 x value (NaN would spread).
        self.kv = [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in self.lean.layers]
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a heap: the lowest block first
        self._promised = 0  # blocks reserved by caches beyond those they hold
        self._lanes = [self._new_lane(num_blocks + i) for i in range(self.lanes)]

    def _new_lane(self, scratch: int) -> _Lane:
        lane = _Lane(scratch)
        if self.device.type == "cuda":
            lane.stream = torch.cuda.Stream(self.device)
        if self.cuda_graphs:
            tokens = max(self.verify_tokens, self.max_rows * MAX_ROW_TOKENS, self.prefill_chunk)
            grid = max(self.max_rows * MAX_ROW_TOKENS, self.verify_tokens)

            def zeros(*shape: int) -> torch.Tensor:
                return torch.zeros(*shape, dtype=torch.long, device=self.device)

            lane.packed = zeros(3 * tokens + self.max_rows * (self.max_row_blocks + 1))
            lane.out = torch.zeros(grid, self.vocab_size, dtype=torch.float32, device=self.device)
        return lane

    @property
    def kv_bytes(self) -> int:
        """Bytes of the sessions' blocks (scratch blocks not counted)."""
        return self.num_blocks * self.block_bytes

    @property
    def free_blocks(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def available_blocks(self) -> int:
        """Free blocks that no open stream has reserved."""
        with self._lock:
            return len(self._free) - self._promised

    def new_cache(self) -> PagedCache:
        return PagedCache(self)

    def _reserve(self, cache: PagedCache, positions: int) -> bool:
        need = _blocks(min(positions, self.capacity))
        if need > self.num_blocks:  # no wait can make room for it
            raise InvalidArgument(
                f"this stream can reach {positions} positions ({need} KV blocks) but the "
                f"oracle's whole KV pool holds {self.num_blocks} blocks of {BLOCK_SIZE}; ask for "
                "fewer max_new_tokens or a shorter prompt"
            )
        with self._lock:
            held = len(cache.blocks)
            if need <= max(cache.reserved, held):
                return True
            more = (need - held) - max(0, cache.reserved - held)  # promised now - before
            if more > len(self._free) - self._promised:
                return False
            self._promised += more
            cache.reserved = need
            return True

    def _unreserve(self, cache: PagedCache) -> None:
        with self._lock:
            self._promised -= max(0, cache.reserved - len(cache.blocks))
            cache.reserved = 0

    def _grow(self, cache: PagedCache, positions: int) -> None:
        """Blocks for ``positions`` positions of ``cache``: its reservation first, then free
        blocks nobody reserved, then what ``reclaim`` frees; else ResourceExhausted."""
        if positions > self.capacity:
            raise InvalidArgument(f"{positions} positions exceed the KV capacity {self.capacity}")
        for attempt in range(2):
            with self._lock:
                need = _blocks(positions) - len(cache.blocks)
                if need <= 0:
                    return
                promised = max(0, cache.reserved - len(cache.blocks))
                if need <= promised + len(self._free) - self._promised:
                    self._promised -= min(need, promised)
                    cache.blocks.extend(heapq.heappop(self._free) for _ in range(need))
                    return
                wanted = need - promised  # from the free blocks nobody reserved
            if attempt == 0 and self.reclaim is not None:
                self.reclaim(wanted)  # evicts idle sessions (not under our lock)
        raise ResourceExhausted(
            f"the oracle's KV memory is full: a session needs {need} more blocks of "
            f"{BLOCK_SIZE} positions, {self.available_blocks} of {self.num_blocks} are "
            "available and no idle session holds any; retry later, or give the oracle more "
            "memory (--gpu-memory-fraction, --kv-budget-mb)"
        )

    def _shrink(self, cache: PagedCache, keep: int) -> None:
        """Give back ``cache``'s blocks beyond its first ``keep``."""
        with self._lock:
            if len(cache.blocks) <= keep:
                return
            before = max(0, cache.reserved - len(cache.blocks))
            for block in cache.blocks[keep:]:
                heapq.heappush(self._free, block)
            del cache.blocks[keep:]
            self._promised += max(0, cache.reserved - len(cache.blocks)) - before

    # -- forwards ------------------------------------------------------------------

    def _grid_tokens(self, rows: int, tokens: int) -> int:
        """M of a forward over a [rows, tokens] grid."""
        return self.verify_tokens if self.batch_invariant else rows * tokens

    def _fits(self, rows: int, tokens: int) -> bool:
        return not self.batch_invariant or rows * tokens <= self.verify_tokens

    def fits_one_forward(self, sizes: Sequence[int]) -> bool:
        """Whether rows of ``sizes`` tokens (k + 1 each) run as one forward (``_chunks``)."""
        if not sizes:
            return True
        if len(sizes) > self.max_rows:
            return False
        rows = _bucket(len(sizes), self.row_buckets)
        return self._fits(rows, _bucket(max(sizes), ROW_TOKEN_BUCKETS))

    def _chunks(self, sizes: Sequence[int]) -> list[list[int]]:
        """Rows (indices) of each forward: at most max_rows, and within M tokens."""
        chunks: list[list[int]] = [[]]
        tokens = 0
        for index, size in enumerate(sizes):
            grown = _bucket(max(tokens, size), ROW_TOKEN_BUCKETS)
            if chunks[-1] and (
                len(chunks[-1]) == self.max_rows
                or not self._fits(_bucket(len(chunks[-1]) + 1, self.row_buckets), grown)
            ):
                chunks.append([])
                grown = _bucket(size, ROW_TOKEN_BUCKETS)
            chunks[-1].append(index)
            tokens = grown
        return chunks

    @torch.inference_mode()
    def forward_rows(
        self, caches: Sequence[PagedCache], inputs: Sequence[Sequence[int]]
    ) -> RowsForward:
        """One verify over ``inputs[r]`` appended to ``caches[r]``'s cached tokens.

        Writes their keys/values after the cached ones without changing any cache's
        length (``PagedCache.adopt`` keeps what the verdict accepts). Every cache first
        gets the blocks its row writes to (ResourceExhausted, before any forward, when
        that fails). logits: [R, T, V], row r's first n_r positions its own.
        """
        assert len(inputs) == len(caches) and len({id(c) for c in caches}) == len(caches)
        assert all(1 <= len(row) <= MAX_ROW_TOKENS for row in inputs)
        start = time.perf_counter_ns()
        for cache, row in zip(caches, inputs, strict=True):
            cache.check_live()
            self._grow(cache, len(cache) + len(row))
        parts = []
        for chunk in self._chunks([len(row) for row in inputs]):
            logits = self._run([caches[i] for i in chunk], [inputs[i] for i in chunk], True)
            assert logits is not None
            parts.append(logits)
        if len(parts) == 1:
            logits = parts[0]
        else:  # rows of several forwards: padded to the widest T
            width = max(part.shape[1] for part in parts)
            logits = torch.zeros(len(inputs), width, parts[0].shape[2], device=parts[0].device)
            at = 0
            for part in parts:
                logits[at : at + part.shape[0], : part.shape[1]] = part
                at += part.shape[0]
        self._sync()
        return RowsForward(logits, time.perf_counter_ns() - start)

    @torch.inference_mode()
    def prefill(self, cache: PagedCache, tokens: Sequence[int]) -> None:
        """Append ``tokens``' keys/values to ``cache`` (no logits)."""
        self._extend(cache, tokens, want_logits=False)
        self._sync()

    def _extend(
        self, cache: PagedCache, tokens: Sequence[int], want_logits: bool
    ) -> torch.Tensor | None:
        """One row, in chunks: verify-sized when it fits, else prefill chunks; each chunk's
        tokens are adopted. -> logits [len(tokens), V] or None."""
        cache.check_live()
        self._grow(cache, len(cache) + len(tokens))
        outputs = []
        at = 0
        while at < len(tokens):
            left = len(tokens) - at
            size = left if left <= MAX_ROW_TOKENS else min(left, self.prefill_chunk)
            piece = [int(t) for t in tokens[at : at + size]]
            logits = self._run([cache], [piece], want_logits)
            cache.adopt(piece)
            if logits is not None:
                outputs.append(logits[0, :size])
            at += size
        return torch.cat(outputs) if want_logits else None

    def _run(
        self, caches: Sequence[PagedCache], inputs: Sequence[Sequence[int]], want_logits: bool
    ) -> torch.Tensor | None:
        """One forward (graph or eager) of rows that fit it; logits [R, T, V] or None."""
        count = len(caches)
        longest = max(len(row) for row in inputs)
        buckets = ROW_TOKEN_BUCKETS if longest <= MAX_ROW_TOKENS else self.prefill_buckets
        tokens = _bucket(longest, buckets)
        attended = max(len(cache) for cache in caches) + tokens
        width = _bucket(_blocks(attended), self.width_buckets)
        rows = _bucket(count, self.row_buckets)
        # Graphs of prefill chunks compute no logits: a long extend that wants them runs eagerly.
        graphed = self.cuda_graphs and (tokens <= MAX_ROW_TOKENS or not want_logits)
        if graphed:
            rows = self._fastest.get((rows, tokens, width), rows)
        grid = self._layout(caches, inputs, rows, tokens, width)
        if graphed:
            logits = self._replay(grid)
        else:
            parts = grid.parts(grid.packed.to(self.device))
            logits = self._forward(*parts, tokens, want_logits)
        if logits is None or not want_logits:
            return None
        return logits.view(rows, tokens, -1)[:count].clone()

    def _layout(
        self,
        caches: Sequence[PagedCache],
        inputs: Sequence[Sequence[int]],
        rows: int,
        tokens: int,
        width: int,
    ) -> _Grid:
        """The [rows, tokens] grid over ``width`` blocks (module doc), in plain Python: a few
        hundred ints, cheaper than tensor ops per row."""
        total = self._grid_tokens(rows, tokens)
        scratch = self._lane.scratch * BLOCK_SIZE
        ids = [0] * total
        positions = [t % tokens if t < rows * tokens else 0 for t in range(total)]
        # Pads write into the scratch block (spread over it; their values are never read).
        writes = [scratch + t % BLOCK_SIZE for t in range(total)]
        table = [self._lane.scratch] * (rows * width)
        lengths = [0] * rows
        for r, (cache, row) in enumerate(zip(caches, inputs, strict=True)):
            length, base, blocks = len(cache), r * tokens, cache.blocks
            for t in range(tokens):
                positions[base + t] = length + t
            for t, token in enumerate(row):
                spot = length + t
                ids[base + t] = int(token)
                writes[base + t] = blocks[spot // BLOCK_SIZE] * BLOCK_SIZE + spot % BLOCK_SIZE
            held = blocks[:width]
            table[r * width : r * width + len(held)] = held
            lengths[r] = length
        packed = torch.tensor([*ids, *positions, *writes, *table, *lengths], dtype=torch.long)
        return _Grid(rows, tokens, width, total, packed)

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        writes: torch.Tensor,
        table: torch.Tensor,
        lengths: torch.Tensor,
        tokens: int,
        want_logits: bool,
    ) -> torch.Tensor | None:
        """Logits [B*T, V] of a grid (B = table rows) flattened to M = len(ids) tokens."""
        lean = self.lean
        total, rows = ids.shape[0], table.shape[0]
        grid = rows * tokens
        heads, kv_heads, dim = lean.heads, lean.kv_heads, lean.head_dim
        group, half = heads // kv_heads, dim // 2
        width = table.shape[1] * BLOCK_SIZE
        hidden = lean.embed(ids[None])  # [1, M, hidden]
        cos, sin = lean.rotary(hidden, positions[None])  # [1, M, D]
        # rope(x) = x cos + (x2, x1) (-sin1, sin2), as in LeanModel.forward.
        cos = cos[0, :, None]  # [M, 1, D]
        sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)[:, None]
        hidden = hidden[0]  # [M, hidden]
        bias = _causal_bias(lengths, tokens, width, group, hidden.dtype)  # [B, 1, G*T, W]
        blocks = table.reshape(-1)  # [B * W / BLOCK_SIZE]
        for index, layer in enumerate(lean.layers):
            qkv = layer.qkv(layer.attention_norm(hidden)).view(total, -1, dim)
            qk = qkv[:, : heads + kv_heads]  # [M, H + H_kv, D]
            swapped = qk.unflatten(-1, (2, half)).flip(-2).flatten(-2)
            qk = torch.addcmul(qk * cos, swapped, sin)
            keys, values = self.kv[index]  # [blocks, BLOCK_SIZE, H_kv, D]
            keys.view(-1, kv_heads, dim).index_copy_(0, writes, qk[:, heads:])
            values.view(-1, kv_heads, dim).index_copy_(0, writes, qkv[:, heads + kv_heads :])
            row_keys = keys.index_select(0, blocks).view(rows, width, kv_heads, dim)
            row_values = values.index_select(0, blocks).view(rows, width, kv_heads, dim)
            # Query head h = kv * G + g: the G heads of key/value head kv as G*T queries.
            queries = (
                qk[:grid, :heads]
                .reshape(rows, tokens, kv_heads, group, dim)
                .permute(0, 2, 3, 1, 4)
                .reshape(rows, kv_heads, group * tokens, dim)
            )
            out = self._attend(
                queries, row_keys.transpose(1, 2), row_values.transpose(1, 2), bias, layer.scaling
            )  # [B, H_kv, G*T, D]
            out = (
                out.view(rows, kv_heads, group, tokens, dim)
                .permute(0, 3, 1, 2, 4)
                .reshape(grid, heads * dim)
            )
            if total > grid:  # the pads after the grid attend to nothing
                out = F.pad(out, (0, 0, 0, total - grid))
            hidden = hidden + layer.o(out)
            gate, up = layer.gate_up(layer.mlp_norm(hidden)).chunk(2, dim=-1)
            hidden = hidden + layer.down(layer.act(gate) * up)
        if not want_logits:
            return None
        return lean.logits(lean.norm(hidden))[:grid]  # every M rows: the same matmul shape

    def _attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v per row and key/value head: [B, H_kv, Q, D]."""
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=bias, scale=scale
            )
        return chunked_attention(queries, keys, values, bias, scale)

    # -- CUDA graphs -------------------------------------------------------------

    def _replay(self, grid: _Grid) -> torch.Tensor | None:
        """Replay (capture first) the graph of ``grid``'s bucket: verify buckets give logits,
        prefill buckets none."""
        lane = self._lane
        size = grid.packed.shape[0]
        lane.packed[:size].copy_(grid.packed)
        key = (grid.rows, grid.tokens, grid.width_blocks)
        graph = lane.graphs.get(key)
        if graph is None:
            graph = self._capture(lane, grid, grid.tokens <= MAX_ROW_TOKENS)
            lane.graphs[key] = graph
        graph.graph.replay()
        return graph.logits

    def _capture(self, lane: _Lane, grid: _Grid, want_logits: bool) -> _Graph:
        """The graph of ``grid``'s bucket: the forward over the lane's static inputs, its
        logits copied into the lane's output buffer."""
        static = grid.parts(lane.packed)
        tokens = grid.tokens
        out = lane.out[: grid.rows * tokens] if want_logits else None

        def forward() -> None:
            logits = self._forward(*static, tokens, want_logits)
            if out is not None and logits is not None:
                out.copy_(logits)

        return _Graph(self._record(lane, forward), out)

    def _shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens, width) bucket a forward may take."""
        shapes = []
        for width in self.width_buckets:
            for rows in self.row_buckets:
                for tokens in ROW_TOKEN_BUCKETS:
                    if self._fits(rows, tokens) and tokens <= width * BLOCK_SIZE:
                        shapes.append((rows, tokens, width))
            shapes += [(1, t, width) for t in self.prefill_buckets if t <= width * BLOCK_SIZE]
        return shapes

    def _packed_size(self, rows: int, tokens: int, width: int) -> int:
        return 3 * self._grid_tokens(rows, tokens) + rows * (width + 1)

    def _scratch_grid(self, rows: int, tokens: int, width: int) -> _Grid:
        """A grid of padding rows only (writes and reads in the lane's scratch block)."""
        return self._layout([], [], rows, tokens, width)

    def _capture_buckets(self, lane: _Lane) -> None:
        for rows, tokens, width in self._shapes():
            self._replay(self._scratch_grid(rows, tokens, width))

    def _buckets(self) -> str:
        return (
            f"rows {list(self.row_buckets)} x tokens {list(ROW_TOKEN_BUCKETS)} x width "
            f"{list(self.width_buckets)} blocks; prefill {list(self.prefill_buckets)}"
        )

    def _time_row_buckets(self, lane: _Lane) -> dict[tuple[int, int, int], int]:
        """(rows, tokens, width) -> the row bucket whose verify graph replays fastest.

        Only for launch-bound models: a weight-bound forward costs the same at any row
        count (the weights are read once), and timing an 8B model's 240 graphs took ~12 s
        of the oracle's start."""
        if not self.launch_bound:
            return {}
        took = {}
        for (rows, tokens, width), graph in lane.graphs.items():
            if graph.logits is None:
                continue  # a prefill graph
            # Its own padding grid in the inputs: another layout's ints would index anywhere.
            lane.packed[: self._packed_size(rows, tokens, width)].copy_(
                self._scratch_grid(rows, tokens, width).packed
            )
            took[rows, tokens, width] = replay_seconds(graph.graph, self._sync)
        return fastest_row_buckets(took, self.row_buckets)

    # -- sizing --------------------------------------------------------------------

    @torch.inference_mode()
    def activation_bytes(self) -> int:
        """Peak bytes of the largest forwards beyond the weights and KV (CUDA: measured by
        running them eagerly on scratch rows; elsewhere 0)."""
        if self.device.type != "cuda":
            return 0
        d = self.device
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
        base = torch.cuda.memory_allocated(d)
        widest = self.width_buckets[-1]
        verify = max(
            ((r, t) for r in self.row_buckets for t in ROW_TOKEN_BUCKETS if self._fits(r, t)),
            key=lambda shape: shape[0] * shape[1],
        )
        for rows, tokens, logits in ((*verify, True), (1, self.prefill_chunk, False)):
            grid = self._scratch_grid(rows, tokens, widest)
            self._forward(*grid.parts(grid.packed.to(d)), tokens, logits)
        torch.cuda.synchronize(d)
        return int(torch.cuda.max_memory_allocated(d) - base)


def chunked_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention [B, H, Q, D] in float32, over keys in chunks of ATTENTION_CHUNK positions,
    in order, with an online softmax (as flash attention):

        m' = max(m, max_j s_j)   l' = l e^(m - m') + sum_j e^(s_j - m')
        acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j            out = acc / l

    Each query's arithmetic depends on its own row's keys only, in the same order
    whatever the other queries, rows or the width: a chunk past the row's length adds
    e^(-inf) = 0 and rescales by e^0 = 1, exactly; the dot products are products summed
    over D, not a GEMM whose kernel depends on the shapes. So it is batch-invariant by
    construction: the reference, and the forward on a CPU.
    """
    q = queries.float() * scale
    rows, heads, count, dim = q.shape
    top = torch.full((rows, heads, count, 1), float("-inf"), device=q.device)
    total = torch.zeros(rows, heads, count, 1, device=q.device)
    acc = torch.zeros(rows, heads, count, dim, device=q.device)
    for start in range(0, keys.shape[2], ATTENTION_CHUNK):
        stop = start + ATTENTION_CHUNK
        k = keys[:, :, start:stop].float()[:, :, None]  # [B, H, 1, C, D]
        v = values[:, :, start:stop].float()[:, :, None]
        scores = (q[:, :, :, None] * k).sum(-1) + bias[..., start:stop].float()  # [B, H, Q, C]
        new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
        weights = torch.exp(scores - new_top)
        rescale = torch.exp(top - new_top)
        total = total * rescale + weights.sum(-1, keepdim=True)
        acc = acc * rescale + (weights[..., None] * v).sum(-2)
        top = new_top
    return (acc / total).to(queries.dtype)


def _causal_bias(
    lengths: torch.Tensor, tokens: int, width: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, G*T, W]: query (g, t) of row b sees positions <= L_b + t."""
    steps = torch.arange(tokens, device=lengths.device)
    positions = lengths[:, None] + steps[None, :]  # [B, T]
    keys = torch.arange(width, device=lengths.device)
    hidden = keys[None, None, :] > positions[:, :, None]  # [B, T, W]
    bias = torch.zeros(hidden.shape, dtype=dtype, device=lengths.device)
    bias.masked_fill_(hidden, float("-inf"))
    rows = bias.shape[0]
    return (
        bias[:, None, None]
        .expand(rows, 1, group, tokens, width)
        .reshape(rows, 1, group * tokens, width)
    )


class PagedCache(SequenceCache):
    """A ``SequenceCache`` whose keys/values live in blocks of a ``PagedPool``.

    blocks: its block table (position p in blocks[p // BLOCK_SIZE]). reserved: blocks
    promised to it by ``reserve`` (0 = none). Rolling back keeps its blocks (the next
    verify writes there again); ``release`` gives them back for good.
    """

    def __init__(self, pool: PagedPool) -> None:
        super().__init__(pool.loaded)
        self.pool = pool
        self.blocks: list[int] = []
        self.reserved = 0
        self.released = False

    def check_live(self) -> None:
        if self.released:
            raise ResourceExhausted("this session's KV blocks were released; reopen the session")

    def reserve(self, length: int) -> bool:
        """Promise this cache the blocks of ``length`` positions; False when the pool's
        unreserved free blocks do not cover them (nothing changes then)."""
        return self.pool._reserve(self, length)

    def unreserve(self) -> None:
        self.pool._unreserve(self)

    @torch.inference_mode()
    def extend(self, new_tokens: Sequence[int], logits_to_keep: int | None = None) -> torch.Tensor:
        self.check_extend(new_tokens, logits_to_keep)
        logits = self.pool._extend(self, new_tokens, want_logits=True)
        assert logits is not None
        self.pool._sync()
        if logits_to_keep is not None:
            logits = logits[-logits_to_keep:]
        return logits

    def adopt(self, new_tokens: Sequence[int]) -> None:
        """Append tokens whose keys/values a pool forward wrote after the cached ones."""
        assert len(self.tokens) + len(new_tokens) <= len(self.blocks) * BLOCK_SIZE
        self.tokens.extend(int(t) for t in new_tokens)

    def rollback(self, length: int) -> None:
        self.check_rollback(length)
        del self.tokens[length:]

    def reset(self) -> None:
        self.tokens = []
        self.pool._shrink(self, 0)

    def release(self) -> None:
        self.tokens = []
        self.pool._shrink(self, 0)
        self.pool._unreserve(self)
        self.released = True

    def layer_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, copies [1, H_kv, len(self), D] of the cached keys/values."""
        if not self.tokens:
            return []
        end = len(self.tokens)
        index = torch.tensor(self.blocks[: _blocks(end)], device=self.pool.device)
        out = []
        for keys, values in self.pool.kv:
            gathered = [
                t.index_select(0, index).flatten(0, 1)[:end].transpose(0, 1)[None]
                for t in (keys, values)
            ]
            out.append((gathered[0], gathered[1]))
        return out

    def replace_kv(
        self, tokens: Sequence[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        raise NotImplementedError("a PagedCache is filled by its pool's forward only")

    def memory_bytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes

    def __repr__(self) -> str:
        return f"PagedCache(blocks={len(self.blocks)}, tokens={len(self.tokens)})"


def paged_pool_for(
    loaded: LoadedModel,
    mode: str,
    *,
    max_rows: int,
    cuda_graphs: bool,
    lanes: int = 0,
    memory_fraction: float = 0.9,
    budget_bytes: int | None = None,
    batch_invariant: bool = True,
    verify_tokens: int = DEFAULT_VERIFY_TOKENS,
    attention: str = "auto",
) -> PagedPool | None:
    """The oracle's paged pool for ``--static-kv`` ``mode`` (auto, on, off), or None.

    Its size: ``budget_bytes`` when given; else, on a GPU, ``memory_fraction`` of the
    card less what is in use (weights, CUDA context, other processes) and the
    activations of the largest forward per lane (measured) with a margin for the graphs'
    memory pools; on a CPU DEFAULT_CPU_KV_BYTES. Raises ``InvalidArgument`` when that
    leaves less than one full-context session.
    """
    if mode == "off":
        return None
    reason = lean_unsupported(loaded)
    if reason is not None and mode == "on":
        raise InvalidArgument(f"--static-kv on: {loaded.name!r} cannot use paged KV: {reason}")
    if reason is not None or (mode == "auto" and loaded.device.type != "cuda"):
        log.info("paged KV off (%s)", reason or "auto: not on a CUDA device")
        return None
    pool = PagedPool(
        loaded, 0, max_rows=max_rows, cuda_graphs=cuda_graphs, lanes=lanes,
        batch_invariant=batch_invariant, verify_tokens=verify_tokens, attention=attention,
    )  # fmt: skip
    if budget_bytes is not None:
        kv_bytes = budget_bytes
    elif loaded.device.type == "cuda":
        kv_bytes = _free_for_kv(pool, memory_fraction)
    else:
        kv_bytes = DEFAULT_CPU_KV_BYTES
    blocks = kv_bytes // pool.block_bytes
    if blocks < pool.max_row_blocks:
        raise InvalidArgument(
            f"{kv_bytes / 2**20:.0f} MiB of KV memory hold {blocks * BLOCK_SIZE} positions, "
            f"fewer than one session at the full context ({pool.capacity}); raise "
            "--gpu-memory-fraction or --kv-budget-mb, or lower the context"
        )
    pool._allocate(blocks)
    log.info(
        "paged KV: %d blocks of %d positions (%.1f GiB, %.0f full-context sessions); %s; "
        "%d lane(s); verify forward %s",
        blocks,
        BLOCK_SIZE,
        pool.kv_bytes / 2**30,
        blocks / pool.max_row_blocks,
        f"batch-invariant, {pool.verify_tokens} tokens a forward"
        if batch_invariant
        else "not batch-invariant",
        pool.lanes,
        "replayed as CUDA graphs" if pool.cuda_graphs else "run eagerly",
    )
    return pool


def _free_for_kv(pool: PagedPool, memory_fraction: float) -> int:
    """KV bytes that ``memory_fraction`` of the GPU leaves (``paged_pool_for``)."""
    device = pool.device
    activations = pool.activation_bytes()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # weights, CUDA context, other processes
    reserve = int(activations * GRAPH_POOL_MARGIN * pool.lanes) + FIXED_OVERHEAD_BYTES
    kv_bytes = int(memory_fraction * total) - in_use - reserve
    log.info(
        "GPU memory: %.1f of %.1f GiB in use before KV; %.2f GiB kept for activations and "
        "graphs; --gpu-memory-fraction %.2f leaves %.1f GiB for KV",
        in_use / 2**30,
        total / 2**30,
        reserve / 2**30,
        memory_fraction,
        max(kv_bytes, 0) / 2**30,
    )
    return max(kv_bytes, 0)
