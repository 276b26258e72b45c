"""Distillation of the draft from the oracle, on sequences the oracle itself generates.

Data (DistillSpec): prompts cut from the training stream, continued by the oracle, half of
them greedily and half by sampling at temperature 1, so the draft learns the oracle's
distribution exactly where speculative decoding will query it. A fraction of every batch
is plain corpus windows. Teacher logits are computed on the fly.

Loss per position, p = oracle, q = draft (both softmax over the vocabulary):
    forward KL(p‖q) = Σ_x p(x) (log p(x) − log q(x))
    TVD(p, q) = ½ Σ_x |p(x) − q(x)| = 1 − Σ_x min(p(x), q(x)) = 1 − acceptance at T = 1,
so minimising TVD maximises the sampling acceptance directly, while forward KL gives dense
gradients over the whole distribution (and its mode tracks the oracle's argmax, which is
what greedy acceptance counts). The loss is KL + ``tvd_weight``·TVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.training.loop import (
    Budget,
    Meter,
    autocast,
    batches,
    decode_attention,
    fail_if_not_finite,
    log,
    lr_at,
    make_optimizer,
    random_windows,
    set_lr,
    synchronize,
)
from specdec.training.modeling import cache_kwarg, forward_logits
from specdec.training.train_oracle import StageResult

try:  # the class moved between transformers releases; both expose this name
    from transformers import DynamicCache
except ImportError:  # pragma: no cover
    from transformers.cache_utils import DynamicCache


@dataclass
class DistillConfig:
    """Hyper-parameters of data generation and distillation (defaults: one H200, ~2.5 min)."""

    prompt_len: int = 64
    gen_len: int = 192
    gen_sequences: int = 16384
    gen_batch: int = 2048
    greedy_frac: float = 0.5
    valid_sequences: int = 256
    batch_size: int = 96
    corpus_frac: float = 0.25
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    tvd_weight: float = 1.0
    minutes: float = 2.5
    max_steps: int | None = None
    eval_every_s: float = 20.0
    eval_batch: int = 64
    patience: int = 6
    log_every_s: float = 10.0
    seed: int = 0


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    n_new: int,
    greedy: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Continue prompts (B, P) by ``n_new`` tokens with a KV cache; returns (B, P + n_new).

    Row b is greedy (argmax) where ``greedy[b]``, else sampled at temperature 1. All
    prompts have the same length, so no padding or attention mask is needed. EOT is an
    ordinary token here: after it the model starts a new file, as in the training stream.
    """
    model.eval()
    arg = cache_kwarg(model)
    cache = DynamicCache()
    prompts = prompts.to(device)
    greedy = greedy.to(device)
    with decode_attention(device):
        with autocast(device):
            logits = forward_logits(model, prompts, cache, 1, arg)[:, -1]  # (B, V)
        out = [prompts]
        for i in range(n_new):
            probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            token = torch.where(greedy, probs.argmax(dim=-1), sampled)  # (B,)
            out.append(token[:, None])
            if i + 1 < n_new:
                with autocast(device):
                    logits = forward_logits(model, token[:, None], cache, 1, arg)[:, -1]
    return torch.cat(out, dim=1)


def generate_many(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    n_new: int,
    greedy_frac: float,
    batch: int,
    seed: int,
    device: torch.device,
    stage: str = "generate",
) -> torch.Tensor:
    """``generate`` over many prompts in batches; the first ``greedy_frac`` of a batch is greedy."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i, chunk in enumerate(batches(prompts, batch)):
        n_greedy = round(chunk.shape[0] * greedy_frac)
        greedy = torch.arange(chunk.shape[0], device=device) < n_greedy
        out.append(generate(model, chunk, n_new, greedy, gen, device))
        log(stage, f"batch {i + 1}/{-(-prompts.shape[0] // batch)}: {chunk.shape[0]} sequences")
    return torch.cat(out, dim=0)


def init_draft_from_oracle(draft: torch.nn.Module, oracle: torch.nn.Module) -> list[str]:
    """Copy every oracle tensor whose name and shape the draft shares; returns the names.

    With equal widths that is the (tied) embedding, the final norm and the first decoder
    layers: the draft starts as the oracle truncated to its first layers.
    """
    target = draft.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in oracle.state_dict().items():
            if name in target and target[name].shape == tensor.shape:
                target[name].copy_(tensor.to(target[name].device, target[name].dtype))
                copied.append(name)
    return copied


def distill_terms(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position mean forward KL, TVD, and argmax agreement of logits (..., V)."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    return {
        "fkl": (p * (log_p - log_q)).sum(-1).mean(),
        "tvd": 0.5 * (p - q).abs().sum(-1).mean(),
        "agree": (teacher_logits.argmax(-1) == student_logits.argmax(-1)).float().mean(),
    }


def _logits(model: torch.nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids=seqs, use_cache=False).logits
    return logits


@torch.no_grad()
def validate(
    draft: torch.nn.Module,
    oracle: torch.nn.Module,
    seqs: torch.Tensor,
    prompt_len: int,
    batch: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean KL / TVD / argmax agreement over the continuation positions of held-out sequences."""
    draft.eval()
    sums = {"fkl": 0.0, "tvd": 0.0, "agree": 0.0}
    n = 0
    for chunk in batches(seqs, batch):
        with autocast(device):
            # Position t predicts token t+1; continuations start at index prompt_len.
            t = _logits(oracle, chunk)[:, prompt_len - 1 : -1]
            s = _logits(draft, chunk)[:, prompt_len - 1 : -1]
        terms = distill_terms(t, s)
        for key in sums:
            sums[key] += float(terms[key]) * chunk.shape[0]
        n += chunk.shape[0]
    draft.train()
    return {k: v / n for k, v in sums.items()}


def train_draft(
    draft: torch.nn.Module,
    oracle: torch.nn.Module,
    gen_seqs: torch.Tensor,
    corpus_stream: torch.Tensor,
    valid_seqs: torch.Tensor,
    cfg: DistillConfig,
    device: torch.device,
) -> StageResult:
    """Distill ``oracle`` into ``draft`` in place; on return the draft holds its best weights.

    "Best" is the highest greedy agreement (draft argmax == oracle argmax) on the
    continuations of ``valid_seqs`` (B, P+G), generated from held-out prompts.
    """
    oracle.to(device).eval()
    for p in oracle.parameters():
        p.requires_grad_(False)
    draft.to(device).train()
    optimizer = make_optimizer(draft, cfg.lr, cfg.weight_decay, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    seq_len = gen_seqs.shape[1]
    n_corpus = round(cfg.batch_size * cfg.corpus_frac)
    n_gen = cfg.batch_size - n_corpus
    budget = Budget(cfg.minutes * 60, cfg.max_steps)
    meter = Meter(cfg.log_every_s)
    result = StageResult()
    best_state: dict[str, torch.Tensor] | None = None
    best_agree = -1.0
    evals_since_best = 0
    last_eval_t = budget.elapsed()
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    step = 0

    def evaluate_now() -> None:
        nonlocal best_state, best_agree, evals_since_best
        metrics = validate(draft, oracle, valid_seqs, cfg.prompt_len, cfg.eval_batch, device)
        result.history.append({"step": step, "seconds": round(budget.elapsed(), 1), **metrics})
        if metrics["agree"] > best_agree:
            best_agree, result.best_step, evals_since_best = metrics["agree"], step, 0
            result.best_eval = metrics["fkl"]
            best_state = {k: v.detach().clone() for k, v in draft.state_dict().items()}
        else:
            evals_since_best += 1
        log(
            "distill",
            f"eval step {step}: held-out agreement {metrics['agree']:.4f} "
            f"(1-TVD {1 - metrics['tvd']:.4f}, KL {metrics['fkl']:.4f}; "
            f"best agreement {best_agree:.4f})",
        )

    log(
        "distill",
        f"{gen_seqs.shape[0]} generated sequences of {seq_len} tokens, "
        f"{n_gen}+{n_corpus} (generated+corpus) per step, budget "
        + (f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.minutes:.2f} min"),
    )
    evaluate_now()
    while not budget.done(step):
        set_lr(
            optimizer,
            lr_at(step, budget.progress(step), cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio),
        )
        pick = torch.randint(0, gen_seqs.shape[0], (n_gen,), generator=gen, device=device)
        parts = [gen_seqs[pick]]
        if n_corpus:
            parts.append(random_windows(corpus_stream, n_corpus, seq_len, gen))
        seqs = torch.cat(parts, dim=0)  # (B, L)
        with torch.no_grad(), autocast(device):
            teacher = _logits(oracle, seqs)
        with autocast(device):
            student = _logits(draft, seqs)
        terms = distill_terms(teacher, student)
        loss = terms["fkl"] + cfg.tvd_weight * terms["tvd"]
        terms = {k: v.detach() for k, v in terms.items()}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_count += 1
        step += 1
        if meter.due() or budget.done(step):
            mean = float(loss_sum) / loss_count
            fail_if_not_finite("distill", step, mean)
            meter.update(seqs.numel() * loss_count)
            loss_sum.zero_()
            loss_count = 0
            result.final_train_loss = mean
            log(
                "distill",
                f"step {step} loss {mean:.4f} (KL {float(terms['fkl']):.3f} "
                f"TVD {float(terms['tvd']):.3f} agree {float(terms['agree']):.3f}) "
                f"{meter.rate():,.0f} tok/s elapsed {budget.elapsed():.0f}s "
                f"eta {budget.eta(step):.0f}s",
            )
        if budget.elapsed() - last_eval_t >= cfg.eval_every_s:
            synchronize(device)
            evaluate_now()
            last_eval_t = budget.elapsed()
            if evals_since_best >= cfg.patience:
                result.stopped_early = True
                log("distill", f"early stop: no held-out improvement in {cfg.patience} evals")
                break
    if loss_count:
        result.final_train_loss = float(loss_sum) / loss_count
    evaluate_now()
    assert best_state is not None
    draft.load_state_dict(best_state)
    synchronize(device)
    result.steps, result.tokens, result.seconds = (
        step,
        step * cfg.batch_size * seq_len,
        budget.elapsed(),
    )
    log(
        "distill",
        f"done: {step} steps in {result.seconds:.0f}s; best held-out agreement "
        f"{best_agree:.4f} at step {result.best_step}",
    )
    return result
