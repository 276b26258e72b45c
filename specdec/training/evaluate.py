"""How good a draft is for an oracle: acceptance on the oracle's own continuations, CPU timing.

Greedy: the oracle continues held-out prompts greedily; along that continuation the draft
is teacher-forced, and position t "agrees" when the draft's argmax equals the oracle's
token. In greedy speculative decoding that agreement vector decides everything: a round
from position i accepts the run of agreements a[i], a[i+1], ... (at most k) and then adds
one oracle token (the correction, or the bonus after k acceptances), so tokens per round
is simulated exactly by ``simulate_rounds``.

Temperature 1: on oracle-sampled continuations, the probability that the draft's token is
accepted at a position is α_t = Σ_x min(p_t(x), q_t(x)) (Leviathan et al.); with a
constant α the expected tokens per round is (1 − α^(k+1)) / (1 − α).

Timing: per-call latency on CPU, fp32, batch 1, HF forward with a KV cache, giving the
theoretical greedy speedup tokens_per_round(k)·t_oracle(1) / (k·t_draft(1) + t_oracle(k+1)).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from specdec.core.errors import InvalidArgument, VocabularyMismatch
from specdec.training.corpus import (
    DEFAULT_EVAL_PERMILLE,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_PACKAGES,
    collect,
    split_heldout,
)
from specdec.training.distill import generate
from specdec.training.loop import autocast, batches, log, spaced_windows, synchronize
from specdec.training.modeling import cache_kwarg, forward_logits
from specdec.training.tokenizer import build_stream, encode_texts

try:
    from transformers import DynamicCache
except ImportError:  # pragma: no cover
    from transformers.cache_utils import DynamicCache

DEFAULT_KS = (2, 4, 8)


def simulate_rounds(agree: Sequence[bool], k: int) -> tuple[int, int]:
    """(tokens, rounds) of greedy speculative decoding with k drafts along ``agree``.

    Each round starts at position i, accepts j = the number of leading agreements of
    agree[i:i+k], and emits j + 1 tokens (the last one is the oracle's own); the final
    round is cut at the end of the sequence.
    """
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}")
    n, pos, rounds = len(agree), 0, 0
    while pos < n:
        j = 0
        while j < k and pos + j < n and agree[pos + j]:
            j += 1
        pos += j + 1
        rounds += 1
    return n, rounds


def tokens_per_round(agreements: Sequence[Sequence[bool]], k: int) -> float:
    """Total tokens / total rounds over several sequences (a ratio of sums, not a mean)."""
    tokens = rounds = 0
    for agree in agreements:
        t, r = simulate_rounds(agree, k)
        tokens, rounds = tokens + t, rounds + r
    if rounds == 0:
        raise InvalidArgument("no positions to simulate")
    return tokens / rounds


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """(1 − α^(k+1)) / (1 − α): expected tokens per round at i.i.d. acceptance α, bonus included."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"acceptance must be in [0, 1], got {alpha}")
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def _logits(model: torch.nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids=seqs, use_cache=False).logits
    return logits


@torch.no_grad()
def acceptance(
    oracle: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: torch.Tensor,
    gen_len: int,
    device: torch.device,
    seed: int = 0,
    batch: int = 64,
    ks: Sequence[int] = DEFAULT_KS,
    stage: str | None = None,
) -> dict[str, Any]:
    """Greedy and T=1 acceptance of ``draft`` on the oracle's continuations of prompts (N, P).

    With ``stage``, a progress line (done, elapsed, ETA) is logged after every batch.
    """
    oracle.to(device).eval()
    draft.to(device).eval()
    n, p_len = prompts.shape
    gen = torch.Generator(device=device).manual_seed(seed)
    agreements: list[list[bool]] = []
    alphas: list[torch.Tensor] = []
    start = time.perf_counter()
    for index, chunk in enumerate(batches(prompts.to(device), batch)):
        if stage is not None and index:
            done, spent = index * batch, time.perf_counter() - start
            log(stage, f"{done}/{n} prompts, {spent:.0f}s, eta {spent * (n - done) / done:.0f}s")
        b = chunk.shape[0]
        greedy = generate(oracle, chunk, gen_len, torch.ones(b, dtype=torch.bool), gen, device)
        with autocast(device):
            # Position t's logits predict token t+1: continuation tokens are seq[:, P:].
            d = _logits(draft, greedy)[:, p_len - 1 : -1]  # (b, G, V)
        agree = d.argmax(-1) == greedy[:, p_len:]  # (b, G)
        agreements.extend(row.tolist() for row in agree.cpu())
        sampled = generate(oracle, chunk, gen_len, torch.zeros(b, dtype=torch.bool), gen, device)
        with autocast(device):
            po = torch.softmax(_logits(oracle, sampled)[:, p_len - 1 : -1].float(), -1)
            qd = torch.softmax(_logits(draft, sampled)[:, p_len - 1 : -1].float(), -1)
        alphas.append(torch.minimum(po, qd).sum(-1).flatten().cpu())  # (b·G,)
    greedy_acc = sum(sum(a) for a in agreements) / (n * gen_len)
    alpha = float(torch.cat(alphas).mean())
    return {
        "prompts": n,
        "prompt_len": p_len,
        "gen_len": gen_len,
        "greedy": {
            "acceptance": greedy_acc,
            "tokens_per_round": {str(k): tokens_per_round(agreements, k) for k in ks},
            "iid_tokens_per_round": {str(k): expected_tokens_per_round(greedy_acc, k) for k in ks},
        },
        "t1": {
            "acceptance": alpha,
            "tokens_per_round": {str(k): expected_tokens_per_round(alpha, k) for k in ks},
        },
    }


def _vocab_size(model: torch.nn.Module) -> int:
    config: Any = model.config
    return int(config.vocab_size)


def _time_calls(model: torch.nn.Module, n_tokens: int, cache: DynamicCache, arg: str) -> float:
    device = next(model.parameters()).device
    x = torch.randint(0, _vocab_size(model), (1, n_tokens), device=device)
    synchronize(device)
    t0 = time.perf_counter()
    with autocast(device):
        forward_logits(model, x, cache, logits_to_keep=n_tokens, cache_arg=arg)
    synchronize(device)
    dt = time.perf_counter() - t0
    cache.crop(-n_tokens)  # a negative count removes tokens on every transformers version
    return dt


@torch.inference_mode()
def cpu_timing(
    oracle: torch.nn.Module,
    draft: torch.nn.Module,
    ks: Sequence[int] = DEFAULT_KS,
    threads: int = 2,
    context: int = 128,
    reps: int = 40,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Per-call latency (ms) on CPU, fp32, batch 1, with a ``context``-token KV cache.

    Calls of the two models and every size are interleaved, so background load hits them
    alike; the median over ``reps`` is reported, and the minimum beside it. With a CUDA
    ``device`` the models are timed where they are instead (bf16 autocast, synchronised).
    """
    on_gpu = device is not None and device.type == "cuda"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if on_gpu:
            models = {"draft": draft.eval(), "oracle": oracle.eval()}
        else:
            models = {"draft": deepcopy(draft).to("cpu", torch.float32).eval()}
            models["oracle"] = deepcopy(oracle).to("cpu", torch.float32).eval()
        caches: dict[str, DynamicCache] = {}
        args = {name: cache_kwarg(m) for name, m in models.items()}
        for name, m in models.items():
            caches[name] = DynamicCache()
            ctx = torch.randint(0, _vocab_size(m), (1, context), device=device if on_gpu else None)
            with autocast(ctx.device):
                forward_logits(m, ctx, caches[name], logits_to_keep=1, cache_arg=args[name])
        calls = [("draft", 1), ("oracle", 1)] + [("oracle", k + 1) for k in ks]
        samples: dict[tuple[str, int], list[float]] = {c: [] for c in calls}
        for rep in range(reps + 5):
            for name, n_tok in calls:
                dt = _time_calls(models[name], n_tok, caches[name], args[name])
                if rep >= 5:  # the first calls warm up allocator and kernels
                    samples[(name, n_tok)].append(dt * 1000)
    finally:
        torch.set_num_threads(old_threads)
    med = {c: statistics.median(v) for c, v in samples.items()}
    low = {c: min(v) for c, v in samples.items()}
    return {
        "threads": threads,
        "context": context,
        "reps": reps,
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "t_draft_1_ms": med[("draft", 1)],
        "t_oracle_1_ms": med[("oracle", 1)],
        "t_oracle_ms": {str(k + 1): med[("oracle", k + 1)] for k in ks},
        "min_ms": {f"{name}({n})": v for (name, n), v in low.items()},
    }


def speedups(timing: dict[str, Any], tpr: dict[str, float]) -> dict[str, float]:
    """tokens_per_round(k)·t_oracle(1) / (k·t_draft(1) + t_oracle(k+1)) for each k in ``tpr``."""
    t_d = float(timing["t_draft_1_ms"])
    t_o = float(timing["t_oracle_1_ms"])
    t_ok = timing["t_oracle_ms"]
    out = {}
    for k_str, tokens in tpr.items():
        k = int(k_str)
        out[k_str] = tokens * t_o / (k * t_d + t_ok[str(k + 1)])
    return out


def heldout_prompts(
    tokenizer: Any,
    count: int,
    prompt_len: int,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    eval_permille: int = DEFAULT_EVAL_PERMILLE,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> torch.Tensor:
    """Prompts (n, prompt_len) cut evenly from the test half of this machine's held-out files.

    The held-out rule depends on paths only, so this reproduces the training run's test
    files wherever the same packages are installed (contents follow local versions).
    """
    corpus = collect(packages, eval_permille, max_file_bytes)
    _, test = split_heldout(corpus.files)
    backend = tokenizer.backend_tokenizer
    eot = int(tokenizer.eos_token_id)
    stream = build_stream(encode_texts(backend, [f.text for f in test]), eot)
    return spaced_windows(stream, count, prompt_len)


def evaluate_folders(
    oracle_dir: Path,
    draft_dir: Path,
    device: torch.device,
    prompts: int = 64,
    prompt_len: int = 64,
    gen_len: int = 128,
    seed: int = 0,
    timing: bool = True,
    threads: int = 2,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    eval_permille: int = DEFAULT_EVAL_PERMILLE,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Load a saved pair (fp32) and measure acceptance on held-out prompts, plus CPU timing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_o = AutoTokenizer.from_pretrained(str(oracle_dir))
    tok_d = AutoTokenizer.from_pretrained(str(draft_dir))
    if tok_o.get_vocab() != tok_d.get_vocab():
        raise VocabularyMismatch(
            f"{oracle_dir} and {draft_dir} have different tokenizers; "
            "a draft must use the oracle's tokenizer"
        )
    oracle = AutoModelForCausalLM.from_pretrained(str(oracle_dir), dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32)
    if oracle.config.vocab_size != draft.config.vocab_size:
        raise VocabularyMismatch(
            f"vocab sizes differ: oracle {oracle.config.vocab_size}, "
            f"draft {draft.config.vocab_size}"
        )
    ids = heldout_prompts(tok_o, prompts, prompt_len, packages, eval_permille, max_file_bytes)
    torch.manual_seed(seed)
    result = acceptance(oracle, draft, ids, gen_len, device, seed=seed)
    if timing:
        t = cpu_timing(oracle, draft, threads=threads)
        result["timing"] = t
        result["speedup"] = speedups(t, result["greedy"]["tokens_per_round"])
    return result
