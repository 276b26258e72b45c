"""A lean decoding forward for Llama-family models, on a preallocated KV buffer.

Drafts run it, and so does the oracle: its KV pools on a GPU, and every session of a
CPU oracle (``Oracle(lean=True)``). The logits are HF's up to float rounding; an oracle
runs one forward for the oracle alone and for verifying, so its outputs stay exactly its
own. For a small model the route matters more than the arithmetic. The demo draft (2
layers, width 256) spends about 2 ms per one-token HF forward on a CPU core, almost all
of it in per-call machinery: the mask builder, the cache object, decorators, output
classes. The maths is about 3 M multiply-adds.

This module runs the same weights and formulas (the model's own projections, norm
weights, activation and rotary embedding) in a plain loop:

    h = embed(x);  for each layer:  q, k, v = qkv(n1(h));  q, k = rope(q, k)
                                    h += o(attn(q, k, v))
                                    g, u = gate_up(n2(h));  h += down(act(g) * u)
    logits = lm_head(norm(h))

with few ops per layer: on a GPU the oracle's forward, even replayed as a CUDA graph,
is bound by its kernel count (the demo oracle's fell from 1857 to 955 kernels with
this layout, its 16-row replay from 6.2 to 4.2 ms on the H200). q, k and v are one
matmul (``_stacked``), so are gate and up; each RMSNorm is one ``F.rms_norm``; the
rotary embedding turns q and k in one go. On a CPU every Linear weight is kept in the
column layout (``_column_layout``), which BLAS multiplies by faster.

Keys and values go into per-layer buffers [B, H_kv, capacity, D], written in place at
the sequence's positions (where exactly is the caller's ``KVStore``). ``LeanCache`` is a
drop-in ``SequenceCache`` on that path; ``LeanRows`` drafts several rows that share a
cached prefix (the branches); the oracle's static KV slots (``specdec.engine.static_kv``) run
the same forward as CUDA graphs. Only the architectures below qualify
(``lean_unsupported`` says why not); every other model keeps HF's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from specdec.core.errors import InvalidArgument
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.models import LoadedModel
from specdec.engine.quantize import stacked_int8

# Same decoder layout: pre-norm, rotary q/k, (grouped-query) attention, gated MLP.
LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H_kv, capacity, D]
# store(layer, new keys, new values) -> the keys, values to attend over (LeanModel.forward)
KVStore = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def lean_unsupported(loaded: LoadedModel) -> str | None:
    """Why ``loaded`` cannot take the lean forward, or None when it can."""
    config = loaded.model.config
    if config.model_type not in LEAN_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {LEAN_MODEL_TYPES}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < loaded.max_context:
        return f"a sliding window of {window} positions"
    inner = getattr(loaded.model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(loaded.model, "lm_head"):
        return "not the usual layout (model.layers, model.rotary_emb, lm_head)"
    for layer in inner.layers:
        attention = getattr(layer, "self_attn", None)
        if attention is None or not hasattr(attention, "scaling"):
            return "an attention module without q/k/v/o projections and a scaling"
        if hasattr(attention, "q_norm") or getattr(layer, "attention_type", "full_attention") != (
            "full_attention"
        ):
            return "attention with extra norms or a non-full attention type"
    return None


def span_store(kv: KV, write_at: int) -> KVStore:
    """Keys/values go to buffer slots write_at..write_at+n of every row; attention covers
    slots [0, write_at + n)."""

    def store(
        layer: int, new_keys: torch.Tensor, new_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = kv[layer]
        end = write_at + new_keys.shape[2]
        keys[:, :, write_at:end] = new_keys
        values[:, :, write_at:end] = new_values
        return keys[:, :, :end], values[:, :, :end]

    return store


class RowsOf(torch.nn.Module):
    """Outputs [start, stop) of a stacked projection: the layer that was stacked into it
    at those rows. It stands in for that layer, so HF's forward still finds it."""

    def __init__(self, stacked: torch.nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.stacked, self.start, self.stop = stacked, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stacked(x)[..., self.start : self.stop]


def _stacked(
    parent: torch.nn.Module, names: Sequence[str], columns: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One projection for ``parent``'s layers ``names``, which read the same input: their
    outputs side by side, [..., sum of out_features].

    * Plain Linear layers: one matmul over their stacked weights (``_stack``; ``columns``:
      in the column layout).
    * Dynamic int8 layers: one int8 layer with the same weights (``stacked_int8``). Each
      of them is replaced by its rows of it (``RowsOf``): the weights are not stored
      twice, and HF's forward (used with ``--no-lean-forward`` only) runs the stacked
      matmul once per layer.
    * Anything else: one by one, the outputs concatenated.
    """
    modules = [getattr(parent, name) for name in names]
    if all(type(m) is torch.nn.Linear for m in modules):
        weight = _stack(modules, "weight", columns)
        bias = None if getattr(modules[0], "bias", None) is None else _stack(modules, "bias")
        return lambda x: F.linear(x, weight, bias)
    if all(isinstance(m, RowsOf) and m.stacked is modules[0].stacked for m in modules):
        return cast(RowsOf, modules[0]).stacked  # stacked by an earlier LeanModel
    stacked = stacked_int8(modules)
    if stacked is None:
        return lambda x: torch.cat([m(x) for m in modules], dim=-1)
    start = 0
    for name, module in zip(names, modules, strict=True):
        stop = start + int(module.weight().shape[0])
        setattr(parent, name, RowsOf(stacked, start, stop))
        start = stop
    return stacked


def _stack(modules: Sequence[torch.nn.Module], name: str, columns: bool = False) -> torch.Tensor:
    """The modules' ``name`` tensors as consecutive rows of one tensor.

    The first call moves them there, each module keeping a view of its rows: nothing is
    stored twice, and HF's forward still sees its own modules. Later calls (another
    LeanModel of the same model) find them there. ``columns``: the tensor [N, K] is the
    transpose of a contiguous [K, N] one (``_column_layout``).
    """
    parts = [getattr(m, name) for m in modules]
    whole = _adjacent_views(parts, columns)
    if whole is None:
        with torch.no_grad():
            whole = torch.cat([p.detach() for p in parts])
            if columns:
                whole = whole.t().contiguous().t()
        for module, rows in zip(modules, whole.split([p.shape[0] for p in parts]), strict=True):
            setattr(module, name, torch.nn.Parameter(rows, requires_grad=False))
    return whole


def _adjacent_views(parts: Sequence[torch.Tensor], columns: bool = False) -> torch.Tensor | None:
    """The tensor ``parts`` are consecutive row blocks of, if they are, else None
    (``columns``: a tensor in the column layout)."""
    first = parts[0]
    offset, rows = first.storage_offset(), 0
    for part in parts:
        step = 1 if columns else part[0].numel()  # storage elements from one row to the next
        if (
            (part.stride(0) != 1 if columns else not part.is_contiguous())
            or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or part.storage_offset() != offset + rows * step
        ):
            return None
        rows += part.shape[0]
    if columns and (first.dim() != 2 or first.stride(1) != rows):
        return None
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), offset)


def _column_layout(module: torch.nn.Module) -> None:
    """Store a Linear layer's weight [N, K] as the transpose of a contiguous [K, N]
    tensor. On a CPU, BLAS multiplies by a weight laid out so faster: the demo oracle's
    projections took 25 % less at 1 and at 5 rows (MKL, one core; the same values). HF's
    forward and every other user of the module see the same [N, K] tensor."""
    weight = cast(torch.Tensor, module.weight)
    if weight.dim() == 2 and weight.stride(0) != 1:
        with torch.no_grad():
            module.weight = torch.nn.Parameter(weight.detach().t().contiguous().t(), False)


def _rms_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's RMSNorm as one op (``F.rms_norm``) instead of HF's six."""
    weight = cast(torch.Tensor, module.weight)
    eps = float(cast(float, module.variance_epsilon))
    return lambda x: F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass
class _Layer:
    """One decoder layer's modules, with q/k/v and gate/up each stacked into one matmul."""

    attention_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor]  # [..., hidden] -> [..., (H + 2 H_kv) * D]
    o: torch.nn.Module
    scaling: float
    mlp_norm: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]  # [..., hidden] -> [..., 2 * inner]
    act: Callable[[torch.Tensor], torch.Tensor]
    down: torch.nn.Module


class LeanModel:
    """The weights of a qualifying model, and one forward over them (module doc)."""

    def __init__(self, loaded: LoadedModel) -> None:
        reason = lean_unsupported(loaded)
        if reason is not None:
            raise InvalidArgument(f"{loaded.name!r} cannot take the lean forward: {reason}")
        self.loaded = loaded
        inner = loaded.model.model
        columns = loaded.device.type == "cpu"  # the column layout (``_column_layout``)
        self.embed, self.rotary, self.lm_head = (
            inner.embed_tokens,
            inner.rotary_emb,
            loaded.model.lm_head,
        )
        self.norm = _rms_norm(inner.norm)
        config = loaded.model.config
        self.heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        self.head_dim = int(inner.layers[0].self_attn.head_dim)
        self.layers = [
            _Layer(
                attention_norm=_rms_norm(layer.input_layernorm),
                qkv=_stacked(a, ("q_proj", "k_proj", "v_proj"), columns),
                o=a.o_proj,
                scaling=float(a.scaling),
                mlp_norm=_rms_norm(layer.post_attention_layernorm),
                gate_up=_stacked(layer.mlp, ("gate_proj", "up_proj"), columns),
                act=layer.mlp.act_fn,
                down=layer.mlp.down_proj,
            )
            for layer in inner.layers
            for a in [layer.self_attn]
        ]
        if columns:
            tied = self.lm_head.weight is self.embed.weight
            for layer in self.layers:
                for module in (layer.o, layer.down):
                    if type(module) is torch.nn.Linear:
                        _column_layout(module)
            if type(self.lm_head) is torch.nn.Linear:
                _column_layout(self.lm_head)
                if tied:  # keep one tensor
                    self.embed.weight = self.lm_head.weight

    def new_kv(self, rows: int, capacity: int) -> KV:
        """Zeroed per-layer key/value buffers [rows, H_kv, capacity, D].

        Zeros, not empty memory: a masked slot still enters attention as 0 x value,
        and a NaN left in never-written memory would turn that into NaN.
        """
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        weight = self.embed.weight  # the model's dtype even when its Linear layers are int8
        return [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in range(len(self.layers))]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        store: KVStore,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Hidden states [B, n, hidden] of input_ids [B, n] at positions [B, n].

        ``store(layer, keys, values)`` keeps each layer's new keys/values [B, H_kv, n, D]
        and returns the keys/values to attend over, [B, H_kv or H, S, D]. ``mask``: bool,
        or additive in the model's dtype, [B or 1, 1, n, S]; None = everything (right for
        n = 1 only).
        """
        batch, n = input_ids.shape
        heads, kv_heads, half = self.heads, self.kv_heads, self.head_dim // 2
        hidden = self.embed(input_ids)  # [B, n, hidden]
        cos, sin = self.rotary(hidden, positions)  # [B, n, D] each
        # rope(x) = x cos + rotate_half(x) sin, rotate_half(x1, x2) = (-x2, x1)
        #         = x cos + (x2, x1) (-sin1, sin2): the halves swapped, the sign in sin.
        cos = cos[:, :, None]  # [B, n, 1, D]: broadcast over heads
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.attention_norm(hidden)).view(batch, n, -1, self.head_dim)
            qk = qkv[:, :, : heads + kv_heads]  # [B, n, H + H_kv, D]
            swapped = qk.unflatten(-1, (2, half)).flip(-2).flatten(-2)
            qk = torch.addcmul(qk * cos, swapped, sin)
            keys, values = store(
                index,
                qk[:, :, heads:].transpose(1, 2),
                qkv[:, :, heads + kv_heads :].transpose(1, 2),
            )  # [B, H_kv or H, S, D]
            out = F.scaled_dot_product_attention(
                qk[:, :, :heads].transpose(1, 2),
                keys,
                values,
                attn_mask=mask,
                scale=layer.scaling,
                enable_gqa=keys.shape[1] != heads,
            )  # [B, H, n, D]
            hidden = hidden + layer.o(out.transpose(1, 2).reshape(batch, n, -1))
            gate, up = layer.gate_up(layer.mlp_norm(hidden)).chunk(2, dim=-1)
            hidden = hidden + layer.down(layer.act(gate) * up)
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> float32 logits [..., V]."""
        return self.lm_head(hidden).float()


class LeanCache(SequenceCache):
    """A ``SequenceCache`` on the lean forward: same tokens, extend, rollback and sync.

    The keys/values live in one buffer per layer, grown by doubling up to the model's
    context; rolling back only moves the length.
    """

    def __init__(self, model: LoadedModel, lean: LeanModel | None = None) -> None:
        """``lean``: the model's ``LeanModel`` when the caller has one already."""
        super().__init__(model)
        self.lean = lean or LeanModel(model)
        self._kv: KV = []

    @torch.inference_mode()
    def extend(self, new_tokens: Sequence[int], logits_to_keep: int | None = None) -> torch.Tensor:
        self.check_extend(new_tokens, logits_to_keep)
        n, past = len(new_tokens), len(self.tokens)
        self._reserve(past + n)
        device = self.model.device
        input_ids = torch.tensor([list(new_tokens)], dtype=torch.long, device=device)  # [1, n]
        positions = torch.arange(past, past + n, device=device).unsqueeze(0)  # [1, n]
        mask = None
        if n > 1:  # causal among the new tokens: row i sees slots <= past + i
            mask = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)[None, None]
        hidden = self.lean.forward(input_ids, positions, span_store(self._kv, past), mask)[0]
        self.tokens.extend(int(t) for t in new_tokens)
        if logits_to_keep is not None:
            hidden = hidden[-logits_to_keep:]
        return self.lean.logits(hidden)

    def _reserve(self, length: int) -> None:
        capacity = self._kv[0][0].shape[2] if self._kv else 0
        if length <= capacity:
            return
        grown = min(self.model.max_context, max(length, 2 * capacity, 64))
        kv = self.lean.new_kv(1, grown)
        for (new_keys, new_values), (keys, values) in zip(kv, self._kv, strict=False):
            new_keys[:, :, : len(self.tokens)] = keys[:, :, : len(self.tokens)]
            new_values[:, :, : len(self.tokens)] = values[:, :, : len(self.tokens)]
        self._kv = kv

    def rollback(self, length: int) -> None:
        self.check_rollback(length)
        del self.tokens[length:]

    def reset(self) -> None:
        self.tokens = []

    def layer_kv(self) -> KV | None:
        """Per layer, views [1, H_kv, len(self), D] of the cached keys/values."""
        if not self.tokens:
            return []
        end = len(self.tokens)
        return [(keys[:, :, :end], values[:, :, :end]) for keys, values in self._kv]

    @torch.inference_mode()
    def replace_kv(
        self, tokens: Sequence[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """``SequenceCache.replace_kv``, the keys/values copied into this cache's buffers."""
        self.check_replace(tokens, kv)
        if len(kv) != len(self.lean.layers):
            raise InvalidArgument(f"replace_kv needs {len(self.lean.layers)} layers, got {len(kv)}")
        n = len(tokens)
        self.tokens = []  # nothing for _reserve to copy: all n positions are written below
        self._reserve(n)
        for (keys, values), (new_keys, new_values) in zip(self._kv, kv, strict=True):
            keys[:, :, :n] = new_keys
            values[:, :, :n] = new_values
        self.tokens = [int(t) for t in tokens]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self._kv for t in layer)

    def __repr__(self) -> str:
        return f"LeanCache(model={self.model.name!r}, tokens={len(self.tokens)})"


class LeanRows:
    """Rows that share a ``LeanCache``'s tokens, each continuing from its own branch point.

    Row b's first token goes to position branch_points[b]; it sees the cached tokens
    before that position (the rest of the cache is masked: the hole) and its own new
    tokens. The cache itself is not touched: its keys/values are copied once into
    row buffers [B, H_kv, len(cache) + steps, D].
    """

    def __init__(self, cache: LeanCache, branch_points: Sequence[int], steps: int) -> None:
        end, rows = len(cache), len(branch_points)
        assert rows >= 1 and steps >= 1 and all(0 < p <= end for p in branch_points)
        device = cache.model.device
        self.lean = cache.lean
        self.kv = self.lean.new_kv(rows, end + steps)
        for (keys, values), (cached_keys, cached_values) in zip(self.kv, cache._kv, strict=True):
            keys[:, :, :end] = cached_keys[:, :, :end]  # [1, ...] broadcast to every row
            values[:, :, :end] = cached_values[:, :, :end]
        points = torch.tensor(list(branch_points), dtype=torch.long, device=device)[:, None]
        slots = torch.arange(end + steps, device=device)[None, :]  # [1, end + steps]
        self._mask = ((slots < points) | (slots >= end))[:, None, None, :]  # [B, 1, 1, slots]
        self._positions = points  # [B, 1]: where each row's next token goes
        self._written = end

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row; float32 logits [B, V] for each row's next token."""
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self._positions.device)[:, None]
        mask = self._mask[..., : self._written + 1]
        store = span_store(self.kv, self._written)
        hidden = self.lean.forward(ids, self._positions, store, mask)
        self._written += 1
        self._positions = self._positions + 1
        return self.lean.logits(hidden[:, -1])  # [B, V]
