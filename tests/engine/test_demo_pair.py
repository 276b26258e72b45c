"""The shipped demo pair: loadable, compatible, small, and exact under speculation."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from specdec.core.sampling import SamplingParams
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.engine.models import DEMO_DIR, DEMO_DRAFT, DEMO_ORACLE, check_compatible, load_model
from specdec.engine.oracle import Oracle
from specdec.generate import speculative_generate

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def fibonacci(n):\n",
    "    for i, line in enumerate(lines):\n        if",
]


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    oracle, draft = load_model(str(DEMO_ORACLE)), load_model(str(DEMO_DRAFT))
    return oracle, draft


@pytest.fixture(scope="module")
def references(pair: tuple[Any, Any]) -> dict[str, tuple[list[int], list[int]]]:
    """prompt text -> (prompt ids, HF greedy generate of the oracle alone)."""
    oracle, _ = pair
    out = {}
    for text in PROMPTS:
        prompt = oracle.tokenizer(text)["input_ids"]
        with torch.inference_mode():
            generated = oracle.model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=40,
                pad_token_id=0,
                eos_token_id=list(oracle.eos_token_ids),
            )
        out[text] = (prompt, generated[0, len(prompt) :].tolist())
    return out


def test_weights_fit_the_budget_and_have_a_card() -> None:
    weights = sum(p.stat().st_size for p in DEMO_DIR.rglob("*.safetensors"))
    assert weights <= 50 * 1000 * 1000
    card = (DEMO_DIR / "README.md").read_text()
    for heading in ("## Corpus", "## Training", "## Acceptance"):
        assert heading in card
    metrics = json.loads((DEMO_DIR / "metrics.json").read_text())
    assert metrics  # written by the training command


def test_pair_is_compatible_llama(pair: tuple[Any, Any]) -> None:
    oracle, draft = pair
    check_compatible(draft, oracle)
    assert oracle.model.config.model_type == draft.model.config.model_type == "llama"
    assert oracle.dtype == torch.float32  # stored bf16, computed fp32 on CPU


@pytest.mark.parametrize("drafter_kind", ["model-1", "model-2", "model-4", "model-8", "ngram"])
def test_speculation_equals_oracle_alone(
    pair: tuple[Any, Any], references: dict[str, tuple[list[int], list[int]]], drafter_kind: str
) -> None:
    oracle, draft = pair
    for prompt, reference in references.values():
        if drafter_kind == "ngram":
            drafter: Any = NgramDrafter()
            k = 4
        else:
            drafter = ModelDrafter(draft)
            k = int(drafter_kind.split("-")[1])
        result = speculative_generate(
            prompt,
            Oracle(oracle),
            drafter,
            SamplingParams(max_new_tokens=40),
            k,
            eos_token_ids=oracle.eos_token_ids,
        )
        assert result.tokens == reference, (drafter_kind, prompt)
        if drafter_kind.startswith("model"):
            assert result.stats.accepted > 0  # the distilled draft does agree
