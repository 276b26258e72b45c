"""`specdec distill`: a draft for the user's oracle, distilled on the user's text.

Stages, each logged with its time: load the oracle (and the starting draft, or build a
fresh llama-architecture one on the oracle's tokenizer) → read and split the domain text
(``domain``) → measure the starting draft on held-out test prompts → DistillSpec rounds
(``onpolicy``) until the budget is spent → measure the distilled draft the same way →
write an HF folder (bf16 safetensors, the oracle's tokenizer and EOS ids) with
``metrics.json`` and a model card, and print the before/after table.

``--minutes`` bounds the whole run: the rounds get what is left once the starting
draft's measurement has shown what the final one will cost. A checkpoint is written
under ``OUT/checkpoint`` every couple of minutes; running the same command again with
the same ``--out`` resumes from it (its own ``--minutes`` then bounds the new run).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from specdec.core.errors import InvalidArgument
from specdec.engine.models import LoadedModel, check_compatible, load_model
from specdec.training import card, evaluate
from specdec.training.distill import init_draft_from_oracle
from specdec.training.domain import DomainStreams, DomainText, encode_domain, read_domain
from specdec.training.loop import log, resolve_device, setup_device, spaced_windows, synchronize
from specdec.training.modeling import (
    ModelSize,
    build_model,
    count_params,
    llama_config,
    save_model,
)
from specdec.training.onpolicy import (
    Checkpoint,
    OnPolicyConfig,
    RoundsResult,
    continue_prompts,
    train_rounds,
)
from specdec.training.pipeline import hardware, lib_versions
from specdec.training.targets import rows_per_chunk, score

# Seconds kept for writing the folder and the card after the final measurement.
WRITE_RESERVE_S = 15.0
# The final measurement may run this much slower than the first one did.
EVAL_SLACK = 1.3
# What a tokenizer may be saved as; those the oracle's folder has are copied to the draft's.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# Architectures whose decoder layers a llama draft can start from (same tensors, same maths).
LAYER_COMPATIBLE = ("llama", "mistral")


@dataclass
class DistillOptions:
    """Everything a run depends on; recorded in metrics.json."""

    oracle: str
    data: tuple[str, ...]
    out: Path
    draft: str | None = None
    draft_size: ModelSize | None = None
    minutes: float = 20.0
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    heldout_permille: int = 50
    max_data_mb: float | None = None
    eval_prompts: int = 64
    eval_prompt_len: int = 64
    eval_gen_len: int = 128
    timing: bool = True
    timing_reps: int = 20
    max_rounds: int | None = None
    rounds: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    command: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["draft_size"] = str(self.draft_size) if self.draft_size else None
        return d

    def run_key(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it."""
        return {
            "oracle": str(Path(self.oracle).expanduser().resolve()),
            "data": [str(Path(p).expanduser().resolve()) for p in self.data],
            "draft": str(Path(self.draft).expanduser().resolve()) if self.draft else None,
            "draft_size": str(self.draft_size) if self.draft_size else None,
            "seed": self.seed,
        }


@dataclass
class Measured:
    """Acceptance of one draft on the test prompts, its expected speedups, and the time taken."""

    acceptance: dict[str, Any]
    speedup: dict[str, dict[str, float]]
    seconds: float


def cpu_preset(opts: DistillOptions) -> DistillOptions:
    """Smaller rounds and a shorter final measurement for a CPU."""
    from specdec.training.onpolicy import cpu_preset as rounds_preset

    rounds_preset(opts.rounds)
    opts.eval_prompts, opts.eval_gen_len = 32, 96
    return opts


def run(opts: DistillOptions) -> dict[str, Any]:
    """Run every stage into ``opts.out``; returns the metrics also written to metrics.json."""
    start = time.perf_counter()
    deadline = start + opts.minutes * 60
    stage_s: dict[str, float] = {}
    hf_logging.disable_progress_bar()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = resolve_device(opts.device)
    setup_device(device)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    checkpoint = _prepare_out(opts)
    log("setup", f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU "
        f"threads, budget {opts.minutes:g} min, seed {opts.seed}")  # fmt: skip

    t = time.perf_counter()
    oracle = load_model(opts.oracle, str(device), "bf16" if device.type == "cuda" else "float32")
    draft, source = _starting_draft(opts, oracle, device)
    log(
        "models",
        f"oracle {opts.oracle}: {count_params(oracle.model):,} parameters, vocabulary "
        f"{oracle.vocab_size} ({oracle.padded_logits} padded logit rows dropped), EOS "
        f"{list(oracle.eos_token_ids)}; draft ({source}): {count_params(draft):,} parameters",
    )
    stage_s["load"] = time.perf_counter() - t

    t = time.perf_counter()
    domain, streams = _read(opts, oracle)
    stage_s["data"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(opts.seed)
    test_prompts = spaced_windows(streams.test, opts.eval_prompts, opts.eval_prompt_len)
    before_path = checkpoint.path.parent / "before.json"
    settings = [opts.eval_prompts, opts.eval_prompt_len, opts.eval_gen_len]
    saved = json.loads(before_path.read_text()) if before_path.exists() else {}
    if saved.get("settings") == settings:
        before = Measured(**saved["measured"])
        log("eval", f"starting draft as measured before: {_summary(before)}")
    else:
        before = _measure("starting draft", oracle, draft, test_prompts, opts, device)
        before_path.parent.mkdir(parents=True, exist_ok=True)
        before_path.write_text(json.dumps({"settings": settings, "measured": asdict(before)}))
    timing = (
        evaluate.cpu_timing(
            oracle.model, draft, threads=torch.get_num_threads(), reps=opts.timing_reps,
            device=device,
        )
        if opts.timing
        else None
    )  # fmt: skip
    if timing is not None:
        before.speedup = _speedups(timing, before.acceptance)
        log("eval", f"per-call cost: draft {timing['t_draft_1_ms']:.2f} ms, oracle "
            f"{timing['t_oracle_1_ms']:.2f} ms ({timing['device']})")  # fmt: skip
    stage_s["before"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = opts.rounds
    cfg.seed = opts.seed
    valid, greedy_rows = _validation_set(oracle, streams, cfg, device)
    reserve = before.seconds * EVAL_SLACK + WRITE_RESERVE_S
    seconds = deadline - time.perf_counter() - reserve
    if seconds < 30 and opts.max_rounds is None:
        log("distill", f"only {max(seconds, 0):.0f}s left for training within --minutes "
            f"{opts.minutes:g}; the draft will barely change: raise --minutes")  # fmt: skip
    rounds = train_rounds(
        draft, oracle.model, streams.train, valid, greedy_rows, oracle.eos_token_ids, cfg,
        device, max(seconds, 1.0), checkpoint, opts.max_rounds,
    )  # fmt: skip
    stage_s["distill"] = time.perf_counter() - t

    t = time.perf_counter()
    after = _measure("distilled draft", oracle, draft, test_prompts, opts, device)
    if timing is not None:
        after.speedup = _speedups(timing, after.acceptance)
    stage_s["after"] = time.perf_counter() - t
    weights_bytes = _write_folder(draft, oracle, opts.out)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    metrics = {
        "command": opts.command,
        "seed": opts.seed,
        "hardware": hardware(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **lib_versions()},
        "options": opts.as_dict(),
        "oracle": {"path": opts.oracle, "params": count_params(oracle.model),
                   "vocab_size": oracle.vocab_size, "padded_logits": oracle.padded_logits,
                   "eos_token_ids": list(oracle.eos_token_ids)},
        "draft": {"source": source, "params": count_params(draft),
                  "weights_bytes": weights_bytes, "train": rounds.as_dict()},
        "data": {**domain.describe(), "tokens": {name: int(getattr(streams, name).numel())
                                                 for name in ("train", "valid", "test")}},
        "before": asdict(before),
        "after": asdict(after),
        "timing": timing,
        "peak_gpu_bytes": peak,
        "stage_seconds": {k: round(v, 1) for k, v in stage_s.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    (opts.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (opts.out / "README.md").write_text(card.render_distilled(metrics))
    print("\n" + card.before_after_table(metrics) + "\n", flush=True)
    if peak is not None:
        log("done", f"peak GPU memory (torch.cuda.max_memory_allocated): {peak / 2**30:.2f} GiB")
    log("done", f"wrote {opts.out} in {metrics['total_seconds']}s; serve it with "
        f"`specdec draft --model {opts.out}`")  # fmt: skip
    return metrics


def _prepare_out(opts: DistillOptions) -> Checkpoint:
    """The checkpoint of ``--out``; refuses a non-empty folder that holds none."""
    out = opts.out
    checkpoint = Checkpoint(out / "checkpoint", opts.run_key())
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not checkpoint.path.exists():
        raise InvalidArgument(
            f"--out {out} is not empty and holds no checkpoint to resume; choose a new folder"
        )
    if checkpoint.path.exists():
        checkpoint.load()  # refuses another run's checkpoint before any work
        log("setup", f"{out} holds a checkpoint of this run: resuming from it")
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint


def _starting_draft(
    opts: DistillOptions, oracle: LoadedModel, device: torch.device
) -> tuple[torch.nn.Module, str]:
    """The draft to train (float32 master weights on ``device``) and a description of it."""
    if opts.draft and opts.draft_size:
        raise InvalidArgument("give --draft DIR or --draft-size, not both")
    if opts.draft:
        loaded = load_model(opts.draft, str(device), "float32")
        check_compatible(loaded, oracle)
        return loaded.model, opts.draft
    config = oracle.model.config
    size = opts.draft_size or default_draft_size(config)
    eos = oracle.eos_token_ids[0] if oracle.eos_token_ids else 0
    fresh_config = llama_config(size, oracle.vocab_size, eos, oracle.max_context)
    # The copied layers need the oracle's positions: transformers 5 keeps them in
    # rope_parameters, older releases in rope_theta / rope_scaling.
    v5 = getattr(config, "rope_parameters", None) is not None
    names = ("rope_parameters",) if v5 else ("rope_theta", "rope_scaling")
    for name in (*names, "rms_norm_eps"):
        if getattr(config, name, None) is not None and config.model_type in LAYER_COMPATIBLE:
            setattr(fresh_config, name, getattr(config, name))
    draft = build_model(fresh_config, opts.seed + 5)
    if config.model_type in LAYER_COMPATIBLE:
        copied = init_draft_from_oracle(draft, oracle.model)
    else:
        copied = _copy_embeddings(draft, oracle.model)
    log("models", f"fresh llama draft {size}: {len(copied)} tensors copied from the oracle")
    moved: torch.nn.Module = torch.nn.Module.to(draft, device)  # (HF's typed .to confuses mypy)
    return moved, f"fresh {size}, initialised from the oracle ({len(copied)} tensors)"


def default_draft_size(config: Any) -> ModelSize:
    """The oracle's width, heads and MLP, two layers: the oracle's first layers, retrained."""
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    return ModelSize(
        hidden,
        2,
        int(getattr(config, "intermediate_size", None) or 4 * hidden),
        heads,
        int(getattr(config, "num_key_value_heads", None) or heads),
    )


def _copy_embeddings(draft: Any, oracle: Any) -> list[str]:
    """The oracle's input embedding rows into the draft's (tied) embedding, widths allowing."""
    source = oracle.get_input_embeddings().weight
    target = draft.get_input_embeddings().weight
    if source.shape != target.shape:
        return []
    with torch.no_grad():
        target.copy_(source.to(target.device, target.dtype))
    return ["embed_tokens"]


def _read(opts: DistillOptions, oracle: LoadedModel) -> tuple[DomainText, DomainStreams]:
    tokenizer = oracle.tokenizer

    def chat(messages: list[dict[str, Any]]) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False))

    render = chat if getattr(tokenizer, "chat_template", None) else None
    max_bytes = int(opts.max_data_mb * (1 << 20)) if opts.max_data_mb else None
    domain = read_domain(opts.data, opts.heldout_permille, max_bytes, render)
    separator = next(
        (i for i in (*oracle.eos_token_ids, tokenizer.eos_token_id, tokenizer.bos_token_id)
         if i is not None),
        0,
    )  # fmt: skip
    streams = encode_domain(domain, tokenizer, int(separator))
    info = domain.describe()
    log(
        "data",
        f"{info['documents']['train']:,} training + {info['documents']['eval']:,} held-out "
        f"documents ({info['bytes']['train'] / 1e6:.1f} + {info['bytes']['eval'] / 1e6:.1f} MB; "
        f"skipped {info['skipped']}); tokens: train {streams.train.numel():,}, validation "
        f"{streams.valid.numel():,}, test {streams.test.numel():,}",
    )
    return domain, streams


def _validation_set(
    oracle: LoadedModel, streams: DomainStreams, cfg: OnPolicyConfig, device: torch.device
) -> tuple[Any, int]:
    """Oracle continuations of validation prompts (first half greedy, then T = 1), scored."""
    prompts = spaced_windows(streams.valid, cfg.valid_sequences, cfg.prompt_len)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    seqs = continue_prompts(
        oracle.model, prompts, cfg.gen_len, 0.5, cfg.gen_batch, generator, device
    )
    valid = score(
        oracle.model, seqs, cfg.prompt_len, cfg.top_k, oracle.eos_token_ids, cfg.memory_gib,
        device,
    )  # fmt: skip
    return valid, round(prompts.shape[0] * 0.5)


def _measure(
    what: str,
    oracle: LoadedModel,
    draft: torch.nn.Module,
    prompts: torch.Tensor,
    opts: DistillOptions,
    device: torch.device,
) -> Measured:
    """Greedy and T = 1 acceptance on the oracle's continuations of the test prompts."""
    t = time.perf_counter()
    # Batches small enough for a progress line every few seconds on a CPU.
    batch = rows_per_chunk(opts.eval_gen_len, oracle.vocab_size, opts.rounds.memory_gib, 6)
    batch = min(batch, 64 if device.type == "cuda" else 8)
    log("eval", f"measuring the {what} on {prompts.shape[0]} test prompts x "
        f"{opts.eval_gen_len} oracle tokens ...")  # fmt: skip
    acc = evaluate.acceptance(
        oracle.model, draft, prompts, opts.eval_gen_len, device, seed=opts.seed + 6,
        batch=batch, stage="eval",
    )  # fmt: skip
    synchronize(device)
    measured = Measured(acc, {}, time.perf_counter() - t)
    log("eval", f"{what}: {_summary(measured)} ({measured.seconds:.0f}s)")
    return measured


def _summary(m: Measured) -> str:
    a = m.acceptance
    return (
        f"greedy acceptance {a['greedy']['acceptance']:.4f}, T=1 {a['t1']['acceptance']:.4f}, "
        f"greedy tokens/round at k=4 {a['greedy']['tokens_per_round']['4']:.2f}"
    )


def _speedups(timing: dict[str, Any], acc: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        mode: evaluate.speedups(timing, acc[mode]["tokens_per_round"]) for mode in ("greedy", "t1")
    }


def _write_folder(draft: torch.nn.Module, oracle: LoadedModel, out: Path) -> int:
    """The draft as an HF folder `specdec draft --model` serves: bf16 weights, the oracle's
    tokenizer, and the oracle's EOS ids (its stopping rules are the ones that count)."""
    eos = list(oracle.eos_token_ids)
    generation_config = getattr(draft, "generation_config", None)
    if generation_config is not None and eos:
        generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    weights = save_model(draft, out)  # type: ignore[arg-type]
    source = Path(oracle.name).expanduser()
    copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    if (source / "tokenizer_config.json").is_file():
        for name in copied:  # verbatim: the class and settings the oracle loads with
            shutil.copyfile(source / name, out / name)
    else:  # a hub id
        oracle.tokenizer.save_pretrained(str(out))
    return weights


__all__ = ["DistillOptions", "RoundsResult", "cpu_preset", "default_draft_size", "run"]
