"""Model cards (README.md) rendered from metrics.json: the demo pair (`specdec train`) and a
draft made by `specdec distill`."""

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


def _command(m: dict[str, Any]) -> list[str]:
    """The card's "Training" heading and the command that made the models, verbatim."""
    return [
        "## Training", "", f"Command (seed {m['seed']}), on {m['hardware']}:", "",
        "```", m["command"], "```", "",
    ]  # fmt: skip


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
        *_command(m),
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


def _before_after_rows(m: dict[str, Any]) -> list[list[Any]]:
    before, after = m["before"], m["after"]
    rows: list[list[Any]] = []
    for mode, name in (("greedy", "greedy"), ("t1", "T=1")):
        b, a = before["acceptance"][mode], after["acceptance"][mode]
        rows.append([f"{name} acceptance per token", b["acceptance"], a["acceptance"],
                     a["acceptance"] - b["acceptance"]])  # fmt: skip
        for k, value in a["tokens_per_round"].items():
            rows.append([f"{name} tokens/round k={k}", b["tokens_per_round"][k], value,
                         value - b["tokens_per_round"][k]])  # fmt: skip
        for k, value in after.get("speedup", {}).get(mode, {}).items():
            old = before["speedup"][mode][k]
            rows.append([f"{name} expected speedup k={k}", old, value, value - old])
    return rows


def before_after_table(m: dict[str, Any]) -> str:
    """The starting draft against the distilled one on the held-out test prompts (markdown)."""
    return _table(["on held-out test text", "before", "after", "change"], _before_after_rows(m))


def render_distilled(m: dict[str, Any]) -> str:
    """Model card of a draft made by `specdec distill`: data, command, losses, acceptance."""
    data, rounds, opts = m["data"], m["draft"]["train"], m["options"]
    acc = m["after"]["acceptance"]
    timing = m.get("timing")
    history = [[h["step"], h["seconds"], h["greedy"], h["t1"]] for h in rounds["history"]]
    parts = [
        f"# Draft for `{m['oracle']['path']}`, distilled by `specdec distill`",
        "",
        f"A draft model for speculative decoding with the oracle `{m['oracle']['path']}` "
        f"({m['oracle']['params']:,} parameters), trained on the oracle's own next-token "
        "distributions over text of the user's domain (DistillSpec, Zhou et al. 2023). "
        f"Starting point: {m['draft']['source']}; {m['draft']['params']:,} parameters, "
        f"{m['draft']['weights_bytes'] / 1e6:.1f} MB of bf16 weights. The tokenizer is the "
        "oracle's, and so are the EOS ids in generation_config.json. Serve it with "
        "`specdec draft --model <this folder>`.",
        "",
        "## Data",
        "",
        f"Sources: {', '.join(f'`{s}`' for s in data['sources'])}. Documents "
        f"{data['documents']['train']:,} training, {data['documents']['eval']:,} held out "
        f"({data['bytes']['train']:,} / {data['bytes']['eval']:,} bytes; skipped "
        f"{data['skipped']}). Tokens: {data['tokens']['train']:,} training, "
        f"{data['tokens']['valid']:,} validation, {data['tokens']['test']:,} test. A document "
        "is held out iff int(sha256('<name>/<key>')[:8], 16) % 1000 < "
        f"{opts['heldout_permille']}; held-out documents alternate between validation "
        "(checkpoint choice) and test (the numbers below).",
        "",
        *_command(m),
        f"- {rounds['rounds']:,} rounds of {opts['rounds']['round_sequences']} prompts of "
        f"{opts['rounds']['prompt_len']} tokens continued by {opts['rounds']['gen_len']} tokens, "
        f"{opts['rounds']['on_policy']:.0%} by the draft itself (on-policy), the rest by the "
        f"oracle; {opts['rounds']['greedy_frac']:.0%} greedy, the rest at T=1. The oracle's "
        f"top-{opts['rounds']['top_k']} log-probabilities at every continuation position are "
        f"the targets; loss {opts['rounds']['loss']} on those bins plus a rest bin.",
        f"- {rounds['steps']:,} steps of {opts['rounds']['batch_size']} sequences, "
        f"{rounds['seconds']:.0f} s; the draft kept is the best on validation (mean of greedy "
        f"and T=1 acceptance), step {rounds['best_step']}.",
        f"- Stage times (s): {m['stage_seconds']}; total {m['total_seconds']} s.",
        f"- Versions: {m['versions']}.",
        "",
        _table(["step", "seconds", "validation greedy acceptance", "validation T=1"], history),
        "",
        "## Acceptance before and after",
        "",
        f"On {acc['prompts']} prompts of {acc['prompt_len']} tokens cut from the test "
        f"documents, continued {acc['gen_len']} tokens by the oracle. Greedy: the share of "
        "positions where the draft's argmax is the oracle's token, and tokens per round "
        "simulated exactly along the continuations. T=1: the mean of Σ min(p, q) on sampled "
        "continuations, and (1 − α^(k+1))/(1 − α).",
        "",
        before_after_table(m),
        "",
    ]
    if timing:
        parts += [
            f"Expected speedup = tokens_per_round(k) · t_oracle(1) / (k · t_draft(1) + "
            f"t_oracle(k+1)), with per-call costs measured on {timing['device']} "
            f"(batch 1, {timing['context']}-token context, median of {timing['reps']}): "
            f"t_draft(1) = {_f(timing['t_draft_1_ms'], 2)} ms, t_oracle(1) = "
            f"{_f(timing['t_oracle_1_ms'], 2)} ms.",
            "",
        ]
    if m.get("peak_gpu_bytes"):
        parts += [f"Peak GPU memory: {m['peak_gpu_bytes'] / 2**30:.2f} GiB.", ""]
    return "\n".join(parts)
