"""The oracle's targets for distillation, kept small, and the divergences measured on them.

The oracle scores each continuation position once; only its top-``K`` log-probabilities
are kept (ids + values, K ≪ V), so a round's targets stay small even for a 150k
vocabulary, and every tensor of [rows, positions, V] floats is built in chunks that fit
``memory_gib``. Positions after an EOS of the oracle are masked out.

Loss per continuation position: the
teacher p is known on its top-K ids S plus one "rest" bin holding 1 − p(S); the draft's q
is coarse-grained onto the same K + 1 bins, q(rest) = 1 − q(S). On these bins
    KL(p‖q) = Σ_{x∈S} p(x) log(p(x)/q(x)) + p(rest) log(p(rest)/q(rest))
    TVD(p, q) = ½ (Σ_{x∈S} |p(x) − q(x)| + |p(rest) − q(rest)|)
    JSD(p, q) = ½ KL(p‖m) + ½ KL(q‖m),  m = (p + q)/2
each a lower bound of the full-vocabulary divergence that is exact when p(rest) = 0.
TVD = 1 − Σ min(p, q) is one minus the T = 1 acceptance; KL and JSD give smoother
gradients. The loss is ``kl+tvd`` (KL + ``tvd_weight``·TVD) unless ``loss`` says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specdec.training.loop import autocast
from specdec.training.modeling import forward_logits

LOSSES = ("kl+tvd", "kl", "tvd", "jsd")
_EPS = 1e-9


@dataclass
class Scored:
    """Sequences (B, P+G) and the oracle's top-K log-probs at their G continuation
    positions: ids (B, G, K), logp (B, G, K); mask (B, G) is 0 after an EOS."""

    seqs: torch.Tensor
    ids: torch.Tensor
    logp: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.seqs.shape[0])

    def take(self, rows: torch.Tensor) -> Scored:
        return Scored(self.seqs[rows], self.ids[rows], self.logp[rows], self.mask[rows])

    @staticmethod
    def cat(parts: Sequence[Scored]) -> Scored:
        return Scored(
            *(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Scored))
        )


def rows_per_chunk(positions: int, vocab: int, memory_gib: float, copies: int) -> int:
    """How many sequences of ``positions`` logits rows fit ``copies`` float32 [.., V]
    tensors in ``memory_gib``."""
    per_row = positions * vocab * 4 * copies
    return max(1, int(memory_gib * (1 << 30) // per_row))


def eos_mask(continuations: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """(B, G) float: 1 up to and including the first EOS of each row, 0 after it."""
    if not eos_ids:
        return torch.ones_like(continuations, dtype=torch.float32)
    eos = torch.tensor(list(eos_ids), device=continuations.device)
    is_eos = torch.isin(continuations, eos).int()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS strictly before t
    return (before == 0).float()


@torch.no_grad()
def score(
    oracle: torch.nn.Module,
    seqs: torch.Tensor,
    prompt_len: int,
    top_k: int,
    eos_ids: Sequence[int],
    memory_gib: float,
    device: torch.device,
) -> Scored:
    """The oracle's top-K log-probs at every continuation position of ``seqs``."""
    oracle.eval()
    gen_len = seqs.shape[1] - prompt_len
    vocab = logits_width(oracle)
    chunk = rows_per_chunk(gen_len + 1, vocab, memory_gib, copies=3)
    ids, logp = [], []
    for start in range(0, seqs.shape[0], chunk):
        part = seqs[start : start + chunk].to(device)
        with autocast(device):
            # The last G+1 rows; row t < G predicts continuation token t.
            logits = forward_logits(oracle, part, None, gen_len + 1)[:, :-1]
        values, indices = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        ids.append(indices)
        logp.append(values)
        del logits
    seqs = seqs.to(device)
    return Scored(seqs, torch.cat(ids), torch.cat(logp), eos_mask(seqs[:, prompt_len:], eos_ids))


def sparse_terms(
    student_logits: torch.Tensor, target: Scored, loss: str = "kl+tvd", tvd_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Masked means of the loss, KL, TVD and argmax agreement; logits (B, G, V)."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, target.ids)  # (B, G, K)
    p_top, q_top = target.logp.exp(), log_q_top.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(0.0)  # (B, G)
    q_rest = (1 - q_top.sum(-1)).clamp_min(0.0)
    log_p_rest, log_q_rest = torch.log(p_rest + _EPS), torch.log(q_rest + _EPS)
    kl = (p_top * (target.logp - log_q_top)).sum(-1) + p_rest * (log_p_rest - log_q_rest)
    tvd = 0.5 * ((p_top - q_top).abs().sum(-1) + (p_rest - q_rest).abs())
    agree = (log_q.argmax(-1) == target.ids[..., 0]).float()
    per_position = {"kl": kl, "tvd": tvd, "agree": agree}
    if loss == "jsd":
        per_position["loss"] = _jsd(p_top, q_top, p_rest, q_rest)
    elif loss == "kl":
        per_position["loss"] = kl
    elif loss == "tvd":
        per_position["loss"] = tvd
    else:
        per_position["loss"] = kl + tvd_weight * tvd
    weight = target.mask.sum().clamp_min(1.0)
    return {k: (v * target.mask).sum() / weight for k, v in per_position.items()}


def _jsd(
    p_top: torch.Tensor, q_top: torch.Tensor, p_rest: torch.Tensor, q_rest: torch.Tensor
) -> torch.Tensor:
    def half_kl(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return a * (torch.log(a + _EPS) - torch.log(m + _EPS))

    m_top, m_rest = (p_top + q_top) / 2, (p_rest + q_rest) / 2
    top = (half_kl(p_top, m_top) + half_kl(q_top, m_top)).sum(-1)
    return 0.5 * (top + half_kl(p_rest, m_rest) + half_kl(q_rest, m_rest))


def logits_width(model: Any) -> int:
    """Rows of ``model``'s output embedding: the width of its logits."""
    return int(model.get_output_embeddings().weight.shape[0])
