"""The in-process speculative loop: the shared round loop with the oracle in this process.

``speculative_generate`` runs ``specdec.core.loop.run_turn`` — the very loop the
draft service and the gateway run over gRPC — with ``LocalOracleLink``, which
calls the ``Oracle`` directly. The greedy-equivalence tests therefore check
the production loop, not a copy of it.

One round with a block of k draft tokens commits n + 1 tokens, n in [0, k]: the
accepted prefix and one recovered/bonus token (see ``specdec.core.verifier``). With
per-token acceptance rate a (i.i.d. model), the expected tokens per round are
(1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023, eq. 1). k = 0, or no drafter,
is plain decoding through the same verify path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from specdec.core.errors import InvalidArgument
from specdec.core.loop import run_turn
from specdec.core.prefix import ends_with
from specdec.core.protocols import KPolicy, OracleLink
from specdec.core.sampling import SamplingParams, resolve_seed, validate_token_ids
from specdec.core.stopping import FinishReason, StopChecker
from specdec.core.types import (
    DraftBlock,
    OpenResult,
    RoundReport,
    Turn,
    TurnStats,
    VerifyResult,
    check_k,
)
from specdec.drafters import Drafter
from specdec.drafters.proposers import InlineProposer
from specdec.engine.models import LoadedModel, check_compatible
from specdec.engine.oracle import Oracle


@dataclass(frozen=True)
class GenerationResult:
    """tokens: the generated ids only (prompt excluded); rounds: one report per round."""

    tokens: list[int]
    finish_reason: FinishReason
    stats: TurnStats
    rounds: list[RoundReport] = field(default_factory=list)


class LocalOracleLink:
    """An ``OracleLink`` that runs the oracle in this process, on one KV cache."""

    def __init__(self, oracle: Oracle) -> None:
        self._oracle = oracle
        self._cache = oracle.new_cache()
        self._committed: list[int] = []
        self._params = SamplingParams()
        self._seed = 0

    async def open(self, tokens: list[int], params: SamplingParams, seed: int) -> OpenResult:
        result = self._oracle.prefill(self._cache, tokens)
        self._committed, self._params, self._seed = list(tokens), params, seed
        return OpenResult(result.reused, result.computed, result.prefill_ns)

    async def verify(
        self,
        round_index: int,
        base_length: int,
        block: DraftBlock,
        draft_ns: int,
        assumed: tuple[int, ...] = (),
        last_alternative: bool = False,
    ) -> VerifyResult:
        if assumed and not ends_with(self._committed, base_length, assumed):
            return VerifyResult(None, len(self._committed), 0)  # a wrong pipelining guess
        assert base_length == len(self._committed), (base_length, len(self._committed))
        verdict, timing = self._oracle.verify_timed(
            self._cache, self._committed, block, self._params, self._seed
        )
        self._committed.extend([*block.token_ids[: verdict.num_accepted], verdict.next_token])
        return VerifyResult(verdict, len(self._committed), timing.verify_ns)


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
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidArgument(f"k must be an integer, got {k!r}")
    check_k(k)
    draft_model = getattr(drafter, "model", None)
    if isinstance(draft_model, LoadedModel):
        check_compatible(draft_model, oracle.model)


def speculative_generate(
    prompt_ids: Sequence[int],
    oracle: Oracle,
    drafter: Drafter | None,
    params: SamplingParams,
    k: int,
    eos_token_ids: Sequence[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    policy: KPolicy | None = None,
    draft_ahead: bool = False,
    pipeline_depth: int = 1,
    link: OracleLink | None = None,
    branches: int = 0,
) -> GenerationResult:
    """Generate after ``prompt_ids`` with ``oracle``, drafting ``k`` tokens per round.

    ``decode`` (ids -> text) is needed for stop strings; it defaults to the oracle's tokenizer.
    ``policy`` chooses k per round (``specdec.core.adaptive.AdaptiveK``); k is then its upper bound.
    ``link`` replaces the in-process link to ``oracle`` (e.g. one with a round trip).
    ``draft_ahead``, ``pipeline_depth`` and ``branches``: see ``specdec.core.types.Turn``.
    """
    validate_request(prompt_ids, oracle, drafter, params, k)
    if decode is None and params.stop:
        decode = oracle.model.decode
    seed = resolve_seed(params.seed)
    reset = getattr(drafter, "reset", None)
    if callable(reset):
        reset(seed)
    turn = Turn(
        context=list(prompt_ids),
        prompt_tokens=len(prompt_ids),
        params=params,
        seed=seed,
        k=k,
        stop=StopChecker(params, eos_token_ids, decode),
        max_context=oracle.max_context,
        draft_ahead=draft_ahead,
        pipeline_depth=pipeline_depth,
        branches=branches,
    )
    generated: list[int] = []
    rounds: list[RoundReport] = []

    async def on_commit(tokens: list[int], report: RoundReport) -> None:
        generated.extend(tokens)
        rounds.append(report)

    proposer = InlineProposer(drafter) if drafter is not None else None
    reason, stats = asyncio.run(
        run_turn(link or LocalOracleLink(oracle), proposer, turn, on_commit, policy=policy)
    )
    return GenerationResult(generated, reason, stats, rounds)
