"""Int8 draft weights: a quantized copy that drafts nearly as the float one, and the setting.

That the output does not change is the greedy equivalence suite's job (its
``close_draft_int8`` drafter) and the services' end-to-end tests' (a CPU draft
quantizes by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from draft_service.config import DraftConfig
from specdec.config import load_config
from specdec.drafters.model_drafter import ModelDrafter
from specdec.models import DEMO_DRAFT, load_model
from specdec.quantize import int8_weights, quantize_unsupported
from specdec.sampling import SamplingParams


def float_linears(model: Any) -> int:
    return sum(type(m) is torch.nn.Linear for m in model.modules())


def int8_linears(model: Any) -> int:
    return sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def test_int8_copy_quantizes_the_linear_layers_and_leaves_the_original(
    loaded: Callable[..., Any],
) -> None:
    model = loaded("llama", "draft")
    assert quantize_unsupported(model) is None
    quantized = int8_weights(model)
    linears = float_linears(model.model)
    assert linears > 0 and int8_linears(model.model) == 0  # the original is untouched
    assert float_linears(quantized.model) == 0  # every one replaced
    assert int8_linears(quantized.model) >= linears
    assert quantized.model is not model.model and quantized.name == model.name
    assert quantized.model.model.embed_tokens.weight.dtype == torch.float32


def test_the_demo_draft_drafts_nearly_the_same_tokens_with_int8_weights() -> None:
    """Greedy drafting from many contexts: the int8 copy's token is the float one's at most
    positions (quantization moves the logits a little, not the ranking)."""
    model = load_model(str(DEMO_DRAFT))
    drafters = ModelDrafter(model), ModelDrafter(int8_weights(model))
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
    ids = model.tokenizer(text)["input_ids"]
    same = total = 0
    for end in range(4, len(ids)):
        float_block, int8_block = (
            d.propose(ids[:end], 4, SamplingParams()).token_ids for d in drafters
        )
        same += sum(a == b for a, b in zip(float_block, int8_block, strict=True))
        total += len(float_block)
    assert total >= 40 and same / total >= 0.8, (same, total)


def test_only_float32_cpu_drafts_quantize(loaded: Callable[..., Any]) -> None:
    model = loaded("llama", "draft")
    bf16 = load_model(model.name, dtype="bfloat16")
    reason = quantize_unsupported(bf16)
    assert reason is not None and "float32" in reason
    with pytest.raises(ValueError, match="float32"):
        int8_weights(bf16)


def test_quantize_setting() -> None:
    assert load_config(DraftConfig, [], env={}).quantize == "auto"
    assert load_config(DraftConfig, ["--quantize", "none"], env={}).quantize == "none"
    assert load_config(DraftConfig, [], env={"SPECDEC_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'int4'"
        load_config(DraftConfig, ["--quantize", "int4"], env={})
