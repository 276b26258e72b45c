"""Pre-training of the oracle: a LlamaForCausalLM from scratch on the code corpus.

Next-token cross-entropy on random windows of the training stream; fp32 master weights
with bf16 autocast on CUDA, AdamW, warmup + cosine over the time budget, gradient
clipping. The held-out loss is measured every ``eval_every_s`` seconds on a fixed set of
windows; the best weights are kept and restored at the end (early stopping after
``patience`` evaluations without improvement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from specdec.training.loop import (
    Budget,
    Meter,
    autocast,
    batches,
    fail_if_not_finite,
    log,
    lr_at,
    make_optimizer,
    random_windows,
    set_lr,
    synchronize,
)


@dataclass
class OracleTrainConfig:
    """Hyper-parameters of oracle pre-training (defaults: one H200, ~4 minutes)."""

    seq_len: int = 512
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    minutes: float = 4.0
    max_steps: int | None = None
    eval_every_s: float = 20.0
    eval_batch: int = 64
    patience: int = 6
    compile: bool = False
    log_every_s: float = 10.0
    seed: int = 0


@dataclass
class StageResult:
    """What a training stage did: steps, tokens, time, losses, the evaluation history."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_train_loss: float = float("nan")
    best_eval: float = float("nan")
    best_step: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 1),
            "final_train_loss": self.final_train_loss,
            "best_eval": self.best_eval,
            "best_step": self.best_step,
            "stopped_early": self.stopped_early,
            "history": self.history,
        }


def lm_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows (B, T+1): predict windows[:, 1:] from [:, :-1]."""
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module, windows: torch.Tensor, batch: int, device: torch.device
) -> float:
    """Token-weighted mean cross-entropy over fixed windows (n, T+1)."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for chunk in batches(windows, batch):
        with autocast(device):
            loss = lm_loss(model, chunk)
        total += loss.float() * chunk.shape[0]
        count += chunk.shape[0]
    model.train()
    return float(total) / count


def train_oracle(
    model: torch.nn.Module,
    train_stream: torch.Tensor,
    eval_windows: torch.Tensor,
    cfg: OracleTrainConfig,
    device: torch.device,
) -> StageResult:
    """Train ``model`` in place; on return it holds the weights with the best held-out loss."""
    model.to(device).train()
    forward = cast(torch.nn.Module, torch.compile(model)) if cfg.compile else model
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    budget = Budget(cfg.minutes * 60, cfg.max_steps)
    meter = Meter(cfg.log_every_s)
    result = StageResult()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    best_state: dict[str, torch.Tensor] | None = None
    last_eval_t = budget.elapsed()
    evals_since_best = 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    step = 0

    def evaluate_now(train_loss: float) -> None:
        nonlocal best_state, evals_since_best
        loss = eval_loss(model, eval_windows, cfg.eval_batch, device)
        result.history.append(
            {"step": step, "seconds": round(budget.elapsed(), 1), "train": train_loss, "eval": loss}
        )
        if best_state is None or loss < result.best_eval:
            result.best_eval, result.best_step, evals_since_best = loss, step, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            evals_since_best += 1
        log("oracle", f"eval step {step}: held-out loss {loss:.4f} (best {result.best_eval:.4f})")

    log(
        "oracle",
        f"training {tokens_per_step} tokens/step on {device}, budget "
        + (f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.minutes:.2f} min"),
    )
    while not budget.done(step):
        set_lr(
            optimizer,
            lr_at(step, budget.progress(step), cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio),
        )
        windows = random_windows(train_stream, cfg.batch_size, cfg.seq_len + 1, gen)
        with autocast(device):
            loss = lm_loss(forward, windows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Summed on the device: one host sync per log line, not per step.
        loss_sum += loss.detach().float()
        loss_count += 1
        step += 1
        if meter.due() or budget.done(step):
            mean = float(loss_sum) / loss_count
            fail_if_not_finite("oracle", step, mean)
            meter.update(tokens_per_step * loss_count)
            loss_sum.zero_()
            loss_count = 0
            log(
                "oracle",
                f"step {step} loss {mean:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{meter.rate():,.0f} tok/s elapsed {budget.elapsed():.0f}s "
                f"eta {budget.eta(step):.0f}s",
            )
            result.final_train_loss = mean
        if budget.elapsed() - last_eval_t >= cfg.eval_every_s:
            synchronize(device)
            evaluate_now(result.final_train_loss)
            last_eval_t = budget.elapsed()
            if evals_since_best >= cfg.patience:
                result.stopped_early = True
                log("oracle", f"early stop: no held-out improvement in {cfg.patience} evals")
                break
    if loss_count:
        result.final_train_loss = float(loss_sum) / loss_count
    evaluate_now(result.final_train_loss)
    assert best_state is not None
    model.load_state_dict(best_state)
    synchronize(device)
    result.steps, result.tokens, result.seconds = step, step * tokens_per_step, budget.elapsed()
    log(
        "oracle",
        f"done: {step} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; "
        f"best held-out loss {result.best_eval:.4f} at step {result.best_step}",
    )
    return result
