"""The model card (README.md) of a trained pair, rendered from its metrics.json content."""

from __future__ import annotations

from typing import Any

# Keys of metrics.json the card and tests rely on.
METRICS_KEYS = (
    "command",
    "seed",
    "hardware",
    "versions",
    "options",
    "corpus",
    "tokenizer",
    "oracle",
    "draft",
    "acceptance",
    "timing",
    "speedup",
    "stage_seconds",
    "total_seconds",
)


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(m: dict[str, Any]) -> str:
    """Markdown model card: corpus, command, configs, losses, acceptance, timing, hardware."""
    corpus, acc = m["corpus"], m["acceptance"]
    oracle, draft = m["oracle"], m["draft"]
    ks = list(acc["greedy"]["tokens_per_round"])
    roots = [
        [name, ", ".join(f"{d} {v}" for d, v in r["versions"].items()), r["files"], r["bytes"]]
        for name, r in corpus["roots"].items()
    ]
    sizes = [
        [
            name,
            info["size"]["hidden_size"],
            info["size"]["num_layers"],
            info["size"]["intermediate_size"],
            f"{info['size']['num_heads']}/{info['size']['num_kv_heads']}",
            f"{info['params']:,}",
            f"{info['weights_bytes'] / 1e6:.1f} MB",
        ]
        for name, info in (("oracle", oracle), ("draft", draft))
    ]
    acc_rows = [
        ["greedy (oracle's greedy continuations)", acc["greedy"]["acceptance"]]
        + [acc["greedy"]["tokens_per_round"][k] for k in ks],
        ["temperature 1 (oracle-sampled continuations)", acc["t1"]["acceptance"]]
        + [acc["t1"]["tokens_per_round"][k] for k in ks],
    ]
    parts = [
        "# specdec demo models: oracle + draft",
        "",
        "Two `llama`-architecture causal language models of Python source, trained from "
        "scratch by `specdec train` for speculative decoding: `oracle/` is the target, "
        f"`draft/` a {draft['size']['num_layers']}-layer model distilled from it. "
        "Both folders hold the same tokenizer "
        "and load with `AutoModelForCausalLM` / `AutoTokenizer`. Weights are stored in "
        "bfloat16; on CPU load them as fp32 (exact):",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("specdec/demo_models/oracle")',
        "oracle = AutoModelForCausalLM.from_pretrained(",
        '    "specdec/demo_models/oracle", dtype=torch.float32',
        ")",
        "```",
        "",
        "They are toys: small, trained for minutes on "
        f"{corpus['bytes']['train'] / 1e6:.0f} MB of code, "
        f"on {m['options']['oracle']['seq_len']}-token windows. They exist so the system "
        "has a real pair to run and measure without downloading anything.",
        "",
        "## Corpus",
        "",
        "CPython's standard library (without test suites, IDLE, lib2to3, ensurepip, "
        "turtledemo, pydoc_data) and the Python source of the installed packages specdec "
        "depends on, read where they are installed; identical files kept once, files over "
        f"{m['options']['max_file_bytes']:,} bytes, generated `*_pb2.py` and data-like "
        "files (lines over 1000 characters) skipped.",
        "",
        _table(["root", "versions", "files", "bytes"], roots),
        "",
        f"- Files: {corpus['files']['train']:,} training, {corpus['files']['eval']:,} held out; "
        f"bytes {corpus['bytes']['train']:,} / {corpus['bytes']['eval']:,}; "
        f"skipped {corpus['skipped']}; packages not installed: {corpus['missing_packages']}.",
        f"- Tokens: {corpus['tokens']['train']:,} training, {corpus['tokens']['validation']:,} "
        f"validation, {corpus['tokens']['test']:,} test"
        + (
            f" ({corpus['unused_train_files']} training files over --max-corpus-tokens unused)"
            if corpus["unused_train_files"]
            else ""
        )
        + ".",
        f"- Held-out rule: {corpus['heldout_rule']}.",
        f"- File list: `{corpus['file_list']}` (split, root, path, sha256, bytes, tokens); "
        f"sha256 of its uncompressed text `{corpus['file_list_sha256']}`.",
        "",
        "## Tokenizer",
        "",
        f"{m['tokenizer']['type']}, vocabulary {m['tokenizer']['vocab_size']}, trained on the "
        "training split only. Lossless on any text (indentation, tabs, unicode). "
        "`<|endoftext|>` (id 0) separates files and is BOS, EOS and padding; encoding "
        "adds no special tokens.",
        "",
        "## Models",
        "",
        _table(["model", "hidden", "layers", "MLP", "heads/kv", "parameters", "weights"], sizes),
        "",
        "Tied input/output embeddings, RoPE, RMSNorm, SwiGLU, grouped-query attention. "
        "The draft starts from the oracle's embedding, final norm and first layers "
        f"({len(draft['initialised_from_oracle'])} tensors copied).",
        "",
        "## Training",
        "",
        f"Command (seed {m['seed']}), on {m['hardware']}:",
        "",
        "```",
        m["command"],
        "```",
        "",
        f"- Oracle: {oracle['train']['steps']:,} steps, {oracle['train']['tokens']:,} tokens, "
        f"{oracle['train']['seconds']} s; final training loss "
        f"{_f(oracle['train']['final_train_loss'])}, best held-out (validation) loss "
        f"{_f(oracle['train']['best_eval'])} nats/token at step {oracle['train']['best_step']}.",
        f"- Draft: forward KL + TVD to the oracle on {m['options']['distill']['gen_sequences']:,} "
        "oracle continuations (half greedy, half sampled at T=1) of training prompts, "
        f"plus corpus windows; {draft['train']['steps']:,} steps, {draft['train']['seconds']} s; "
        f"final training loss {_f(draft['train']['final_train_loss'])}, held-out KL "
        f"{_f(draft['train']['best_eval'])} at step {draft['train']['best_step']}.",
        f"- Stage times (s): {m['stage_seconds']}; total {m['total_seconds']} s.",
        f"- Versions: {m['versions']}.",
        "",
        "## Acceptance",
        "",
        f"On {acc['prompts']} prompts of {acc['prompt_len']} tokens cut from the held-out "
        f"test files, continued {acc['gen_len']} tokens by the oracle itself. Greedy: the "
        "share of positions where the draft's argmax equals the oracle's token, and tokens "
        "per round simulated exactly along those continuations. Temperature 1: mean of "
        "Σ min(p, q) and (1 − α^(k+1))/(1 − α). Measured where the pair was trained "
        "(bf16 autocast on CUDA); `specdec eval-pair --pair DIR` measures again anywhere.",
        "",
        _table(
            ["decoding", "per-token acceptance"] + [f"tokens/round k={k}" for k in ks], acc_rows
        ),
        "",
    ]
    if m.get("timing"):
        t = m["timing"]
        parts += [
            "## CPU cost and theoretical speedup",
            "",
            f"fp32, batch 1, {t['threads']} threads, HF forward with a {t['context']}-token KV "
            f"cache, median of {t['reps']} calls ({t['cpu']}, torch {t['torch']}): "
            f"t_draft(1) = {_f(t['t_draft_1_ms'], 2)} ms, "
            f"t_oracle(1) = {_f(t['t_oracle_1_ms'], 2)} ms, "
            + ", ".join(f"t_oracle({n}) = {_f(v, 2)} ms" for n, v in t["t_oracle_ms"].items())
            + ". Speedup = tokens_per_round(k) · t_oracle(1) / (k · t_draft(1) + t_oracle(k+1)):",
            "",
            _table(["k", "greedy speedup"], [[k, v] for k, v in m["speedup"].items()]),
            "",
        ]
    return "\n".join(parts)
