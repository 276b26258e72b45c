"""argparse front end: ``train`` (the whole pipeline), ``eval-pair`` (measure a saved pair)
and ``distill`` (a draft for the user's oracle, from the user's text).

The main ``specdec`` CLI mounts these with ``add_train_parser`` / ``add_eval_parser``;
``python -m specdec.training`` runs them standalone from a source checkout. Every flag
of ``train`` defaults to None and is resolved against the defaults, or the ``--tiny``
preset, in ``options_from_args``, so a flag given explicitly always wins.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from specdec.training import corpus
from specdec.training.modeling import (
    TINY_DRAFT_SIZE,
    TINY_ORACLE_SIZE,
    parse_size,
)
from specdec.training.pipeline import TrainOptions

# (flag dest, where it goes in TrainOptions: "field" or "oracle.field" / "distill.field", type)
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("device", "device", str, "cuda, cpu or auto (default auto)"),
    ("seed", "seed", int, "seed of every random choice (default 0)"),
    ("max_files", "max_files", int, "keep only this many files (a deterministic sample; tests)"),
    ("max_file_bytes", "max_file_bytes", int, "skip files larger than this (default 1000000)"),
    ("eval_permille", "eval_permille", int, "held-out share of files in ‰ (default 20)"),
    ("max_corpus_tokens", "max_corpus_tokens", int, "cap on training tokens (whole files)"),
    ("vocab_size", "vocab_size", int, "BPE vocabulary size (default 8192)"),
    ("workers", "workers", int, "tokenizer threads (default 16)"),
    ("oracle_minutes", "oracle.minutes", float, "oracle training budget (default 4.0)"),
    ("oracle_steps", "oracle.max_steps", int, "oracle steps instead of a time budget"),
    ("draft_minutes", "distill.minutes", float, "distillation budget (default 2.5)"),
    ("draft_steps", "distill.max_steps", int, "distillation steps instead of a time budget"),
    ("seq_len", "oracle.seq_len", int, "oracle training window (default 512)"),
    ("batch_size", "oracle.batch_size", int, "oracle sequences per step (default 128)"),
    ("lr", "oracle.lr", float, "oracle peak learning rate (default 2e-3)"),
    (
        "gen_sequences",
        "distill.gen_sequences",
        int,
        "oracle continuations to distill on (default 16384)",
    ),
    ("prompt_len", "distill.prompt_len", int, "prompt tokens of each continuation (default 64)"),
    ("gen_len", "distill.gen_len", int, "tokens the oracle generates per prompt (default 192)"),
    ("gen_batch", "distill.gen_batch", int, "sequences generated at once (default 2048)"),
    (
        "distill_batch_size",
        "distill.batch_size",
        int,
        "distillation sequences per step (default 96)",
    ),
    ("distill_lr", "distill.lr", float, "draft peak learning rate (default 2e-3)"),
    ("tvd_weight", "distill.tvd_weight", float, "loss = KL + w·TVD (default 1.0)"),
    (
        "corpus_frac",
        "distill.corpus_frac",
        float,
        "share of corpus windows per batch (default 0.25)",
    ),
    ("total_minutes", "total_minutes", float, "deadline for the whole run (default 9.0)"),
    ("eval_prompts", "eval_prompts", int, "held-out prompts for the final acceptance (default 64)"),
    ("eval_gen_len", "eval_gen_len", int, "oracle tokens per held-out prompt (default 128)"),
    ("timing_threads", "timing_threads", int, "CPU threads of the timing mode (default 2)"),
]


def _tiny_preset(opts: TrainOptions) -> TrainOptions:
    """A run that finishes on a laptop CPU in seconds: a few stdlib files, toy models."""
    oracle = replace(
        opts.oracle, seq_len=64, batch_size=8, max_steps=30, warmup_steps=5, eval_batch=8
    )
    distill = replace(
        opts.distill,
        prompt_len=16,
        gen_len=16,
        gen_sequences=32,
        gen_batch=32,
        valid_sequences=8,
        batch_size=8,
        max_steps=20,
        warmup_steps=5,
        eval_batch=8,
    )
    return replace(
        opts,
        packages=(corpus.STDLIB,),
        max_files=24,
        max_file_bytes=12_000,
        eval_permille=150,
        vocab_size=384,
        tokenizer_train_bytes=None,
        workers=2,
        oracle_size=TINY_ORACLE_SIZE,
        draft_size=TINY_DRAFT_SIZE,
        oracle=oracle,
        distill=distill,
        total_minutes=30.0,
        eval_prompts=4,
        eval_prompt_len=16,
        eval_gen_len=16,
        timing_reps=3,
    )


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Defaults (or the --tiny preset), then every flag the user gave."""
    opts = TrainOptions(out=Path(args.out))
    if args.tiny:
        opts = _tiny_preset(opts)
    for dest, target, _, _ in _TRAIN_FLAGS:
        value = getattr(args, dest)
        if value is None:
            continue
        if "." in target:
            sub, name = target.split(".")
            setattr(opts, sub, replace(getattr(opts, sub), **{name: value}))
        else:
            setattr(opts, target, value)
    if args.oracle_steps is not None and args.oracle_minutes is None:
        opts.oracle.minutes = 0.0
    if args.draft_steps is not None and args.draft_minutes is None:
        opts.distill.minutes = 0.0
    if args.packages is not None:
        opts.packages = tuple(p.strip() for p in args.packages.split(",") if p.strip())
    if args.tokenizer_train_mb is not None:
        opts.tokenizer_train_bytes = int(args.tokenizer_train_mb * (1 << 20)) or None
    if args.oracle_size is not None:
        opts.oracle_size = parse_size(args.oracle_size)
    if args.draft_size is not None:
        opts.draft_size = parse_size(args.draft_size)
    if args.compile:
        opts.oracle.compile = True
    if args.no_timing:
        opts.timing = False
    argv = getattr(args, "argv", None)
    opts.command = shlex.join(["specdec", *(sys.argv[1:] if argv is None else argv)])
    return opts


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train the demo tokenizer + oracle + draft from the code installed here",
        description="Train the demo pair (tokenizer, oracle, distilled draft) into --out.",
    )
    p.add_argument("--out", required=True, help="new or empty output folder")
    p.add_argument("--tiny", action="store_true", help="toy preset that runs in seconds on CPU")
    p.add_argument(
        "--packages",
        help="comma-separated modules whose source is the corpus ('stdlib' = standard library)",
    )
    p.add_argument("--tokenizer-train-mb", type=float, help="text used to train BPE (default 48)")
    p.add_argument(
        "--oracle-size", help="HIDDEN,LAYERS,FFN,HEADS,KV_HEADS (default 256,30,512,4,2)"
    )
    p.add_argument("--draft-size", help="HIDDEN,LAYERS,FFN,HEADS,KV_HEADS (default 256,2,512,4,2)")
    p.add_argument("--compile", action="store_true", help="torch.compile the oracle for training")
    p.add_argument("--no-timing", action="store_true", help="skip the CPU timing at the end")
    for dest, _, typ, help_text in _TRAIN_FLAGS:
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, help=help_text)
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Run the pipeline; returns the process exit code."""
    from specdec.training import pipeline

    pipeline.run(options_from_args(args))
    return 0


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval-pair`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval-pair",
        help="measure a draft's acceptance against an oracle, and their CPU cost",
        description=(
            "Greedy and T=1 acceptance of DRAFT on ORACLE's own continuations of held-out "
            "prompts, and per-call CPU latency; prints JSON."
        ),
    )
    p.add_argument("--pair", help="folder with oracle/ and draft/ (e.g. specdec/demo_models)")
    p.add_argument("--oracle", help="oracle folder (overrides --pair)")
    p.add_argument("--draft", help="draft folder (overrides --pair)")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the timing mode")
    p.add_argument("--packages", help="corpus packages for the held-out prompts (default: all)")
    p.add_argument("--eval-permille", type=int, default=corpus.DEFAULT_EVAL_PERMILLE)
    p.add_argument("--max-file-bytes", type=int, default=corpus.DEFAULT_MAX_FILE_BYTES)
    p.add_argument("--json", help="also write the result to this file")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved pair and print the JSON result."""
    from specdec.core.errors import InvalidArgument
    from specdec.training.evaluate import evaluate_folders
    from specdec.training.loop import resolve_device

    pair = Path(args.pair) if args.pair else None
    oracle = Path(args.oracle) if args.oracle else (pair / "oracle" if pair else None)
    draft = Path(args.draft) if args.draft else (pair / "draft" if pair else None)
    if oracle is None or draft is None:
        raise InvalidArgument("give --pair DIR, or both --oracle DIR and --draft DIR")
    packages = (
        tuple(p.strip() for p in args.packages.split(",") if p.strip())
        if args.packages
        else corpus.DEFAULT_PACKAGES
    )
    result = evaluate_folders(
        oracle,
        draft,
        resolve_device(args.device),
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        seed=args.seed,
        timing=not args.no_timing,
        threads=args.threads,
        packages=packages,
        eval_permille=args.eval_permille,
        max_file_bytes=args.max_file_bytes,
    )
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


# (flag dest, OnPolicyConfig field, type, help) of `distill`: None = the device's preset.
_ROUND_FLAGS: list[tuple[str, Any, str]] = [
    ("on_policy", float, "share of continuations the draft generates itself (default 0.5)"),
    ("greedy_frac", float, "share of continuations decoded greedily, the rest at T=1 (0.5)"),
    ("loss", str, "kl+tvd, kl, tvd or jsd (default kl+tvd)"),
    ("tvd_weight", float, "loss = KL + w·TVD for kl+tvd (default 1.0)"),
    ("lr", float, "peak learning rate (default 1e-3)"),
    ("prompt_len", int, "prompt tokens of each continuation (default 64)"),
    ("gen_len", int, "tokens generated per prompt (default 128 on a GPU, 64 on a CPU)"),
    ("round_sequences", int, "continuations per round (default 512 on a GPU, 32 on a CPU)"),
    ("gen_batch", int, "sequences generated at once (default 512 on a GPU, 32 on a CPU)"),
    ("batch_size", int, "sequences per optimizer step (default 64 on a GPU, 16 on a CPU)"),
    ("top_k", int, "oracle log-probabilities kept per position (default 64)"),
    ("reuse", float, "times a round's sequences are trained on, on average (default 4)"),
    ("buffer_rounds", int, "rounds kept in the replay buffer (default 8)"),
    ("memory_gib", float, "memory for logits at once, GiB (default 4 on a GPU, 1 on a CPU)"),
    ("eval_every_s", float, "seconds between validations (default 60 on a GPU, 90 on a CPU)"),
]


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``distill`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "distill",
        help="distill a draft for your oracle from your text (DistillSpec)",
        description=(
            "Train a draft model for ORACLE on the oracle's own next-token distributions over "
            "continuations of prompts cut from your text (by the draft itself and by the "
            "oracle), measure its acceptance before and after on held-out text, and write "
            "an HF folder that `specdec draft --model` serves. Rerun with the same --out to "
            "resume from its checkpoint."
        ),
    )
    p.add_argument("--oracle", required=True, help="the oracle: an HF causal LM folder or hub id")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="your text: a folder (every text file under it), a quoted glob such as "
        "'src/**/*.pm', a .txt, or a .jsonl of "
        "documents or prompts (text / prompt+completion / messages); repeatable",
    )
    p.add_argument("--out", required=True, help="new or empty folder (or one to resume)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--draft", help="starting draft folder (same tokenizer as the oracle)")
    start.add_argument(
        "--draft-size",
        help="a fresh llama draft HIDDEN,LAYERS,FFN,HEADS,KV_HEADS (default: the oracle's "
        "width with 2 layers, started from the oracle's embeddings and first layers)",
    )
    p.add_argument("--minutes", type=float, default=20.0, help="bound on the whole run (20)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-data-mb", type=float, help="use the first MB of the text only")
    p.add_argument(
        "--heldout-permille", type=int, default=50, help="held-out share of documents, ‰ (50)"
    )
    p.add_argument("--eval-prompts", type=int, help="test prompts (default 64; 32 on a CPU)")
    p.add_argument(
        "--eval-gen-len", type=int, help="oracle tokens per test prompt (128; 96 on a CPU)"
    )
    p.add_argument("--no-timing", action="store_true", help="skip the per-call cost timing")
    p.add_argument("--max-rounds", type=int, help="stop after this many rounds (tests)")
    for dest, typ, help_text in _ROUND_FLAGS:
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, help=help_text)
    p.set_defaults(func=run_distill)
    return p


def distill_options_from_args(args: argparse.Namespace) -> Any:
    """Defaults, the device's preset, then every flag the user gave."""
    from specdec.training.domain_distill import DistillOptions, cpu_preset
    from specdec.training.loop import resolve_device

    opts = DistillOptions(
        oracle=args.oracle,
        data=tuple(args.data),
        out=Path(args.out),
        draft=args.draft,
        draft_size=parse_size(args.draft_size) if args.draft_size else None,
        minutes=args.minutes,
        device=args.device,
        threads=args.threads,
        seed=args.seed,
        heldout_permille=args.heldout_permille,
        max_data_mb=args.max_data_mb,
        timing=not args.no_timing,
        max_rounds=args.max_rounds,
    )
    if args.minutes <= 0:
        from specdec.core.errors import InvalidArgument

        raise InvalidArgument(f"--minutes must be > 0, got {args.minutes}")
    if resolve_device(args.device).type == "cpu":
        opts = cpu_preset(opts)
    if args.eval_prompts is not None:
        opts.eval_prompts = args.eval_prompts
    if args.eval_gen_len is not None:
        opts.eval_gen_len = args.eval_gen_len
    for dest, _, _ in _ROUND_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            setattr(opts.rounds, dest, value)
    opts.rounds.validate()
    argv = getattr(args, "argv", None)
    opts.command = shlex.join(["specdec", *(sys.argv[1:] if argv is None else argv)])
    return opts


def run_distill(args: argparse.Namespace) -> int:
    """Run `specdec distill`; returns the process exit code."""
    from specdec.training import domain_distill

    domain_distill.run(distill_options_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m specdec.training {train,eval-pair,distill} ...``."""
    parser = argparse.ArgumentParser(prog="python -m specdec.training")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_distill_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the model card
    code: int = args.func(args)
    return code
