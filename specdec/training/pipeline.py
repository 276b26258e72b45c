"""The whole training run, stage by stage: corpus → tokenizer → oracle → draft → eval → card.

Each stage logs what it did and fails loudly. The oracle folder is written as soon as the
oracle is trained, so a run cut short still leaves a usable model. A global deadline
(``total_minutes``) shrinks the two training budgets if earlier stages ran long, so the
run ends inside the caller's wall-clock limit.
"""

from __future__ import annotations

import json
import os
import platform
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers.utils import logging as hf_logging

from specdec.core.errors import InvalidArgument
from specdec.training import card, corpus, evaluate
from specdec.training.distill import (
    DistillConfig,
    generate_many,
    init_draft_from_oracle,
    train_draft,
)
from specdec.training.loop import log, random_windows, resolve_device, setup_device, spaced_windows
from specdec.training.modeling import (
    DRAFT_SIZE,
    ORACLE_SIZE,
    ModelSize,
    build_model,
    count_params,
    llama_config,
    save_model,
)
from specdec.training.tokenizer import (
    build_stream,
    encode_texts,
    eot_id,
    save_tokenizer,
    to_hf,
    train_tokenizer,
)
from specdec.training.train_oracle import OracleTrainConfig, train_oracle

# Seconds kept free after distillation for evaluation, timing and writing the card.
RESERVE_S = 60.0
MIN_STAGE_S = 15.0


@dataclass
class TrainOptions:
    """Everything a run depends on; recorded verbatim in metrics.json."""

    out: Path
    device: str = "auto"
    seed: int = 0
    packages: tuple[str, ...] = corpus.DEFAULT_PACKAGES
    eval_permille: int = corpus.DEFAULT_EVAL_PERMILLE
    max_file_bytes: int = corpus.DEFAULT_MAX_FILE_BYTES
    max_files: int | None = None
    max_corpus_tokens: int | None = None
    vocab_size: int = 8192
    tokenizer_train_bytes: int | None = 48 << 20
    workers: int = 16
    oracle_size: ModelSize = ORACLE_SIZE
    draft_size: ModelSize = DRAFT_SIZE
    oracle: OracleTrainConfig = field(default_factory=OracleTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    total_minutes: float = 9.0
    eval_prompts: int = 64
    eval_prompt_len: int = 64
    eval_gen_len: int = 128
    timing: bool = True
    timing_threads: int = 2
    timing_reps: int = 40
    command: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["oracle_size"] = str(self.oracle_size)
        d["draft_size"] = str(self.draft_size)
        return d


def hardware(device: torch.device) -> str:
    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} + {cpu}"
    return cpu


def _remaining(start: float, total_minutes: float) -> float:
    return total_minutes * 60 - (time.perf_counter() - start)


def _fit_budget(
    name: str, minutes: float, start: float, opts: TrainOptions, after_s: float
) -> float:
    """Minutes for a stage: as asked, or fewer so that ``after_s`` s remain before the deadline."""
    avail = _remaining(start, opts.total_minutes) - after_s
    if avail >= minutes * 60:
        return minutes
    fitted = max(MIN_STAGE_S, avail) / 60
    log(name, f"budget cut from {minutes:.2f} to {fitted:.2f} min to meet --total-minutes")
    return fitted


@dataclass
class Streams:
    """Token streams (int32, on the training device) of the three splits."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    bytes_per_token: float


def _token_streams(
    corp: corpus.Corpus, tok: Tokenizer, max_tokens: int | None, device: torch.device
) -> Streams:
    """Encode every file (sets ``n_tokens``), apply the training-token cap, build the streams.

    The cap keeps whole training files in stream order; the rest are marked "unused".
    """
    eot = eot_id(tok)
    encoded = encode_texts(tok, [f.text for f in corp.files])
    kept: list[array] = []
    total = n_bytes = 0
    for f, ids in zip(corp.files, encoded, strict=True):
        f.n_tokens = len(ids)
        if f.split != "train":
            continue
        if max_tokens is not None and kept and total + len(ids) > max_tokens:
            f.split = "unused"  # listed in the file list, not trained on
            continue
        kept.append(ids)
        total += len(ids) + 1
        n_bytes += len(f.text.encode("utf-8"))
    by_key = {f.key: ids for f, ids in zip(corp.files, encoded, strict=True)}
    valid_files, test_files = corpus.split_heldout(corp.files)
    train = build_stream(kept, eot)
    return Streams(
        train=train.to(device),
        valid=build_stream([by_key[f.key] for f in valid_files], eot).to(device),
        test=build_stream([by_key[f.key] for f in test_files], eot).to(device),
        bytes_per_token=n_bytes / max(1, train.numel()),
    )


def run(opts: TrainOptions) -> dict[str, Any]:
    """Run every stage into ``opts.out``; returns the metrics also written to metrics.json."""
    start = time.perf_counter()
    stage_s: dict[str, float] = {}
    os.environ["RAYON_NUM_THREADS"] = str(max(1, opts.workers))  # tokenizers' pool size
    hf_logging.disable_progress_bar()  # one log line per event; no carriage-return bars
    # Decoding grows every KV cache by one position per step; expandable segments let the
    # CUDA allocator grow a mapping instead of calling cudaMalloc for each new size.
    # Read when CUDA first allocates, i.e. later than here.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = resolve_device(opts.device)
    setup_device(device)
    out = opts.out
    if out.exists() and any(out.iterdir()):
        raise InvalidArgument(f"--out {out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    log(
        "setup",
        f"device {device} ({hardware(device)}), torch {torch.__version__}, seed {opts.seed}",
    )

    # 1. Corpus.
    t = time.perf_counter()
    corp = corpus.collect(opts.packages, opts.eval_permille, opts.max_file_bytes, opts.max_files)
    train_files = corp.split("train")
    log(
        "corpus",
        f"{len(train_files)} training + {len(corp.split('eval'))} held-out files from "
        f"{len(corp.roots)} roots; skipped {dict(corp.skipped)}; missing {corp.missing_packages}",
    )
    stage_s["corpus"] = time.perf_counter() - t

    # 2. Tokenizer (trained on the training split only) and the token streams.
    t = time.perf_counter()
    tok = train_tokenizer(
        [f.text for f in train_files], opts.vocab_size, opts.tokenizer_train_bytes
    )
    eot = eot_id(tok)
    hf_tok = to_hf(tok, model_max_length=2 * opts.oracle.seq_len)
    log("tokenizer", f"vocab {tok.get_vocab_size()} trained in {time.perf_counter() - t:.1f}s")
    stage_s["tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    streams = _token_streams(corp, tok, opts.max_corpus_tokens, device)
    train_stream, valid_stream, test_stream = streams.train, streams.valid, streams.test
    log(
        "tokenizer",
        f"train {train_stream.numel():,} tokens ({streams.bytes_per_token:.2f} bytes/token), "
        f"validation {valid_stream.numel():,}, test {test_stream.numel():,}; "
        f"encoded in {time.perf_counter() - t:.1f}s",
    )
    stage_s["encode"] = time.perf_counter() - t
    list_sha = corpus.write_file_list(corp, out / "corpus_files.tsv.gz")
    vocab = tok.get_vocab_size()

    # 3. Oracle.
    t = time.perf_counter()
    max_pos = 2 * opts.oracle.seq_len
    oracle = build_model(llama_config(opts.oracle_size, vocab, eot, max_pos), opts.seed)
    log("oracle", f"{count_params(oracle):,} parameters ({opts.oracle_size})")
    ocfg = opts.oracle
    ocfg.seed = opts.seed
    if ocfg.max_steps is None:
        distill_floor = min(opts.distill.minutes * 60, 60.0)
        ocfg.minutes = _fit_budget(
            "oracle", ocfg.minutes, start, opts, distill_floor + 45 + RESERVE_S
        )
    eval_windows = spaced_windows(valid_stream, 256, ocfg.seq_len + 1)
    oracle_result = train_oracle(oracle, train_stream, eval_windows, ocfg, device)
    oracle_bytes = save_model(oracle, out / "oracle")
    save_tokenizer(hf_tok, out / "oracle")
    stage_s["oracle"] = time.perf_counter() - t
    log("oracle", f"saved {out / 'oracle'} ({oracle_bytes / 1e6:.1f} MB of weights)")

    # 4. Draft: oracle-generated data, then distillation.
    dcfg = opts.distill
    dcfg.seed = opts.seed
    t = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(opts.seed + 2)
    seq_total = dcfg.prompt_len + dcfg.gen_len
    prompts = random_windows(train_stream, dcfg.gen_sequences, dcfg.prompt_len, gen)
    gen_seqs = generate_many(
        oracle, prompts, dcfg.gen_len, dcfg.greedy_frac, dcfg.gen_batch, opts.seed + 3, device
    )
    valid_prompts = spaced_windows(valid_stream, dcfg.valid_sequences, dcfg.prompt_len)
    valid_seqs = generate_many(
        oracle, valid_prompts, dcfg.gen_len, dcfg.greedy_frac, dcfg.gen_batch, opts.seed + 4, device
    )
    assert gen_seqs.shape[1] == seq_total, gen_seqs.shape
    stage_s["generate"] = time.perf_counter() - t
    log(
        "generate",
        f"{gen_seqs.shape[0]} + {valid_seqs.shape[0]} sequences in {stage_s['generate']:.0f}s",
    )

    t = time.perf_counter()
    draft = build_model(llama_config(opts.draft_size, vocab, eot, max_pos), opts.seed + 5)
    copied = init_draft_from_oracle(draft, oracle)
    log(
        "distill",
        f"draft {count_params(draft):,} parameters ({opts.draft_size}); "
        f"{len(copied)} tensors copied from the oracle",
    )
    if dcfg.max_steps is None:
        dcfg.minutes = _fit_budget("distill", dcfg.minutes, start, opts, RESERVE_S)
    draft_result = train_draft(draft, oracle, gen_seqs, train_stream, valid_seqs, dcfg, device)
    draft_bytes = save_model(draft, out / "draft")
    save_tokenizer(hf_tok, out / "draft")
    stage_s["distill"] = time.perf_counter() - t
    log("distill", f"saved {out / 'draft'} ({draft_bytes / 1e6:.1f} MB of weights)")
    del gen_seqs

    # 5. Evaluation on the test half of the held-out files.
    t = time.perf_counter()
    test_prompts = spaced_windows(test_stream, opts.eval_prompts, opts.eval_prompt_len)
    acc = evaluate.acceptance(
        oracle, draft, test_prompts, opts.eval_gen_len, device, seed=opts.seed + 6
    )
    log("eval", json.dumps({k: acc[k] for k in ("greedy", "t1")}))
    timing: dict[str, Any] | None = None
    speedup: dict[str, float] | None = None
    if opts.timing:
        timing = evaluate.cpu_timing(
            oracle, draft, threads=opts.timing_threads, reps=opts.timing_reps
        )
        speedup = evaluate.speedups(timing, acc["greedy"]["tokens_per_round"])
        log("eval", f"CPU timing {json.dumps(timing)}; theoretical greedy speedup {speedup}")
    stage_s["eval"] = time.perf_counter() - t

    metrics: dict[str, Any] = {
        "command": opts.command,
        "seed": opts.seed,
        "hardware": hardware(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **lib_versions(),
        },
        "options": opts.as_dict(),
        "corpus": {
            **corpus.describe(corp),
            "tokens": {
                "train": int(train_stream.numel()),
                "validation": int(valid_stream.numel()),
                "test": int(test_stream.numel()),
            },
            "unused_train_files": sum(1 for f in corp.files if f.split == "unused"),
            "file_list": "corpus_files.tsv.gz",
            "file_list_sha256": list_sha,
            "heldout_rule": (
                "held out iff int(sha256('<root>/<relpath>')[:8], 16) % 1000 < "
                f"{opts.eval_permille}; "
                "held-out files alternate (stream order) between validation and test"
            ),
        },
        "tokenizer": {
            "type": "byte-level BPE",
            "vocab_size": vocab,
            "special_tokens": ["<|endoftext|>"],
            "train_bytes_cap": opts.tokenizer_train_bytes,
        },
        "oracle": {
            "size": opts.oracle_size.as_dict(),
            "params": count_params(oracle),
            "weights_bytes": oracle_bytes,
            "train": oracle_result.as_dict(),
        },
        "draft": {
            "size": opts.draft_size.as_dict(),
            "params": count_params(draft),
            "weights_bytes": draft_bytes,
            "initialised_from_oracle": copied,
            "train": draft_result.as_dict(),
        },
        "acceptance": acc,
        "timing": timing,
        "speedup": speedup,
        "stage_seconds": {k: round(v, 1) for k, v in stage_s.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(card.render(metrics))
    log("done", f"wrote {out} in {metrics['total_seconds']}s")
    return metrics


def lib_versions() -> dict[str, str]:
    import safetensors
    import tokenizers
    import transformers

    return {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }
