"""Pieces both training stages share: device setup, budget, LR schedule, batches, logging.

A stage runs for a wall-clock budget (or a fixed number of steps when ``max_steps`` is
set, for reproducible runs and tests). Its progress p in [0, 1] is elapsed/budget (or
step/max_steps); the learning rate warms up linearly over the first ``warmup_steps``
steps, then follows a cosine from the peak to ``min_lr_ratio``·peak as p goes 0 → 1, so
the schedule ends exactly when the budget does, whatever the hardware's speed.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from specdec.core.errors import InvalidArgument


def log(stage: str, message: str) -> None:
    """One progress line, flushed at once (the runner only sees the tail of the output)."""
    print(f"[{time.strftime('%H:%M:%S')}] {stage:>9} | {message}", flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; refuse cuda when there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"--device {name}: CUDA is not available on this machine")
    return device


def setup_device(device: torch.device) -> None:
    """TF32 for the few fp32 matmuls left outside autocast; cheap and accurate enough."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA (weights stay fp32: the master copy); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decode_attention(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """SDPA without the cuDNN backend, for incremental decoding on CUDA.

    Decoding calls attention with a new key length at every step; cuDNN plans a graph
    per new shape, which costs far more than the step itself at these sizes, while
    flash / memory-efficient kernels need no planning.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Budget:
    """When a stage ends: after ``seconds`` of wall clock, or after ``max_steps`` if set."""

    seconds: float
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.max_steps is None and self.seconds <= 0:
            raise InvalidArgument("a training stage needs a positive time budget or max_steps")
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        """Fraction done in [0, 1]."""
        if self.max_steps is not None:
            return min(1.0, step / self.max_steps)
        return min(1.0, self.elapsed() / self.seconds)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def eta(self, step: int) -> float:
        p = self.progress(step)
        return self.elapsed() * (1 - p) / p if p > 0 else float("inf")


def lr_at(step: int, progress: float, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over steps, then cosine over progress from peak to min_ratio·peak."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_ratio + (1 - min_ratio) * cosine)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; decay on matrices only (not norms), fused kernels on CUDA."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda"
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def random_windows(
    stream: torch.Tensor, batch: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """``batch`` windows (B, length) at uniform random offsets of ``stream`` (N,), as int64."""
    n = stream.numel()
    if n <= length:
        raise InvalidArgument(f"token stream of {n} tokens is shorter than a {length}-token window")
    starts = torch.randint(0, n - length, (batch,), generator=generator, device=stream.device)
    idx = starts[:, None] + torch.arange(length, device=stream.device)[None, :]
    return stream[idx].long()


def spaced_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """Up to ``count`` evenly spaced, non-overlapping windows (n, length): a fixed eval set."""
    n = stream.numel()
    count = min(count, n // length)
    if count < 1:
        raise InvalidArgument(
            f"held-out stream of {n} tokens is shorter than one {length}-token window"
        )
    step = n // count
    starts = torch.arange(count, device=stream.device) * step
    idx = starts[:, None] + torch.arange(length, device=stream.device)[None, :]
    return stream[idx].long()


def batches(data: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for start in range(0, data.shape[0], batch):
        yield data[start : start + batch]


class Meter:
    """When to print the next progress line, and tokens/s since the previous one."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last_t = time.perf_counter()
        self.tokens = 0

    def update(self, tokens: int) -> None:
        self.tokens += tokens

    def due(self) -> bool:
        return time.perf_counter() - self.last_t >= self.every_s

    def rate(self) -> float:
        """Tokens/s since the last call; resets the window."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.last_t, 1e-9)
        self.last_t, self.tokens = now, 0
        return rate


def fail_if_not_finite(stage: str, step: int, loss: float) -> None:
    """A NaN/inf loss is a bug or a divergence: stop loudly instead of saving garbage."""
    if not math.isfinite(loss):
        print(f"{stage}: loss is {loss} at step {step}; lower the learning rate", file=sys.stderr)
        raise RuntimeError(f"{stage}: non-finite loss {loss} at step {step}")
