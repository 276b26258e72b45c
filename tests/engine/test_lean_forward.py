"""The lean forward computes HF's logits, through every cache operation a drafter or the
oracle uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from specdec.core.errors import InvalidArgument
from specdec.drafters.model_drafter import ModelDrafter
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.lean_forward import LeanCache, LeanModel, lean_unsupported
from specdec.engine.models import DEMO_DRAFT, load_model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_cache_gives_hfs_logits(arch: str, loaded: Callable[..., Any]) -> None:
    model = loaded(arch, "draft")
    assert lean_unsupported(model) is None
    hf, lean = SequenceCache(model), LeanCache(model)

    def both(call: Callable[[SequenceCache], Any]) -> None:
        expected, got = call(hf), call(lean)
        if isinstance(expected, torch.Tensor):
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        else:
            assert got == expected
        assert lean.tokens == hf.tokens

    prompt = [5, 9, 14, 3, 22, 7, 40]
    both(lambda c: c.extend(prompt))  # prefill: causal among the new tokens
    both(lambda c: c.extend([11]))  # one token
    both(lambda c: c.extend([12, 13, 60], logits_to_keep=2))
    both(lambda c: c.rollback(8))  # drop a rejected tail
    both(lambda c: c.sync([*prompt, 11, 70, 71]))  # keeps the common prefix: 8
    both(lambda c: c.extend([70, 71]))
    both(lambda c: c.extend(list(range(3, 90))))  # past the first buffer: it grows
    both(lambda c: c.rollback(0))
    both(lambda c: c.extend([8, 9]))
    assert lean.memory_bytes() > 0


def test_lean_cache_takes_keys_and_values_computed_elsewhere(loaded: Callable[..., Any]) -> None:
    """``replace_kv``, as the oracle's batched verify uses it: an HF cache's keys/values
    copied in (growing the buffer, then shrinking the tokens), the next logits HF's."""
    model = loaded("llama", "oracle")
    hf, lean = SequenceCache(model), LeanCache(model)
    lean.extend([5, 6, 7])
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for tokens in ([t % model.vocab_size for t in range(3, 100)], [9, 10, 11]):
        hf.reset()
        hf.extend(tokens)
        kv = hf.layer_kv()
        assert kv
        lean.replace_kv(tokens, kv)
        assert lean.tokens == tokens
        torch.testing.assert_close(lean.extend([42]), hf.extend([42]), rtol=1e-4, atol=1e-4)
    assert kv
    with pytest.raises(InvalidArgument, match="layers"):
        lean.replace_kv([1, 2], [(kv[0][0][:, :, :2], kv[0][1][:, :, :2])])
    assert lean.tokens == [9, 10, 11, 42]  # a refused replace changes nothing


def test_lean_cache_refuses_what_sequence_cache_refuses(loaded: Callable[..., Any]) -> None:
    model = loaded("llama", "draft")
    cache = LeanCache(model)
    with pytest.raises(InvalidArgument, match="vocabulary"):
        cache.extend([model.vocab_size])
    with pytest.raises(InvalidArgument, match="at least one"):
        cache.extend([])
    with pytest.raises(InvalidArgument, match="exceed the context"):
        cache.extend([5] * (model.max_context + 1))
    assert cache.tokens == []  # nothing half-applied
    cache.extend([5, 6])
    with pytest.raises(InvalidArgument, match="cannot roll back"):
        cache.rollback(3)


def test_only_llama_family_drafts_take_the_lean_forward(loaded: Callable[..., Any]) -> None:
    gpt2 = loaded("gpt2", "draft")
    reason = lean_unsupported(gpt2)
    assert reason is not None and "gpt2" in reason
    with pytest.raises(InvalidArgument, match="lean forward"):
        LeanCache(gpt2)
    assert type(ModelDrafter(gpt2).cache) is SequenceCache
    # A window the lean forward would not apply: HF's forward keeps it.
    assert "sliding window" in str(lean_unsupported(loaded("mistral", "draft")))
    llama = loaded("llama", "draft")
    assert type(ModelDrafter(llama).cache) is LeanCache
    assert type(ModelDrafter(llama, lean=False).cache) is SequenceCache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_stacked_projections_share_the_models_weights(
    arch: str, loaded: Callable[..., Any]
) -> None:
    # q/k/v (and gate/up) become one matmul each, without a second copy of their weights:
    # the modules keep views of their rows, so HF's forward computes what it did. On a CPU
    # every weight [N, K] is then the transpose of a contiguous [K, N] tensor (the column
    # layout): q's rows are the stacked tensor's first columns.
    model = loaded(arch, "draft")
    prompt = torch.tensor([[5, 9, 14, 3]])
    with torch.inference_mode():
        before = model.model(prompt).logits
    params = sum(p.numel() for p in model.model.parameters())
    LeanModel(model)
    attention = model.model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    storage = q.weight.untyped_storage().data_ptr()
    assert k.weight.untyped_storage().data_ptr() == storage
    assert v.weight.untyped_storage().data_ptr() == storage
    assert k.weight.storage_offset() == q.weight.shape[0]
    assert q.weight.stride() == (1, q.weight.shape[0] + k.weight.shape[0] + v.weight.shape[0])
    assert attention.o_proj.weight.stride(0) == 1
    assert model.model.lm_head.weight.stride(0) == 1
    if arch == "qwen2":
        assert v.bias.untyped_storage().data_ptr() == q.bias.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.model.parameters()) == params
    with torch.inference_mode():
        assert torch.equal(model.model(prompt).logits, before)
    LeanModel(model)  # a second one finds them stacked and moves nothing
    assert q.weight.untyped_storage().data_ptr() == storage


def test_tied_embeddings_stay_one_tensor_in_the_column_layout() -> None:
    """The demo draft ties its vocabulary projection to its embeddings: on a CPU both move
    to the column layout together, and the logits do not change."""
    model = load_model(str(DEMO_DRAFT))
    lm_head, embed = model.model.lm_head, model.model.model.embed_tokens
    assert lm_head.weight is embed.weight
    prompt = torch.tensor([[5, 9, 14, 3]])
    with torch.inference_mode():
        before = model.model(prompt).logits
    lean = LeanCache(model)
    assert lm_head.weight is embed.weight and lm_head.weight.stride(0) == 1
    with torch.inference_mode():
        torch.testing.assert_close(model.model(prompt).logits, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean.extend([5, 9, 14, 3]), before[0], rtol=1e-4, atol=1e-4)
