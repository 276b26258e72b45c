"""Protobuf <-> core dataclasses, in one place (TGI's from_pb / to_pb).

Servicers call these and hand plain dataclasses to the core, which never sees
a protobuf message.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams, SparseDist
from specdec.core.stopping import FinishReason
from specdec.core.types import DraftBlock, TurnStats
from specdec.v1 import common_pb2

DEFAULT_MAX_NEW_TOKENS = 128

_FINISH_TO_PB = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_TOKEN: common_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: common_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.CONTEXT_LIMIT: common_pb2.FINISH_REASON_CONTEXT_LIMIT,
}
_FINISH_FROM_PB: dict[int, FinishReason] = {int(v): k for k, v in _FINISH_TO_PB.items()}


def sampling_from_pb(
    pb: common_pb2.SamplingParams,
    *,
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    eos_token_ids: Sequence[int] = (),
) -> SamplingParams:
    """Request fields -> validated SamplingParams; 0 means "default" for top_p and max tokens.

    EOS ids join the stop ids unless ``ignore_eos`` is set.
    """
    if pb.max_new_tokens < 0:
        raise InvalidArgument(
            f"sampling.max_new_tokens must be >= 0 (0 = default {default_max_new_tokens}), "
            f"got {pb.max_new_tokens}"
        )
    stop_ids = tuple(pb.stop_token_ids)
    if not pb.ignore_eos:
        stop_ids = stop_ids + tuple(i for i in eos_token_ids if i not in stop_ids)
    params = SamplingParams(
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.top_p != 0.0 else 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
        max_new_tokens=pb.max_new_tokens or default_max_new_tokens,
        stop_token_ids=stop_ids,
        stop=tuple(pb.stop),
    )
    params.validate()
    return params


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    """The verification-relevant fields, plus stops (EOS included in stop_token_ids)."""
    pb = common_pb2.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,  # EOS ids are already in stop_token_ids
    )
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def sparse_to_pb(dist: SparseDist) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(
        token_ids=dist.token_ids.tolist(), probs=dist.probs.tolist()
    )


def sparse_from_pb(pb: common_pb2.SparseDistribution) -> SparseDist:
    if len(pb.token_ids) != len(pb.probs):
        raise InvalidArgument(
            f"draft distribution has {len(pb.token_ids)} token_ids but {len(pb.probs)} probs"
        )
    return SparseDist(
        token_ids=torch.tensor(list(pb.token_ids), dtype=torch.int64),
        probs=torch.tensor(list(pb.probs), dtype=torch.float32),
    )


def block_from_pb(
    token_ids: Sequence[int], distributions: Sequence[common_pb2.SparseDistribution]
) -> DraftBlock:
    """A VerifyBlock's payload -> DraftBlock (no distributions = token-only mode)."""
    if distributions and len(distributions) != len(token_ids):
        raise InvalidArgument(
            f"block has {len(token_ids)} tokens but {len(distributions)} draft distributions "
            "(send one per token, or none for token-only mode)"
        )
    q = tuple(sparse_from_pb(d) for d in distributions) if distributions else None
    return DraftBlock(token_ids=tuple(int(t) for t in token_ids), q=q)


def finish_reason_to_pb(reason: FinishReason | None) -> int:
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return int(_FINISH_TO_PB[reason])


def finish_reason_from_pb(value: int) -> FinishReason | None:
    return _FINISH_FROM_PB.get(value)


def stats_to_pb(
    stats: TurnStats,
    *,
    oracle_id: str = "",
    draft_id: str = "",
    drafter: int = common_pb2.DRAFTER_KIND_UNSPECIFIED,
    failovers: int = 0,
) -> common_pb2.GenerationStats:
    return common_pb2.GenerationStats(
        prompt_tokens=stats.prompt_tokens,
        output_tokens=stats.output_tokens,
        rounds=stats.rounds,
        proposed_tokens=stats.proposed,
        accepted_tokens=stats.accepted,
        cached_tokens=stats.cached_tokens,
        prefilled_tokens=stats.prefilled_tokens,
        prefill_ns=stats.prefill_ns,
        draft_ns=stats.draft_ns,
        verify_ns=stats.verify_ns,
        network_ns=stats.network_ns,
        queue_ns=stats.queue_ns,
        total_ns=stats.total_ns,
        time_to_first_token_ns=stats.time_to_first_token_ns,
        acceptance_rate=stats.acceptance_rate,
        mean_tokens_per_round=stats.mean_tokens_per_round,
        accepted_per_position=stats.accepted_per_position,
        proposed_per_position=stats.proposed_per_position,
        oracle_id=oracle_id,
        draft_id=draft_id,
        drafter=drafter,  # type: ignore[arg-type]
        failovers=failovers,
        rejected_rounds=stats.rejected_rounds,
        draft_ahead_hits=stats.ahead_hits,
        pipelined_rounds=stats.pipelined_rounds,
        skipped_blocks=stats.skipped_blocks,
        branch_rounds=stats.branch_rounds,
        rescued_rounds=stats.rescued_rounds,
        mean_speculative_tokens=stats.proposed / stats.rounds if stats.rounds else 0.0,
    )
