"""Static KV slots for the oracle, and its batched verify forward replayed as CUDA graphs.

On a GPU a small oracle's forward is bound by kernel launches, not arithmetic: the
demo oracle (30 layers, width 256) takes about 30 ms of wall time to verify one
block through HF's forward, of which a few ms is GPU work. A CUDA graph replays
the whole launch sequence at once, which needs every tensor at a fixed address
and no Python value that changes between rounds. So, as in gpt-fast:

* ``SlotPool`` preallocates the KV of ``slots`` sequences, per layer
  [slots + lanes, H_kv, capacity, D] with capacity = context + MAX_SPECULATIVE_TOKENS + 1.
  A session's ``SlotCache`` owns one slot; its tokens' keys/values sit at their
  positions, and rolling back only shortens its length. The last slots are scratch,
  one per lane.
* A verify forward of R blocks runs B >= R rows; row r works on slot s_r alone:

      inputs       [B, T]   [committed[-1], x_0..x_{k-1}] then token 0 pads
      slots        [B]      s_r; the B - R padding rows use the scratch slot
      lengths      [B]      L_r = len(slot s_r's cache) = len(committed) - 1
      positions    [B, T]   L_r + t (rotary positions and write positions alike)
      attention    over slot s_r's keys/values (gathered, [B, H_kv, W, D]) under
                   mask [B, 1, T, W]: query t sees positions <= L_r + t

  Writes land at positions >= L_r, where the slot holds nothing kept: the
  block's tokens at L_r..L_r+k (``SlotCache.adopt`` keeps the accepted ones, like a
  rollback), the pads beyond. A row's logits are those of its session alone, up to
  float rounding, and no other slot is touched.
* With ``cuda_graphs`` the forward of every (B, T, W) bucket is captured once, before
  the oracle serves (``capture_all``), into one shared memory pool, and replayed:
  only inputs, slots and lengths are copied in. T buckets are 2, 3, 5, 9, 17, 33
  (k + 1 rounded up), B buckets powers of two up to ``max_rows``, W buckets 256, 512...
  up to half the capacity, then the capacity (attention and the gather cost in W:
  at 16 rows of the demo oracle they are half the forward at W = capacity). On the
  CPU the same forward runs eagerly over just W = max(L_r) + T.
* The graphs of a bucket are timed once captured, and a batch of R rows replays the
  fastest graph of B >= R rows (on the H200 the demo oracle's 2-row graph took 11 ms,
  its 16-row graph 6.5).
* Lanes: up to ``lanes`` forwards run at once, each in its own thread on its own CUDA
  stream (``enter_lane``), with its own graphs, memory pool, static inputs and scratch
  slot. The demo oracle's forward is bound by kernel latency, not the GPU's width: two
  at once took 1.6x the throughput of one after the other on the H200. The caller
  keeps any one slot in one lane at a time.
* A prefill is the same forward on one row, in chunks of up to PREFILL_CHUNK tokens
  padded to a PREFILL_BUCKETS bucket (``SlotPool.prefill``). Eagerly it would hold the
  model thread, and every other session's batch, for tens of ms.

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

from specdec.core.errors import InvalidArgument, ResourceExhausted
from specdec.core.types import MAX_SPECULATIVE_TOKENS
from specdec.engine.lean_forward import KV, KVStore, LeanCache, LeanModel, lean_unsupported
from specdec.engine.models import LoadedModel

log = logging.getLogger(__name__)

MAX_ROW_TOKENS = MAX_SPECULATIVE_TOKENS + 1  # committed[-1] and a block of at most k tokens
TOKEN_BUCKETS = (2, 3, 5, 9, 17, MAX_ROW_TOKENS)
# A prefill runs one row in chunks of up to PREFILL_CHUNK tokens, each rounded up to a
# bucket. Eagerly, the demo oracle's 30 layers take ~28 ms of launches per prefill on
# the H200, and every other session's batch waits behind it; replayed, a few ms.
PREFILL_CHUNK = 256
PREFILL_BUCKETS = (64, 128, PREFILL_CHUNK)
MIN_WIDTH = 256  # the smallest attended-width bucket
WARMUP_RUNS = 1  # eager runs on a side stream before a capture (cuBLAS/allocator warm-up)
TIMING_REPLAYS = 5  # replays per verify graph to find each row count's fastest bucket
CALIBRATION_MARGIN = 0.8  # a larger bucket replaces a smaller one only when this much faster


def _bucket(value: int, buckets: Sequence[int]) -> int:
    return next(bucket for bucket in buckets if bucket >= value)


@dataclass
class RowsForward:
    """One verify forward over slot rows.

    logits: float32 [R, T, V], in the order the rows were given; row r's first
        n_r = k_r + 1 rows are its block's logits.
    forward_ns: wall time of the forward (to the logits being ready).
    """

    logits: torch.Tensor
    forward_ns: int


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [B, T, V] float32, the graph's output buffer


@dataclass
class _Lane:
    """What one lane's forwards own: graphs write their inputs, intermediates and
    padding rows' keys/values here, so two lanes never touch each other's."""

    scratch: int  # the slot padding rows use
    stream: Any = None  # its CUDA stream (None on the CPU: the thread's default)
    inputs: Any = None  # [max_rows, PREFILL_CHUNK] token ids, the graphs' input buffers
    slots: Any = None  # [max_rows]
    lengths: Any = None  # [max_rows]
    graphs: dict[tuple[int, int, int], _Graph] = field(default_factory=dict)
    memory_pool: Any = None  # the memory pool of its graphs


class LanedPool:
    """The lanes of a KV pool (``SlotPool``, ``paged_kv.PagedPool``): which lane a thread
    is, its stream, and the capture of a forward as a CUDA graph in the lane's memory pool.
    Subclasses set ``device``, ``lanes``, ``_lanes`` (each with ``stream`` and
    ``memory_pool``) and ``_local`` (a ``threading.local``)."""

    device: torch.device
    lanes: int
    cuda_graphs: bool
    _lanes: Sequence[Any]
    _local: threading.local
    _fastest: dict[tuple[int, int, int], int]

    def enter_lane(self, index: int) -> None:
        """Make this thread lane ``index``: its forwards use that lane's graphs, buffers and
        scratch slot, on its CUDA stream. A thread that never calls it is lane 0."""
        if not 0 <= index < self.lanes:
            raise ValueError(f"lane {index} of a pool with {self.lanes} lanes")
        self._local.lane = index
        stream = self._lanes[index].stream
        if stream is not None:
            torch.cuda.set_stream(stream)

    @property
    def _lane(self) -> Any:
        return self._lanes[getattr(self._local, "lane", 0)]

    def _sync(self) -> None:
        """Wait for this thread's queued GPU work (not the other lanes')."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def capture_all(self) -> None:
        """Capture this thread's lane's forward of every bucket now (``_capture_buckets``),
        so that no batch waits for a capture (each takes tens of ms), and time the verify
        graphs (once per pool) to route each row count to the fastest. A no-op without
        CUDA graphs; a capture that fails leaves every lane eager."""
        if not self.cuda_graphs:
            return
        start = time.perf_counter()
        lane = self._lane
        try:
            with torch.inference_mode():
                self._capture_buckets(lane)
                self._sync()
                if not self._fastest:
                    self._fastest = self._time_row_buckets(lane)
        except Exception as exc:  # e.g. an op that cannot be captured: run eagerly instead
            log.warning("CUDA graph capture failed (%s); the verify forward runs eagerly", exc)
            self.cuda_graphs = False
            for each in self._lanes:
                each.graphs.clear()
            return
        log.info(
            "%s lane %d: captured %d forwards as CUDA graphs in %.1f s (%s)%s",
            type(self).__name__,
            self._lanes.index(lane),
            len(lane.graphs),
            time.perf_counter() - start,
            self._buckets(),
            "".join(
                f"; {rows} rows x {tokens} x {width} replay {fastest} rows (faster)"
                for (rows, tokens, width), fastest in sorted(self._fastest.items())
                if fastest != rows
            ),
        )

    def _capture_buckets(self, lane: Any) -> None:
        """Replay (so capture) the forward of every bucket in ``lane``."""
        raise NotImplementedError

    def _buckets(self) -> str:
        """The buckets, for the log."""
        raise NotImplementedError

    def _time_row_buckets(self, lane: Any) -> dict[tuple[int, int, int], int]:
        raise NotImplementedError

    def _record(self, lane: Any, forward: Callable[[], None]) -> Any:
        """A CUDA graph of ``forward`` in the lane's memory pool, after a warm-up run on a
        side stream (cuBLAS and the allocator warm up; the static inputs hold a real batch,
        so it writes only where that batch's own forward writes)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if lane.memory_pool is None:
            lane.memory_pool = torch.cuda.graph_pool_handle()
        # thread_local: another lane's thread may use the GPU meanwhile.
        with torch.cuda.graph(graph, pool=lane.memory_pool, capture_error_mode="thread_local"):
            forward()
        return graph


class SlotPool(LanedPool):
    """The KV of ``slots`` sequences of one model, preallocated; see the module doc.

    max_rows: the most blocks one forward verifies (the oracle's max batch).
    lanes: forwards that may run at once, from different threads (0 = auto: 2 with CUDA
    graphs, else 1).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        slots: int,
        *,
        max_rows: int = 16,
        cuda_graphs: bool = True,
        lanes: int = 1,
    ) -> None:
        if slots < 1 or max_rows < 1 or lanes < 0:
            raise ValueError(
                f"a slot pool needs slots and rows >= 1 and lanes >= 0, got {slots}, "
                f"{max_rows}, {lanes}"
            )
        self.loaded = loaded
        self.lean = LeanModel(loaded)  # raises InvalidArgument for models that do not qualify
        self.slots, self.max_rows = slots, max_rows
        self.capacity = loaded.max_context + MAX_ROW_TOKENS
        self.device = loaded.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.lanes = lanes or (2 if self.cuda_graphs else 1)
        self.kv: KV = self.lean.new_kv(slots + self.lanes, self.capacity)  # + scratch slots
        self.row_buckets = tuple(
            sorted({*(1 << i for i in range(max_rows.bit_length())), max_rows})
        )
        widths = [MIN_WIDTH << i for i in range(self.capacity.bit_length())]
        self.width_buckets = (*(w for w in widths if 2 * w <= self.capacity), self.capacity)
        # (rows, tokens, width) -> the row bucket whose graph is fastest for them (timed).
        self._fastest: dict[tuple[int, int, int], int] = {}
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._lock = threading.Lock()  # new_cache runs on the event loop, release in the model
        self._lanes = [self._new_lane(slots + i) for i in range(self.lanes)]
        self._local = threading.local()  # .lane: the index of this thread's lane

    def _new_lane(self, scratch: int) -> _Lane:
        lane = _Lane(scratch)
        if self.device.type == "cuda":
            lane.stream = torch.cuda.Stream(self.device)
        if self.cuda_graphs:  # the graphs' inputs, at fixed addresses; buckets take views
            lane.inputs = torch.zeros(
                self.max_rows, PREFILL_CHUNK, dtype=torch.long, device=self.device
            )
            lane.slots = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
            lane.lengths = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
        return lane

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot's keys and values, all layers."""
        return sum(t[0].numel() * t.element_size() for layer in self.kv for t in layer)

    @property
    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def new_cache(self) -> SlotCache | None:
        """A cache on the lowest free slot, or None when every slot is taken."""
        with self._lock:
            if not self._free:
                return None
            return SlotCache(self, heapq.heappop(self._free))

    def _release(self, slot: int) -> None:
        with self._lock:
            heapq.heappush(self._free, slot)

    # -- the verify forward ----------------------------------------------------

    @torch.inference_mode()
    def forward_rows(
        self, caches: Sequence[SlotCache], inputs: Sequence[Sequence[int]]
    ) -> RowsForward:
        """One forward over ``inputs[r]`` appended to ``caches[r]``'s cached tokens.

        Writes the inputs' keys/values in the caches' slots after their cached tokens,
        without changing any cache's length (``SlotCache.adopt`` keeps what the verdict
        accepts). The caches must hold different slots; every row needs 1..MAX_ROW_TOKENS
        inputs.
        """
        slots = [cache.slot for cache in caches]
        assert len(inputs) == len(slots) and len(set(slots)) == len(slots), slots
        assert all(1 <= len(row) <= MAX_ROW_TOKENS for row in inputs)
        start = time.perf_counter_ns()
        count, tokens = len(slots), max(len(row) for row in inputs)
        graphed = self.cuda_graphs and count <= self.max_rows
        tokens = _bucket(tokens, TOKEN_BUCKETS) if graphed else tokens
        lengths_of = [len(cache) for cache in caches]
        attended = max(lengths_of) + tokens  # W: what any query can see
        width = _bucket(attended, self.width_buckets) if graphed else attended
        rows = self._rows_for(count, tokens, width) if graphed else count
        ids = torch.zeros(rows, tokens, dtype=torch.long)  # [B, T]; pads are token 0
        for r, row in enumerate(inputs):
            ids[r, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        slot_ids = torch.full((rows,), self._lane.scratch, dtype=torch.long)  # [B]; pads: scratch
        slot_ids[:count] = torch.tensor(slots, dtype=torch.long)
        lengths = torch.zeros(rows, dtype=torch.long)  # [B]
        lengths[:count] = torch.tensor(lengths_of, dtype=torch.long)
        if graphed:
            logits = self._replay(ids, slot_ids, lengths, width)[:count].clone()
        else:
            device = self.device
            logits = self._forward(
                ids.to(device), slot_ids.to(device), lengths.to(device), attended
            )
        self._sync()
        return RowsForward(logits, time.perf_counter_ns() - start)

    def _rows_for(self, count: int, tokens: int, width: int) -> int:
        """The row bucket to replay ``count`` rows with: the smallest that holds them,
        unless a larger one was timed faster."""
        rows = _bucket(count, self.row_buckets)
        return self._fastest.get((rows, tokens, width), rows)

    def _forward(
        self, ids: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, attended: int
    ) -> torch.Tensor:
        """Logits [B, T, V] of ids [B, T], row b after the lengths[b] cached tokens of slot
        slots[b], attending over the first ``attended`` positions of the slots."""
        tokens = ids.shape[1]
        steps = torch.arange(tokens, device=ids.device)
        positions = lengths[:, None] + steps[None, :]  # [B, T]
        keys = torch.arange(attended, device=ids.device)
        mask = keys[None, None, :] <= positions[:, :, None]  # [B, T, W]: causal per row
        # Additive (0 or -inf), built once per forward rather than converted in every layer.
        bias = torch.zeros(mask.shape, dtype=self.kv[0][0].dtype, device=ids.device)
        bias.masked_fill_(~mask, float("-inf"))
        store = self._slot_store(slots, positions, attended)
        hidden = self.lean.forward(ids, positions, store, bias[:, None])
        return self.lean.logits(hidden)

    def _slot_store(self, slots: torch.Tensor, positions: torch.Tensor, attended: int) -> KVStore:
        """Row b's new keys/values go to slot slots[b] at positions[b]; attention reads
        slot slots[b]'s first ``attended`` positions, gathered for each query head from its
        key/value head ([B, H, W, D]; one gather either way, and the attention is then
        plain multi-head attention, which every fused attention kernel takes)."""
        kv_heads = self.lean.kv_heads
        group = self.lean.heads // kv_heads
        head = torch.arange(kv_heads, device=slots.device)
        write = (slots[:, None, None], head[None, :, None], positions[:, None, :])  # [B, H_kv, T]
        read = (slots[:, None], torch.arange(self.lean.heads, device=slots.device)[None] // group)

        def store(
            layer: int, new_keys: torch.Tensor, new_values: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.kv[layer]
            keys.index_put_(write, new_keys)
            values.index_put_(write, new_values)
            return keys[:, :, :attended][read], values[:, :, :attended][read]

        return store

    @torch.inference_mode()
    def prefill(self, cache: SlotCache, tokens: Sequence[int]) -> None:
        """Append ``tokens``' keys/values to ``cache`` (no logits wanted).

        With CUDA graphs: one-row replays of up to PREFILL_CHUNK tokens, padded to a
        bucket like a verify row (the pads' writes land past the cache's length). A
        chunk whose padded writes would pass the slot's capacity runs eagerly.
        Without graphs: the lean forward on the slot, as any other cache.
        """
        if not self.cuda_graphs:
            cache.extend(tokens, logits_to_keep=1)
            return
        assert cache.slot is not None, "prefill on a released slot"
        slot = torch.tensor([cache.slot], dtype=torch.long)
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = [int(t) for t in tokens[start : start + PREFILL_CHUNK]]
            length = len(cache)
            padded = _bucket(len(chunk), PREFILL_BUCKETS)
            if length + padded > self.capacity:
                cache.extend(chunk, logits_to_keep=1)
                continue
            ids = torch.zeros(1, padded, dtype=torch.long)  # [1, T]; pads are token 0
            ids[0, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            width = _bucket(length + padded, self.width_buckets)
            self._replay(ids, slot, torch.tensor([length], dtype=torch.long), width)
            cache.adopt(chunk)
        self._sync()

    def _capture_buckets(self, lane: _Lane) -> None:
        for rows in self.row_buckets:
            slots = torch.full((rows,), lane.scratch, dtype=torch.long)  # scratch only
            zeros = torch.zeros(rows, dtype=torch.long)
            for tokens in TOKEN_BUCKETS + (PREFILL_BUCKETS if rows == 1 else ()):
                ids = torch.zeros(rows, tokens, dtype=torch.long)
                for width in self.width_buckets:
                    if tokens <= width:
                        self._replay(ids, slots, zeros, width)

    def _buckets(self) -> str:
        return (
            f"verify: rows {list(self.row_buckets)} x tokens {list(TOKEN_BUCKETS)} x width "
            f"{list(self.width_buckets)}; prefill: tokens {list(PREFILL_BUCKETS)}"
        )

    def _time_row_buckets(self, lane: _Lane) -> dict[tuple[int, int, int], int]:
        """(rows, tokens, width) -> the row bucket >= rows whose graph replays fastest."""
        took = {
            key: replay_seconds(graph.graph, self._sync)
            for key, graph in lane.graphs.items()
            if key[1] in TOKEN_BUCKETS  # not a prefill graph
        }
        return fastest_row_buckets(took, self.row_buckets)

    def _replay(
        self, ids: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, width: int
    ) -> torch.Tensor:
        lane = self._lane
        rows, tokens = ids.shape
        static_ids = lane.inputs[:rows, :tokens]
        static_slots, static_lengths = lane.slots[:rows], lane.lengths[:rows]
        static_ids.copy_(ids)
        static_slots.copy_(slots)
        static_lengths.copy_(lengths)
        graph = lane.graphs.get((rows, tokens, width))
        if graph is None:
            graph = self._capture(lane, static_ids, static_slots, static_lengths, width)
            lane.graphs[(rows, tokens, width)] = graph
        graph.graph.replay()
        return graph.logits

    def _capture(
        self,
        lane: _Lane,
        ids: torch.Tensor,
        slots: torch.Tensor,
        lengths: torch.Tensor,
        width: int,
    ) -> _Graph:
        """Capture the forward over these static inputs (``LanedPool._record``)."""
        out: list[torch.Tensor] = []

        def forward() -> None:
            out[:] = [self._forward(ids, slots, lengths, width)]

        graph = self._record(lane, forward)
        return _Graph(graph, out[0])


def replay_seconds(graph: Any, sync: Callable[[], None]) -> float:
    """Median wall time of TIMING_REPLAYS replays of a CUDA graph."""
    times = []
    for _ in range(TIMING_REPLAYS):
        begin = time.perf_counter()
        graph.replay()
        sync()
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def fastest_row_buckets(
    took: dict[tuple[int, int, int], float], row_buckets: Sequence[int]
) -> dict[tuple[int, int, int], int]:
    """(rows, tokens, width) -> the row bucket whose graph of the same tokens and width
    replayed fastest (``took``): a larger one only when CALIBRATION_MARGIN faster."""
    fastest: dict[tuple[int, int, int], int] = {}
    for rows, tokens, width in took:
        best = rows
        for larger in row_buckets:
            seconds = took.get((larger, tokens, width), float("inf"))
            if larger > rows and seconds < CALIBRATION_MARGIN * took[best, tokens, width]:
                best = larger
        fastest[rows, tokens, width] = best
    return fastest


def slot_bytes_of(loaded: LoadedModel) -> int:
    """Bytes of one slot of ``loaded``'s KV (keys and values, every layer, full capacity)."""
    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    itemsize = next(loaded.model.parameters()).element_size()
    return per_position * (loaded.max_context + MAX_ROW_TOKENS) * itemsize


def slot_pool_for(
    loaded: LoadedModel,
    mode: str,
    *,
    max_slots: int,
    max_rows: int,
    budget_bytes: int,
    cuda_graphs: bool,
    lanes: int = 0,
) -> SlotPool | None:
    """The oracle's slot pool for ``--static-kv`` ``mode`` (auto, on, off), or None.

    auto: on a CUDA device, for a model the lean forward supports. on: wherever the model
    qualifies (raises ``InvalidArgument`` otherwise). The pool has one slot per verify
    stream (``max_slots``), fewer when the KV budget holds fewer; sessions beyond them
    use HF caches.
    """
    if mode == "off":
        return None
    reason = lean_unsupported(loaded)
    if reason is not None and mode == "on":
        raise InvalidArgument(f"--static-kv on: {loaded.name!r} cannot use static KV: {reason}")
    if reason is not None or (mode == "auto" and loaded.model.device.type != "cuda"):
        log.info("static KV off (%s)", reason or "auto: not on a CUDA device")
        return None
    per_slot = slot_bytes_of(loaded)
    slots = max(1, min(max_slots, budget_bytes // per_slot))
    pool = SlotPool(loaded, slots, max_rows=max_rows, cuda_graphs=cuda_graphs, lanes=lanes)
    log.info(
        "static KV: %d slots of %.1f MiB preallocated; verify forward %s",
        slots,
        per_slot / 2**20,
        "replayed as CUDA graphs" if pool.cuda_graphs else "run eagerly",
    )
    return pool


class SlotCache(LeanCache):
    """A ``SequenceCache`` whose keys/values live in one slot of a ``SlotPool``.

    Prefill and per-session verifies run the lean forward on the slot eagerly; batched
    verifies go through ``SlotPool.forward_rows`` and ``adopt``. ``release`` gives the
    slot back (eviction); a released cache cannot be extended again.
    """

    def __init__(self, pool: SlotPool, slot: int) -> None:
        super().__init__(pool.loaded, pool.lean)
        self.pool = pool
        self.slot: int | None = slot
        self._kv = [(k[slot : slot + 1], v[slot : slot + 1]) for k, v in pool.kv]

    def _reserve(self, length: int) -> None:
        if self.slot is None:
            raise ResourceExhausted("this session's KV slot was released; reopen the session")

    def adopt(self, new_tokens: Sequence[int]) -> None:
        """Append tokens whose keys/values ``SlotPool.forward_rows`` wrote after the cached ones."""
        assert self.slot is not None and len(self.tokens) + len(new_tokens) <= self.pool.capacity
        self.tokens.extend(int(t) for t in new_tokens)

    def release(self) -> None:
        self.tokens = []
        if self.slot is not None:
            self.pool._release(self.slot)
            self.slot, self._kv = None, []

    def __repr__(self) -> str:
        return f"SlotCache(slot={self.slot}, tokens={len(self.tokens)})"
