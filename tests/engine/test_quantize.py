"""Int8 draft weights: a quantized copy that drafts nearly as the float one, and the setting.

That the output does not change is the greedy equivalence suite's job (its
``close_draft_int8`` drafter) and the services' end-to-end tests' (a CPU draft
quantizes by default).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from draft_service.config import DraftConfig
from specdec.config import load_config
from specdec.core.sampling import SamplingParams
from specdec.drafters.model_drafter import ModelDrafter
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.lean_forward import LeanCache, LeanModel, RowsOf
from specdec.engine.models import DEMO_DRAFT, load_model
from specdec.engine.quantize import int8_weights, quantize_unsupported
from tests.cluster_tools import run_script


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


def test_int8_projections_stack_into_one_layer_with_the_same_weights(
    loaded: Callable[..., Any],
) -> None:
    # On the lean forward q/k/v (and gate/up) of an int8 draft run as one int8 layer
    # whose rows are the very same int8 weights: the logits do not move. The HF modules
    # become views of its rows (RowsOf), so nothing is stored twice and HF's forward
    # still computes what the separate layers did.
    model = loaded("llama", "draft")
    stacked, separate = int8_weights(model), int8_weights(model)
    prompt = [5, 9, 14, 3, 22, 7, 40]
    lean, hf = LeanCache(stacked), SequenceCache(separate)
    torch.testing.assert_close(lean.extend(prompt), hf.extend(prompt), rtol=0, atol=1e-6)
    torch.testing.assert_close(lean.extend([11]), hf.extend([11]), rtol=0, atol=1e-6)

    attention = stacked.model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    assert isinstance(q, RowsOf) and k.stacked is q.stacked and v.stacked is q.stacked
    original = separate.model.model.layers[0].self_attn
    ints = [getattr(original, n).weight().int_repr() for n in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(q.stacked.weight().int_repr(), torch.cat(ints))
    assert isinstance(stacked.model.model.layers[0].mlp.up_proj, RowsOf)
    assert LeanModel(stacked).layers[0].qkv is q.stacked  # a second one reuses it

    via_hf = SequenceCache(stacked)
    torch.testing.assert_close(
        via_hf.extend(prompt), SequenceCache(separate).extend(prompt), rtol=0, atol=1e-6
    )


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


def test_the_draft_step_benchmark_times_each_process_count(
    model_dir: Callable[[str, str], Path], tmp_path: Path
) -> None:
    model = str(model_dir("llama", "draft"))
    printed, rows = run_script(
        "bench_draft_step.py", "--model", model, "--processes", "1,2", "--steps", "60",
        out=tmp_path / "step.json",
    )  # fmt: skip
    assert "median ms" in printed
    assert [row["processes"] for row in rows] == [1, 2]
    assert [len(row["process_medians_ms"]) for row in rows] == [1, 2]
    assert rows[0]["vs_first"] == 1.0
    assert all(0 < row["median_ms"] <= row["slowest_ms"] for row in rows)
