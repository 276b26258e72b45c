"""Benchmark workloads: code-completion prompts cut from the demo pair's held-out files,
and a useless draft.

The demo models never trained on the held-out standard-library files (see the
model card), so prompts cut from them are in-domain but unseen. Each prompt is
the text of a file up to the end of a ``def`` line, keeping its last
``prompt_tokens`` tokens: the model is asked to write the function's body.

A useless draft is what a user gets whose draft does not know their domain, at its
worst: the draft's architecture and tokenizer with random weights, seeded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from specdec.training import corpus

DEF_LINE = re.compile(r"^\s*def \w+\(.*\):\s*$", re.MULTILINE)


def heldout_prompts(
    encode: Callable[[str], Sequence[int]],
    count: int,
    prompt_tokens: int = 192,
    eval_permille: int = corpus.DEFAULT_EVAL_PERMILLE,
) -> list[list[int]]:
    """``count`` prompts (token ids), at most one per held-out file, in a fixed order."""
    files = corpus.collect((corpus.STDLIB,), eval_permille=eval_permille).split("eval")
    prompts: list[list[int]] = []
    for file in files:
        defs = [m for m in DEF_LINE.finditer(file.text) if m.start() > 400]
        if not defs:
            continue
        cut = defs[len(defs) // 2].end() + 1  # a function in the middle of the file
        ids = list(encode(file.text[:cut]))
        if len(ids) >= prompt_tokens // 2:
            prompts.append(ids[-prompt_tokens:])
        if len(prompts) == count:
            break
    if len(prompts) < count:
        raise RuntimeError(f"found only {len(prompts)} prompts in the held-out files")
    return prompts


def useless_draft(template: str, out: Path, seed: int = 0) -> Path:
    """A model folder at ``out``: ``template``'s config and tokenizer, random weights
    (``seed``), float32. Its proposals are almost never accepted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(template)
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(template).save_pretrained(out)
    return out
