"""Real model shapes with random weights (``random:NAME``), built at tiny scale."""

from __future__ import annotations

import pytest
import torch

from specdec.bench.shapes import SHAPES, parameters, parse, tokenizer_source
from specdec.core.errors import InvalidArgument
from specdec.engine.lean_forward import lean_unsupported
from specdec.engine.models import DEMO_ORACLE, load_model


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_builds_small_with_its_heads_and_ratios(name: str) -> None:
    shape = SHAPES[name]
    loaded = load_model(f"random:{name}:layers=2,head_dim=4,context=64", "cpu", "float32")
    config = loaded.model.config
    assert config.model_type == shape.model_type and config.num_hidden_layers == 2
    assert (config.num_attention_heads, config.num_key_value_heads) == (shape.heads, shape.kv_heads)
    assert config.hidden_size == 4 * shape.heads
    assert config.intermediate_size == config.hidden_size * shape.inner // shape.hidden
    assert sum(p.numel() for p in loaded.model.parameters()) == parameters(
        parse(f"random:{name}:layers=2,head_dim=4")[1], loaded.vocab_size
    )
    assert (
        loaded.max_context == 64 and loaded.vocab_size == 8192 and lean_unsupported(loaded) is None
    )
    again = load_model(f"random:{name}:layers=2,head_dim=4,context=64", "cpu", "float32")
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.parameters(), again.model.parameters(), strict=True)
    )  # seeded: two processes build the same model


def test_the_full_sizes_are_the_real_models_less_their_vocabulary() -> None:
    # Llama-3.1-8B is 8.03B with its 128k vocabulary; 7.05B with the demo tokenizer.
    assert round(parameters(SHAPES["llama-3.1-8b"], 8192) / 1e9, 2) == 7.05
    assert round(parameters(SHAPES["llama-3.1-8b"], 128256) / 1e9, 2) == 8.03
    assert round(parameters(SHAPES["qwen2.5-7b"], 152064) / 1e9, 2) == 7.62
    assert round(parameters(SHAPES["llama-3.2-1b"], 128256) / 1e9, 2) == 1.24


def test_bad_names_are_clear() -> None:
    with pytest.raises(InvalidArgument, match="unknown model shape 'llama-9b'"):
        parse("random:llama-9b")
    with pytest.raises(InvalidArgument, match="bad override 'layers=0'"):
        parse("random:llama-3.1-8b:layers=0")
    with pytest.raises(InvalidArgument, match="bad override 'width=3'"):
        parse("random:llama-3.1-8b:width=3")
    assert tokenizer_source("random:llama-3.1-8b") == str(DEMO_ORACLE)
    assert tokenizer_source("some/model") == "some/model"
