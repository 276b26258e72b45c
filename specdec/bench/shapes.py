"""Real model shapes with random weights, for benchmarks: ``--model random:llama-3.1-8b``.

A benchmark of the oracle at real scale needs a real model's shape (what sets the bytes
read per forward, the KV per token, the kernels' sizes), not its weights. So a model
named ``random:NAME`` is built from the shape table below with the demo tokenizer
(8,192 ids), initialised at random (seeded, so two processes build the same model), in
the asked dtype, directly on the asked device (an 8B model in bf16 is 14.1 GB: no disk,
no host copy). Its output is meaningless and no real draft agrees with it; benchmarks
pair it with ``specdec.drafters.controlled``.

Overrides after the name, for tests and smaller runs: ``random:llama-3.1-8b:layers=2,
head_dim=4,context=256,seed=1`` keeps the heads, the grouped-query ratio and the
FFN/width ratio at that head size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from specdec.core.errors import InvalidArgument

PREFIX = "random:"
DEFAULT_CONTEXT = 4096  # positions (the real models take more; the benchmarks need less)


@dataclass(frozen=True)
class Shape:
    """A decoder's shape (Llama layout: rotary, GQA, gated MLP)."""

    model_type: str  # llama or qwen2 (q/k/v biases)
    layers: int
    hidden: int
    inner: int  # FFN width
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    tie_embeddings: bool
    context: int = DEFAULT_CONTEXT
    seed: int = 0


SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": Shape("llama", 16, 2048, 8192, 32, 8, 64, 500000.0, True),
    "llama-3.2-3b": Shape("llama", 28, 3072, 8192, 24, 8, 128, 500000.0, True),
    "llama-3.1-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128, 500000.0, False),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 18944, 28, 4, 128, 1000000.0, False),
    "llama-3-70b": Shape("llama", 80, 8192, 28672, 64, 8, 128, 500000.0, False),
}
OVERRIDES = ("layers", "head_dim", "context", "seed")


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> tuple[str, Shape]:
    """``random:NAME[:key=value,...]`` -> (NAME, its shape with the overrides)."""
    body = name[len(PREFIX) :]
    key, _, extra = body.partition(":")
    shape = SHAPES.get(key.lower())
    if shape is None:
        raise InvalidArgument(f"unknown model shape {key!r}; known: {', '.join(SHAPES)}")
    for item in filter(None, extra.split(",")):
        field, _, value = item.partition("=")
        if field not in OVERRIDES or not value.isdigit() or (int(value) < 1 and field != "seed"):
            raise InvalidArgument(
                f"bad override {item!r} in {name!r}: use {', '.join(OVERRIDES)} = a positive int"
            )
        number = int(value)
        if field == "head_dim":  # the same heads and ratios at another head size
            width = shape.heads * number
            shape = replace(
                shape, head_dim=number, hidden=width, inner=width * shape.inner // shape.hidden
            )
        elif field == "layers":
            shape = replace(shape, layers=number)
        elif field == "context":
            shape = replace(shape, context=number)
        else:
            shape = replace(shape, seed=number)
    return key.lower(), shape


def parameters(shape: Shape, vocab_size: int) -> int:
    """Parameters of ``shape`` with a ``vocab_size`` vocabulary."""
    attention = shape.hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    if shape.model_type == "qwen2":
        attention += shape.head_dim * (shape.heads + 2 * shape.kv_heads)
    per_layer = attention + 3 * shape.hidden * shape.inner + 2 * shape.hidden
    embeddings = vocab_size * shape.hidden * (1 if shape.tie_embeddings else 2)
    return shape.layers * per_layer + embeddings + shape.hidden


def hf_config(shape: Shape, tokenizer: Any, vocab_size: int) -> Any:
    """The transformers config of ``shape``."""
    import transformers

    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.inner,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.context,
        "rope_parameters": {"rope_theta": shape.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": 0.02,
    }
    if shape.model_type == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **kwargs)
    return transformers.LlamaConfig(**kwargs)


def load_random(name: str, device: str, dtype: str) -> Any:
    """The ``LoadedModel`` of ``random:NAME...`` (module doc) on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.engine.models import (
        DEMO_ORACLE,
        LoadedModel,
        _eos_token_ids,
        _parse_device,
        _parse_dtype,
        vocab_fingerprint,
    )

    key, shape = parse(name)
    torch_dtype, torch_device = _parse_dtype(dtype), _parse_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_ORACLE))
    vocab_size = len(tokenizer)
    config = hf_config(shape, tokenizer, vocab_size)
    need = parameters(shape, vocab_size) * torch.tensor([], dtype=torch_dtype).element_size()
    if torch_device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch_device)
        if need > free:
            raise InvalidArgument(
                f"{key} in {dtype} needs {need / 2**30:.1f} GiB of weights; {torch_device} has "
                f"{free / 2**30:.1f} GiB free"
            )
    torch.manual_seed(shape.seed)
    with torch.device(torch_device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=torch_device,
        dtype=torch_dtype,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        max_context=shape.context,
        eos_token_ids=_eos_token_ids(model, config, tokenizer),
        fingerprint=vocab_fingerprint(tokenizer),
    )


def tokenizer_source(name: str) -> str:
    """Where ``name``'s tokenizer is: the demo oracle's for a random shape."""
    if is_random(name):
        from specdec.engine.models import DEMO_ORACLE

        return str(DEMO_ORACLE)
    return name
