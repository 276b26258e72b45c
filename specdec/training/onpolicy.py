"""DistillSpec on a domain: rounds of generate → score with the oracle → train the draft.

Each round cuts ``round_sequences`` prompts from the user's training text and continues
them by ``gen_len`` tokens: an ``on_policy`` share by the draft being trained (what
DistillSpec found matters most: the draft learns the oracle's answer exactly where its
own proposals will be judged), the rest by the oracle; within each, ``greedy_frac``
greedily and the rest sampled at T = 1. The oracle scores every continuation position
once, in chunks that bound memory, and only its top-``top_k`` log-probabilities are kept
(ids + values, K ≪ V), so a round's data is small even for a 150k vocabulary. The draft
then trains on a replay buffer of the last ``buffer_rounds`` rounds, ``reuse`` passes
per round's worth of sequences.

The loss on the oracle's top-K targets is ``targets.sparse_terms``.

Held-out validation (fixed oracle continuations of validation prompts, half greedy, half
sampled) is measured every ``eval_every_s`` seconds: greedy acceptance is the draft's
argmax agreement with the oracle along its greedy continuations, T = 1 acceptance is
1 − TVD on the sampled ones (top-K estimate). The draft with the best mean of the two is
kept and is what the caller gets back, whenever the budget runs out.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdec.core.errors import InvalidArgument
from specdec.training.distill import generate
from specdec.training.loop import (
    autocast,
    fail_if_not_finite,
    log,
    lr_at,
    make_optimizer,
    random_windows,
    set_lr,
    synchronize,
)
from specdec.training.modeling import forward_logits
from specdec.training.targets import (
    LOSSES,
    Scored,
    logits_width,
    rows_per_chunk,
    score,
    sparse_terms,
)


@dataclass
class OnPolicyConfig:
    """Hyper-parameters of the rounds (defaults: a GPU; ``cpu_preset`` scales them down)."""

    prompt_len: int = 64
    gen_len: int = 128
    round_sequences: int = 512
    gen_batch: int = 512
    on_policy: float = 0.5
    greedy_frac: float = 0.5
    top_k: int = 64
    buffer_rounds: int = 8
    reuse: float = 4.0
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss: str = "kl+tvd"
    tvd_weight: float = 1.0
    valid_sequences: int = 64
    eval_every_s: float = 60.0
    checkpoint_every_s: float = 120.0
    memory_gib: float = 4.0
    log_every_s: float = 10.0
    seed: int = 0

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidArgument(f"--loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.on_policy <= 1.0 or not 0.0 <= self.greedy_frac <= 1.0:
            raise InvalidArgument("--on-policy and --greedy-frac must be in [0, 1]")
        for name in ("prompt_len", "gen_len", "round_sequences", "gen_batch", "top_k"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 1")
        if self.batch_size < 1 or self.buffer_rounds < 1 or self.reuse <= 0:
            raise InvalidArgument("--batch-size, --buffer-rounds and --reuse must be positive")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_preset(cfg: OnPolicyConfig) -> OnPolicyConfig:
    """Sizes for a CPU: small rounds, so the draft improves every half minute or so."""
    cfg.round_sequences = cfg.gen_batch = 32
    cfg.gen_len = 64
    cfg.batch_size = 16
    cfg.valid_sequences = 32
    cfg.memory_gib = 1.0
    cfg.eval_every_s = 90.0
    return cfg


def continue_prompts(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    gen_len: int,
    greedy_frac: float,
    batch: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """``prompts`` (B, P) continued by ``model``, the first ``greedy_frac`` of a batch greedily."""
    model.eval()
    out = []
    for start in range(0, prompts.shape[0], batch):
        chunk = prompts[start : start + batch].to(device)
        greedy = torch.arange(chunk.shape[0], device=device) < round(chunk.shape[0] * greedy_frac)
        out.append(generate(model, chunk, gen_len, greedy, generator, device))
    return torch.cat(out)


@dataclass
class RoundsResult:
    """What the rounds did; ``best`` is the validation of the draft handed back."""

    rounds: int = 0
    steps: int = 0
    sequences: int = 0
    seconds: float = 0.0
    best: dict[str, float] = field(default_factory=dict)
    best_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Checkpoint:
    """``folder/state.pt``: everything a resumed run needs, written atomically."""

    def __init__(self, folder: Path, run_key: dict[str, Any]) -> None:
        self.path = folder / "state.pt"
        self.run_key = run_key

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("run_key") != self.run_key:
            raise InvalidArgument(
                f"{self.path} is the checkpoint of another run ({state.get('run_key')}); "
                "resume with the same --oracle, --data, --draft/--draft-size and --seed, "
                "or choose a new --out"
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "run_key": self.run_key}, tmp)
        os.replace(tmp, self.path)


@torch.no_grad()
def validate(
    draft: torch.nn.Module, valid: Scored, greedy_rows: int, memory_gib: float, device: torch.device
) -> dict[str, float]:
    """Greedy acceptance on the first ``greedy_rows`` (oracle greedy continuations), T = 1
    acceptance (1 − TVD) on the rest, and their mean (the checkpoint score)."""
    draft.eval()
    gen_len = valid.ids.shape[1]
    chunk = rows_per_chunk(gen_len + 1, logits_width(draft), memory_gib, copies=3)
    sums = {"greedy": 0.0, "t1": 0.0}
    weights = {"greedy": 0.0, "t1": 0.0}
    for start in range(0, len(valid), chunk):
        rows = torch.arange(start, min(start + chunk, len(valid)), device=device)
        part = valid.take(rows)
        with autocast(device):
            logits = forward_logits(draft, part.seqs, None, gen_len + 1)[:, :-1]
        for kind, pick in (("greedy", rows < greedy_rows), ("t1", rows >= greedy_rows)):
            if bool(pick.any()):
                sub = part.take(pick.nonzero()[:, 0])
                terms = sparse_terms(logits[pick], sub)
                w = float(sub.mask.sum())
                value = terms["agree"] if kind == "greedy" else 1 - terms["tvd"]
                sums[kind] += float(value) * w
                weights[kind] += w
    out = {k: sums[k] / max(weights[k], 1.0) for k in sums}
    out["score"] = (out["greedy"] + out["t1"]) / 2
    return out


def train_rounds(
    draft: torch.nn.Module,
    oracle: torch.nn.Module,
    train_stream: torch.Tensor,
    valid: Scored,
    valid_greedy_rows: int,
    eos_ids: Sequence[int],
    cfg: OnPolicyConfig,
    device: torch.device,
    seconds: float,
    checkpoint: Checkpoint | None = None,
    max_rounds: int | None = None,
) -> RoundsResult:
    """Distill ``oracle`` into ``draft`` for ``seconds`` (or ``max_rounds``); on return the
    draft holds the best weights found, this run's or a resumed run's."""
    cfg.validate()
    oracle.eval()
    for p in oracle.parameters():
        p.requires_grad_(False)
    draft.to(device)
    optimizer = make_optimizer(draft, cfg.lr, cfg.weight_decay, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 11)
    picker = torch.Generator(device="cpu").manual_seed(cfg.seed + 12)
    stream = train_stream.to(device)
    result = RoundsResult()
    best_state: dict[str, torch.Tensor] | None = None
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        picker.set_state(state["picker"])
        best_state = state["best_state"]
        result = RoundsResult(**state["result"])
        result.resumed_from_step = result.steps
        log("distill", f"resumed from {checkpoint.path if checkpoint else ''}: step "
            f"{result.steps}, {result.rounds} rounds, best {result.best}")  # fmt: skip
    start = time.perf_counter()
    spent_before = result.seconds
    micro = rows_per_chunk(cfg.gen_len + 1, logits_width(draft), cfg.memory_gib, copies=6)
    steps_per_round = max(1, math.ceil(cfg.reuse * cfg.round_sequences / cfg.batch_size))
    buffer: list[Scored] = []
    last_eval = last_checkpoint = last_log = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - start

    def progress() -> float:
        if max_rounds is not None:
            return min(1.0, (result.rounds - state_rounds) / max(1, max_rounds))
        return min(1.0, elapsed() / max(seconds, 1e-9))

    def evaluate_now() -> None:
        nonlocal best_state
        metrics = validate(draft, valid, valid_greedy_rows, cfg.memory_gib, device)
        result.history.append(
            {"step": result.steps, "seconds": round(spent_before + elapsed(), 1), **metrics}
        )
        improved = not result.best or metrics["score"] > result.best["score"]
        if improved:
            result.best, result.best_step = metrics, result.steps
            best_state = {k: v.detach().clone() for k, v in draft.state_dict().items()}
        log(
            "distill",
            f"validation at step {result.steps}: greedy acceptance {metrics['greedy']:.4f}, "
            f"T=1 {metrics['t1']:.4f}"
            + (" (best so far)" if improved else "")
            + f"; best {result.best['greedy']:.4f} / {result.best['t1']:.4f} "
            f"at step {result.best_step}",
        )
        draft.train()

    def save_checkpoint() -> None:
        if checkpoint is None:
            return
        result.seconds = spent_before + elapsed()
        checkpoint.save({
            "draft": draft.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "picker": picker.get_state(),
            "best_state": best_state, "result": result.as_dict(),
        })  # fmt: skip

    state_rounds = result.rounds
    if best_state is None:
        evaluate_now()
    log(
        "distill",
        f"rounds of {cfg.round_sequences} continuations ({cfg.on_policy:.0%} by the draft) "
        f"of {cfg.prompt_len}+{cfg.gen_len} tokens, {steps_per_round} steps of "
        f"{cfg.batch_size} each (micro-batches of {micro}); budget "
        + (f"{max_rounds} rounds" if max_rounds is not None else f"{seconds:.0f}s"),
    )
    draft.train()
    terms = {"loss": float("nan"), "kl": float("nan"), "tvd": float("nan"), "agree": float("nan")}
    while progress() < 1.0:
        round_start = time.perf_counter()
        buffer.append(_make_round(draft, oracle, stream, eos_ids, cfg, generator, device))
        buffer = buffer[-cfg.buffer_rounds :]
        result.rounds += 1
        result.sequences += cfg.round_sequences
        gen_s = time.perf_counter() - round_start
        pool = Scored.cat(buffer)
        draft.train()
        steps_before = result.steps
        for _ in range(steps_per_round):
            if progress() >= 1.0:
                break
            lr = lr_at(result.steps, progress(), cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            rows = torch.randint(0, len(pool), (cfg.batch_size,), generator=picker)
            terms = _step(draft, optimizer, pool.take(rows.to(pool.seqs.device)), micro, cfg)
            result.steps += 1
            fail_if_not_finite("distill", result.steps, terms["loss"])
        now = time.perf_counter()
        if now - last_log >= cfg.log_every_s and result.steps > steps_before:
            last_log = now
            eta = elapsed() * (1 - progress()) / max(progress(), 1e-9)
            log(
                "distill",
                f"round {result.rounds} step {result.steps}: loss {terms['loss']:.4f} "
                f"(KL {terms['kl']:.3f} TVD {terms['tvd']:.3f} agree {terms['agree']:.3f}); "
                f"round {now - round_start:.1f}s (generate+score {gen_s:.1f}s); "
                f"{progress():.0%} elapsed {elapsed():.0f}s eta {eta:.0f}s",
            )
        if now - last_eval >= cfg.eval_every_s:
            synchronize(device)
            evaluate_now()
            last_eval = time.perf_counter()
        if now - last_checkpoint >= cfg.checkpoint_every_s:
            save_checkpoint()
            last_checkpoint = time.perf_counter()
    if not result.history or result.history[-1]["step"] != result.steps:
        evaluate_now()
    save_checkpoint()
    assert best_state is not None
    draft.load_state_dict(best_state)
    draft.eval()
    synchronize(device)
    result.seconds = spent_before + elapsed()
    log(
        "distill",
        f"done: {result.rounds} rounds, {result.steps} steps in {elapsed():.0f}s; best "
        f"validation greedy {result.best['greedy']:.4f}, T=1 {result.best['t1']:.4f} at step "
        f"{result.best_step}",
    )
    return result


def _make_round(
    draft: torch.nn.Module,
    oracle: torch.nn.Module,
    stream: torch.Tensor,
    eos_ids: Sequence[int],
    cfg: OnPolicyConfig,
    generator: torch.Generator,
    device: torch.device,
) -> Scored:
    """One round's continuations (draft's, then oracle's), scored by the oracle."""
    prompts = random_windows(stream, cfg.round_sequences, cfg.prompt_len, generator)
    n_draft = round(cfg.round_sequences * cfg.on_policy)
    parts = []
    for model, chunk in ((draft, prompts[:n_draft]), (oracle, prompts[n_draft:])):
        if chunk.shape[0]:
            parts.append(
                continue_prompts(
                    model, chunk, cfg.gen_len, cfg.greedy_frac, cfg.gen_batch, generator, device
                )
            )
    seqs = torch.cat(parts)
    return score(oracle, seqs, cfg.prompt_len, cfg.top_k, eos_ids, cfg.memory_gib, device)


def _step(
    draft: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Scored,
    micro: int,
    cfg: OnPolicyConfig,
) -> dict[str, float]:
    """One optimizer step over ``batch``, in micro-batches (gradients accumulated)."""
    gen_len = batch.ids.shape[1]
    total = batch.mask.sum().clamp_min(1.0)
    sums = {"loss": 0.0, "kl": 0.0, "tvd": 0.0, "agree": 0.0}
    device = batch.seqs.device
    for start in range(0, len(batch), micro):
        part = batch.take(torch.arange(start, min(start + micro, len(batch)), device=device))
        share = part.mask.sum() / total  # micro-batch means, weighted to the batch mean
        with autocast(device):
            logits = forward_logits(draft, part.seqs, None, gen_len + 1)[:, :-1]
        terms = sparse_terms(logits, part, cfg.loss, cfg.tvd_weight)
        (terms["loss"] * share).backward()
        for key in sums:
            sums[key] += float(terms[key].detach() * share)
    torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums
