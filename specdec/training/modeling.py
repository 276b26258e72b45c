"""Model shapes of the demo pair and the small HF helpers training and evaluation share.

Sizes were chosen for speculative decoding on a CPU at batch 1 (2 cores, fp32, HF forward
with a KV cache), where a call costs about 0.55 ms per decoder layer of fixed overhead at
this width plus ~1.5 ms per call, nearly independent of width: a deep, narrow oracle
(30 layers × 256, ~17 ms a call) against a two-layer draft of the same width (~2.6 ms)
maximises t_oracle / t_draft within the 50 MB weight budget. The draft has two layers,
not one, because copying from the context (induction: "the token that followed the
last occurrence of this one"), which code continuations rely on, needs two attention
layers; with equal widths it starts from the oracle's embeddings and first layers.
"""

from __future__ import annotations

import inspect
import math
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from specdec.core.errors import InvalidArgument


@dataclass(frozen=True)
class ModelSize:
    """Shape of a Llama decoder: width, depth, MLP width, query heads, key/value heads."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int

    def __str__(self) -> str:
        return (
            f"{self.hidden_size},{self.num_layers},{self.intermediate_size},"
            f"{self.num_heads},{self.num_kv_heads}"
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


ORACLE_SIZE = ModelSize(256, 30, 512, 4, 2)
DRAFT_SIZE = ModelSize(256, 2, 512, 4, 2)
TINY_ORACLE_SIZE = ModelSize(64, 2, 128, 2, 1)
TINY_DRAFT_SIZE = ModelSize(64, 1, 128, 2, 1)


def parse_size(text: str) -> ModelSize:
    """Parse ``HIDDEN,LAYERS,FFN,HEADS,KV_HEADS`` (e.g. ``256,24,704,4,2``)."""
    parts = text.replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 5 or min(values) <= 0:
        raise InvalidArgument(
            f"model size {text!r}: expected 5 positive integers HIDDEN,LAYERS,FFN,HEADS,KV_HEADS"
        )
    size = ModelSize(*values)
    if size.hidden_size % size.num_heads or size.num_heads % size.num_kv_heads:
        raise InvalidArgument(
            f"model size {text!r}: HIDDEN must be divisible by HEADS and HEADS by KV_HEADS"
        )
    return size


def llama_config(size: ModelSize, vocab_size: int, eot_id: int, max_positions: int) -> LlamaConfig:
    """A LlamaConfig with tied embeddings; ``<|endoftext|>`` is BOS, EOS and padding."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """Random init; residual-branch outputs scaled by 1/sqrt(2·layers) (GPT-2) for depth."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, std)
            layer.mlp.down_proj.weight.normal_(0.0, std)
    return model


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (a tied embedding counts once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (newest) or the old one."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: DynamicCache | None = None,
    logits_to_keep: int = 0,
    cache_arg: str | None = None,
) -> torch.Tensor:
    """Logits (B, T', V) of ``input_ids`` (B, T), appending to ``cache`` when given."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "logits_to_keep": logits_to_keep}
    if cache is not None:
        kwargs[cache_arg or cache_kwarg(model)] = cache
        kwargs["use_cache"] = True
    else:
        kwargs["use_cache"] = False
    logits: torch.Tensor = model(**kwargs).logits
    return logits


def save_model(model: LlamaForCausalLM, folder: Path) -> int:
    """Save a bf16 copy as safetensors (config ``dtype`` bfloat16); returns bytes written.

    Loaders that want fp32 on CPU pass ``dtype=torch.float32``: bf16 → fp32 is exact.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # deepcopy keeps the embedding / LM-head tie, so the tensor is stored once.
    copy: LlamaForCausalLM = deepcopy(model)
    torch.nn.Module.to(copy, "cpu", torch.bfloat16)  # (HF's typed wrapper of .to confuses mypy)
    copy.config.use_cache = True
    copy.save_pretrained(str(folder), safe_serialization=True)
    weights = sorted(folder.glob("*.safetensors"))
    for path in weights:
        path.chmod(0o644)  # safetensors writes 0600; the folder is committed and shared
    return sum(p.stat().st_size for p in weights)
