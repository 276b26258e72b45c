"""When a draft's tokens can be verified by an oracle: the one rule, for models and for workers.

Speculation compares token ids: the oracle scores the draft's ids with its own p and
weighs them against the draft's q. That is exact when the ids mean the same strings on
both sides (the same token → id map: equal vocabulary fingerprints) and every id the
draft can propose is one the oracle can score. Logit rows beyond the tokenizer's ids
(embedding padding: Qwen2.5-0.5B has 151,936 logits, Qwen2.5-7B 152,064, for one
tokenizer of 151,665 ids) are dropped when a model is loaded, which is the same as
giving them probability zero on both sides; so the widths compared here are usable
vocabulary sizes, and special-token settings (which ids end a turn) are the oracle's
business, not part of the match.
"""

from __future__ import annotations


def vocabulary_mismatch(
    draft_fingerprint: str, draft_vocab: int, oracle_fingerprint: str, oracle_vocab: int
) -> str | None:
    """Why a draft (fingerprint, usable vocabulary size) cannot draft for an oracle, or None.

    A size of 0 means "not reported" (older workers) and is not compared.
    """
    if draft_fingerprint != oracle_fingerprint:
        return (
            f"they use different tokenizers (vocabulary fingerprint {draft_fingerprint} for "
            f"the draft, {oracle_fingerprint} for the oracle); pick a draft from the oracle's "
            "model family, or distill one with `specdec distill`"
        )
    if draft_vocab and oracle_vocab and draft_vocab > oracle_vocab:
        return (
            f"the draft can propose {draft_vocab} token ids but the oracle scores only "
            f"{oracle_vocab}; its model has fewer logits than the tokenizer has ids"
        )
    return None
