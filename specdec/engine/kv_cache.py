"""The KV cache of one sequence: extend by a forward pass, roll back by cropping.

Speculative decoding appends tokens that may later be rejected, so the cache
must shrink as cheaply as it grows. ``SequenceCache`` keeps the token ids whose
keys/values it holds next to the HF ``DynamicCache``; rolling back is a crop
(a view on the cached tensors, no recompute), and ``sync`` reuses the longest
common prefix with whatever sequence the caller now wants, so a cached prefix
is never computed twice.

Positions are passed explicitly (``position_ids = [len(cache), len(cache)+n)``)
so every architecture (llama, qwen2, mistral with rotary embeddings; gpt2 with
learned absolute positions) sees the same positions as one full forward would.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from typing import Any

import torch

from specdec.core.errors import InvalidArgument
from specdec.engine.models import LoadedModel

_SIGNATURES: dict[Any, tuple[str, bool]] = {}


def _forward_signature(model_class: Any) -> tuple[str, bool]:
    """(name of the cache argument, whether ``logits_to_keep`` is accepted) of a model class.

    Newer transformers renamed ``past_key_values`` to ``cache``; pick whichever
    the forward declares so neither version warns or ignores the cache.
    """
    if model_class not in _SIGNATURES:
        parameters = inspect.signature(model_class.forward).parameters
        cache_argument = "cache" if "cache" in parameters else "past_key_values"
        _SIGNATURES[model_class] = (cache_argument, "logits_to_keep" in parameters)
    return _SIGNATURES[model_class]


def forward_arguments(model: LoadedModel) -> tuple[str, bool]:
    """(cache argument name, whether ``logits_to_keep`` is accepted) of ``model``'s forward."""
    return _forward_signature(type(model.model))


def dynamic_cache_of(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``DynamicCache`` whose layer i holds ``kv[i]`` = (keys, values), kept as given (no copy).

    ``update`` on a fresh layer initialises it (dtype, device) and concatenates; it is
    given zero positions, then the tensors themselves are installed, so building a
    cache costs no copy kernel per layer. An empty ``kv`` gives an empty cache.
    """
    cache = _new_cache()
    for index, (keys, values) in enumerate(kv):
        cache.update(keys[..., :0, :], values[..., :0, :], index)
        layer = cache.layers[index]
        layer.keys, layer.values = keys, values
    return cache


def _new_cache() -> Any:
    from transformers import DynamicCache

    # NOTE: built without the model config on purpose: a config would give
    # sliding-window models sliding layers, which cannot be cropped once the
    # window is full. Full layers keep every position; the attention mask still
    # applies the window, so the logits are the same.
    return DynamicCache()


class SequenceCache:
    """KV cache of one sequence of ``model``.

    tokens: the ids whose keys/values are cached, in order (positions 0..len-1).
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.tokens: list[int] = []
        self._cache = _new_cache()
        self._cache_argument, self._has_logits_to_keep = _forward_signature(type(model.model))

    def __len__(self) -> int:
        return len(self.tokens)

    @torch.inference_mode()
    def extend(self, new_tokens: Sequence[int], logits_to_keep: int | None = None) -> torch.Tensor:
        """One forward over ``new_tokens`` at positions len(self)...; appends them to the cache.

        Returns float32 logits [n, V] for the n new positions (row i predicts the
        token after new_tokens[i]), or only the last ``logits_to_keep`` rows.
        """
        self.check_extend(new_tokens, logits_to_keep)
        n, past = len(new_tokens), len(self.tokens)
        device = self.model.device
        input_ids = torch.tensor([list(new_tokens)], dtype=torch.long, device=device)  # [1, n]
        position_ids = torch.arange(past, past + n, device=device).unsqueeze(0)  # [1, n]
        kwargs: dict[str, Any] = {self._cache_argument: self._cache, "use_cache": True}
        if self._has_logits_to_keep and logits_to_keep is not None:
            kwargs["logits_to_keep"] = logits_to_keep
        try:
            output = self.model.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        except BaseException:
            # A forward that died half-way may have appended to some layers only:
            # nothing in the cache can be trusted any more.
            self.reset()
            raise
        self.tokens.extend(int(t) for t in new_tokens)
        logits = output.logits[0]  # [n or logits_to_keep, V]
        if logits_to_keep is not None:
            logits = logits[-logits_to_keep:]
        assert logits.shape[-1] == self.model.vocab_size, (logits.shape, self.model.vocab_size)
        return logits.float()

    def check_extend(self, new_tokens: Sequence[int], logits_to_keep: int | None) -> None:
        """Raise ``InvalidArgument`` unless ``extend(new_tokens, logits_to_keep)`` may run."""
        n = len(new_tokens)
        if n == 0:
            raise InvalidArgument("extend needs at least one new token")
        if logits_to_keep is not None and not 1 <= logits_to_keep <= n:
            raise InvalidArgument(f"logits_to_keep must be in [1, {n}], got {logits_to_keep}")
        _check_ids(new_tokens, self.model.vocab_size)
        if len(self.tokens) + n > self.model.max_context:
            raise InvalidArgument(
                f"{len(self.tokens)} cached + {n} new tokens exceed the context of "
                f"{self.model.name!r} ({self.model.max_context} positions)"
            )

    def check_rollback(self, length: int) -> None:
        """Raise ``InvalidArgument`` unless 0 <= length <= len(self)."""
        if not 0 <= length <= len(self.tokens):
            raise InvalidArgument(f"cannot roll back to {length}: cache holds {len(self.tokens)}")

    @torch.inference_mode()
    def rollback(self, length: int) -> None:
        """Forget every cached token from position ``length`` on (0 <= length <= len(self))."""
        self.check_rollback(length)
        removed = len(self.tokens) - length
        if removed == 0:
            return
        if length == 0:
            self.reset()
            return
        # Negative counts mean "remove that many": the only form every version accepts.
        self._cache.crop(-removed)
        del self.tokens[length:]

    def sync(self, tokens: Sequence[int]) -> int:
        """Roll back to the longest common prefix with ``tokens``; return its length (reused).

        Does not compute the rest: the caller extends with tokens[reused:].
        """
        reused = _common_prefix_length(self.tokens, tokens)
        self.rollback(reused)
        return reused

    def reset(self) -> None:
        """Drop everything (fresh cache)."""
        self.tokens = []
        self._cache = _new_cache()

    def release(self) -> None:
        """Free the cache's memory for good: its session is gone (evicted or released)."""
        self.reset()

    def reserve(self, length: int) -> bool:
        """Promise this cache memory for ``length`` positions; False when there is none to
        promise. An HF cache grows freely: always True (a ``PagedCache`` reserves blocks)."""
        return True

    def unreserve(self) -> None:
        """End ``reserve``'s promise (its turn ended)."""

    def layer_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, the (keys, values) of the cached tokens, each [1, H, len(self), D].

        [] while nothing is cached; None when a layer is not a plain full-attention
        ``DynamicLayer`` holding exactly len(self) positions (sliding or indexed layers,
        recurrent state): such a cache cannot be lined up with others in a batch.
        """
        if not self.tokens:
            return []
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self._cache, "layers", None)
        if not layers:
            return None
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if type(layer) is not DynamicLayer or not (
                isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
            ):
                return None
            if keys.dim() != 4 or keys.shape[0] != 1 or keys.shape[-2] != len(self.tokens):
                return None
            if values.dim() != 4 or values.shape[:3] != keys.shape[:3]:
                return None
            kv.append((keys, values))
        return kv

    def replace_kv(
        self, tokens: Sequence[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Make the cache hold ``tokens``, whose keys/values were computed elsewhere.

        kv[i] = (keys, values) of layer i, each [1, H, len(tokens), D], e.g. one row of
        a batched forward. The tensors are kept as given (not copied); the caller must
        not write to them afterwards.
        """
        self.check_replace(tokens, kv)
        layers = getattr(self._cache, "layers", None) or []
        if len(layers) == len(kv) and all(
            getattr(layer, "is_initialized", False) for layer in layers
        ):
            for layer, (keys, values) in zip(layers, kv, strict=True):  # no new cache objects
                layer.keys, layer.values = keys, values
        else:
            self._cache = dynamic_cache_of(kv)
        self.tokens = [int(t) for t in tokens]

    def check_replace(
        self, tokens: Sequence[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Raise ``InvalidArgument`` unless ``replace_kv(tokens, kv)`` may run."""
        n = len(tokens)
        if n == 0:
            raise InvalidArgument("replace_kv needs at least one token (use reset to empty)")
        if not kv:
            raise InvalidArgument("replace_kv needs the keys/values of at least one layer")
        kept = len(self.tokens)
        # Usually the cached tokens plus a few: check only what is new.
        _check_ids(
            tokens[kept:] if list(tokens[:kept]) == self.tokens else tokens, self.model.vocab_size
        )
        if n > self.model.max_context:
            raise InvalidArgument(
                f"{n} tokens exceed the context of {self.model.name!r} "
                f"({self.model.max_context} positions)"
            )
        for index, (keys, values) in enumerate(kv):
            if keys.dim() != 4 or keys.shape[0] != 1 or keys.shape[-2] != n:
                raise InvalidArgument(
                    f"layer {index}: keys must be [1, H, {n}, D], got {tuple(keys.shape)}"
                )
            if values.dim() != 4 or values.shape[:3] != keys.shape[:3]:
                raise InvalidArgument(
                    f"layer {index}: values must be [1, H, {n}, D], got {tuple(values.shape)}"
                )

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values."""
        total = 0
        for layer in getattr(self._cache, "layers", ()):
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def __repr__(self) -> str:
        return f"SequenceCache(model={self.model.name!r}, tokens={len(self.tokens)})"


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    # Fast path: the usual caller extends what is cached (a is a prefix of b).
    if list(a[:n]) == list(b[:n]):
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    for token in ids:
        try:
            value = operator.index(token)
        except TypeError:
            raise InvalidArgument(f"token id {token!r} is not an integer") from None
        if isinstance(token, bool) or not 0 <= value < vocab_size:
            raise InvalidArgument(
                f"token id {token!r} is outside the model's vocabulary [0, {vocab_size})"
            )
