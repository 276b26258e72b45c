"""The in-process speculative loop: draft k tokens, verify them in one oracle forward, repeat.

A ladder of small functions (as gpt-fast's generate.py):
``validate_request`` -> ``draft_block`` -> ``speculative_round`` -> ``speculative_generate``.

One round with a block of k draft tokens commits n + 1 tokens, n in [0, k]: the
accepted prefix and one recovered/bonus token (see ``specdec.verifier``). With
per-token acceptance rate a (i.i.d. model), the expected tokens per round are
(1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023, eq. 1). k = 0, or no drafter,
is plain decoding through the same verify path: every round is a zero-token
block whose bonus token is the oracle's own choice.

The output is exactly the oracle's alone: greedy token for token, sampled in
distribution; ``StopChecker`` cuts a round's tokens where plain decoding would
have stopped (EOS, stop ids, stop strings, max_new_tokens), and the loop stops at
the oracle's context length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from specdec.drafters import Drafter
from specdec.errors import InvalidArgument
from specdec.kv_cache import SequenceCache
from specdec.models import LoadedModel, check_compatible
from specdec.oracle import Oracle
from specdec.sampling import SamplingParams, resolve_seed, validate_token_ids
from specdec.stopping import FinishReason, StopChecker
from specdec.verifier import MAX_SPECULATIVE_TOKENS, DraftBlock, committed_tokens


@dataclass(frozen=True)
class RoundStats:
    """One round: proposed draft tokens, accepted ones, tokens kept after stopping, times in ns."""

    proposed: int
    accepted: int
    kept: int
    draft_ns: int
    verify_ns: int


@dataclass
class GenerationStats:
    """Totals over a generation.

    accepted_at[i]: rounds in which draft position i was accepted (gpt-fast's
    accept_counts shifted by one); accepted_at[i] / rounds with >= i+1 proposed
    tokens estimates the probability of accepting position i given the ones before.
    """

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    prefill_ns: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    accepted_at: list[int] = field(default_factory=list)
    round_stats: list[RoundStats] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Committed tokens per oracle forward (accepted + one recovered/bonus each)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def record(self, round_stats: RoundStats) -> None:
        self.rounds += 1
        self.proposed += round_stats.proposed
        self.accepted += round_stats.accepted
        self.draft_ns += round_stats.draft_ns
        self.verify_ns += round_stats.verify_ns
        if len(self.accepted_at) < round_stats.accepted:
            self.accepted_at.extend([0] * (round_stats.accepted - len(self.accepted_at)))
        for i in range(round_stats.accepted):
            self.accepted_at[i] += 1
        self.round_stats.append(round_stats)


@dataclass(frozen=True)
class GenerationResult:
    """tokens: the generated ids only (prompt excluded)."""

    tokens: list[int]
    finish_reason: FinishReason
    stats: GenerationStats


def validate_request(
    prompt_ids: Sequence[int],
    oracle: Oracle,
    drafter: Drafter | None,
    params: SamplingParams,
    k: int,
) -> None:
    """Raise ``InvalidArgument`` (or ``VocabularyMismatch``) naming what is wrong."""
    params.validate()
    validate_token_ids(prompt_ids, oracle.vocab_size, "prompt_token_ids")
    if len(prompt_ids) >= oracle.max_context:
        raise InvalidArgument(
            f"prompt of {len(prompt_ids)} tokens leaves no room in the oracle's context of "
            f"{oracle.max_context} tokens; shorten it"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise InvalidArgument(f"k must be an integer in [0, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
    draft_model = getattr(drafter, "model", None)
    if isinstance(draft_model, LoadedModel):
        check_compatible(draft_model, oracle.model)


def draft_block(
    drafter: Drafter | None, committed: Sequence[int], k: int, params: SamplingParams
) -> DraftBlock:
    """The drafter's block of at most k tokens (an empty block when k == 0 or no drafter)."""
    if drafter is None or k == 0:
        return DraftBlock(token_ids=())
    block = drafter.propose(committed, k, params)
    if len(block.token_ids) > k:
        # A drafter may propose less than asked, never more: the round budget is k.
        block = DraftBlock(
            token_ids=block.token_ids[:k], q=None if block.q is None else block.q[:k]
        )
    return block


def speculative_round(
    oracle: Oracle,
    cache: SequenceCache,
    drafter: Drafter | None,
    committed: list[int],
    k: int,
    params: SamplingParams,
    seed: int,
) -> tuple[list[int], RoundStats]:
    """One draft + verify round -> (committed tokens, its stats; kept = all of them)."""
    start = time.perf_counter_ns()
    block = draft_block(drafter, committed, k, params)
    draft_ns = time.perf_counter_ns() - start
    verdict, timing = oracle.verify_timed(cache, committed, block, params, seed)
    if drafter is not None and k > 0:
        drafter.update(verdict.num_accepted)
    new_tokens = committed_tokens(block, verdict)
    stats = RoundStats(
        proposed=len(block.token_ids),
        accepted=verdict.num_accepted,
        kept=len(new_tokens),
        draft_ns=draft_ns,
        verify_ns=timing.verify_ns,
    )
    return new_tokens, stats


def speculative_generate(
    prompt_ids: Sequence[int],
    oracle: Oracle,
    drafter: Drafter | None,
    params: SamplingParams,
    k: int,
    eos_token_ids: Sequence[int] = (),
    decode: Callable[[list[int]], str] | None = None,
) -> GenerationResult:
    """Generate after ``prompt_ids`` with ``oracle``, drafting ``k`` tokens per round.

    ``decode`` (ids -> text) is needed for stop strings; it defaults to the oracle's tokenizer.
    """
    validate_request(prompt_ids, oracle, drafter, params, k)
    if decode is None and params.stop:
        decode = oracle.model.decode
    seed = resolve_seed(params.seed)
    reset = getattr(drafter, "reset", None)
    if callable(reset):
        reset(seed)

    stopper = StopChecker(params, eos_token_ids, decode)
    stats = GenerationStats()
    cache = oracle.new_cache()
    committed = list(prompt_ids)
    stats.prefill_ns = oracle.prefill(cache, committed).prefill_ns
    generated: list[int] = []
    finish_reason: FinishReason | None = None
    while finish_reason is None:
        # Each round commits at most k_round + 1 tokens: stay within both budgets.
        budget = min(params.max_new_tokens - len(generated), oracle.max_context - len(committed))
        if budget <= 0:
            finish_reason = FinishReason.LENGTH
            break
        new_tokens, round_stats = speculative_round(
            oracle, cache, drafter, committed, min(k, budget - 1), params, seed
        )
        keep, finish_reason = stopper.feed(new_tokens)
        stats.record(replace(round_stats, kept=keep))
        generated.extend(new_tokens[:keep])
        committed.extend(new_tokens[:keep])
    return GenerationResult(tokens=generated, finish_reason=finish_reason, stats=stats)
