"""Protobuf <-> core dataclasses, in one place (TGI's from_pb / to_pb).

Servicers and the workers' Connect stream call these and hand plain dataclasses
(``specdec.core.types``, ``specdec.core.messages``) to the rest, which never sees a
protobuf message. Each ``*_from_pb`` of a request validates what it converts, with
messages naming the request's fields. Importing this module does not load torch (the
application client uses it): the sampling maths' module is imported on first use.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from specdec.core.errors import InvalidArgument
from specdec.core.messages import (
    Assignment,
    AssignmentCommitted,
    AssignmentFailed,
    AssignmentFinished,
    AssignmentOpened,
    CancelAssignment,
    CommitKey,
    CommitTicket,
    GatewayMessage,
    Registered,
    ReleaseDraftSession,
    ReleaseSessions,
    WorkerKind,
    WorkerLoad,
    WorkerMessage,
    WorkerRegistration,
)
from specdec.core.stopping import FinishReason
from specdec.core.types import (
    ChatMessage,
    DraftBlock,
    DrafterKind,
    OpenResult,
    Rescue,
    RoundReport,
    Speculation,
    TokenLogprob,
    TurnStats,
    Verdict,
    VerifyResult,
)
from specdec.v1 import common_pb2, gateway_pb2, oracle_pb2, registry_pb2

if TYPE_CHECKING:
    from specdec.core.sampling import SamplingParams, SparseDist

DEFAULT_MAX_NEW_TOKENS = 128

# ---- sampling and draft blocks --------------------------------------------------------


def sampling_from_pb(
    pb: common_pb2.SamplingParams,
    *,
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    eos_token_ids: Sequence[int] = (),
) -> SamplingParams:
    """Request fields -> validated SamplingParams; 0 means "default" for top_p and max tokens.

    EOS ids join the stop ids unless ``ignore_eos`` is set.
    """
    from specdec.core.sampling import SamplingParams

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
        logprobs=pb.logprobs if pb.HasField("logprobs") else None,
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
    if params.logprobs is not None:
        pb.logprobs = params.logprobs
    return pb


def logprobs_to_pb(logprobs: Sequence[TokenLogprob]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            logprob=lp.logprob, top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs
        )
        for lp in logprobs
    ]


def logprobs_from_pb(pbs: Sequence[common_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(pb.logprob, tuple(pb.top_token_ids), tuple(pb.top_logprobs)) for pb in pbs
    )


def sparse_to_pb(dist: SparseDist) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(
        token_ids=dist.token_ids.tolist(), probs=dist.probs.tolist()
    )


def sparse_from_pb(pb: common_pb2.SparseDistribution) -> SparseDist:
    import torch

    from specdec.core.sampling import SparseDist

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


# ---- the Verify stream's answers ---------------------------------------------------------


def opened_to_pb(opened: OpenResult, committed_length: int) -> oracle_pb2.VerifyResponse:
    return oracle_pb2.VerifyResponse(
        opened=oracle_pb2.VerifyOpened(
            cached_tokens=opened.cached_tokens,
            computed_tokens=opened.computed_tokens,
            prefill_ns=opened.prefill_ns,
            committed_length=committed_length,
            oracle_id=opened.oracle_id,
        )
    )


def opened_from_pb(pb: oracle_pb2.VerifyOpened) -> OpenResult:
    return OpenResult(pb.cached_tokens, pb.computed_tokens, pb.prefill_ns, pb.oracle_id)


def verdict_to_pb(
    round_index: int, result: VerifyResult, *, rescued: bool = False
) -> oracle_pb2.VerifyResponse:
    """``result`` of round ``round_index``; ``rescued``: the block was a rescue block. A
    verdict whose rescue decision is pending says so (the decision follows it)."""
    verdict = result.verdict
    if verdict is None:  # a pipelined block whose assumption failed
        skipped = oracle_pb2.VerifyVerdict(
            round=round_index,
            skipped=True,
            committed_length=result.committed_length,
            queue_ns=result.queue_ns,
        )
        return oracle_pb2.VerifyResponse(verdict=skipped)
    return oracle_pb2.VerifyResponse(
        verdict=oracle_pb2.VerifyVerdict(
            round=round_index,
            num_accepted=verdict.num_accepted,
            next_token_id=verdict.next_token,
            is_bonus=verdict.is_bonus,
            committed_length=result.committed_length,
            verify_ns=result.verify_ns,
            queue_ns=result.queue_ns,
            rescue_pending=result.decision is not None,
            rescued=rescued,
            logprobs=logprobs_to_pb(verdict.logprobs or ()),
            proof=result.proof,
        )
    )


def verify_result_from_pb(
    pb: oracle_pb2.VerifyVerdict, decision: asyncio.Future[Rescue | None] | None = None
) -> VerifyResult:
    """``decision``: the future the rescue decision that follows will resolve (the
    caller's, when ``pb.rescue_pending``)."""
    verdict = None
    if not pb.skipped:
        logprobs = logprobs_from_pb(pb.logprobs) if pb.logprobs else None
        verdict = Verdict(pb.num_accepted, pb.next_token_id, pb.is_bonus, logprobs)
    return VerifyResult(
        verdict, pb.committed_length, pb.verify_ns, pb.queue_ns, decision, proof=pb.proof
    )


def rescue_decision_to_pb(round_index: int, rescue: Rescue | None) -> oracle_pb2.VerifyResponse:
    """The decision after round ``round_index``'s verdict: the oracle's own block, or none."""
    tokens = list(rescue.block.token_ids) if rescue is not None else []
    return oracle_pb2.VerifyResponse(
        rescue=oracle_pb2.RescueDecision(round=round_index, token_ids=tokens)
    )


def rescue_block_from_pb(pb: oracle_pb2.RescueDecision) -> DraftBlock | None:
    """The block of a rescue decision; None: the oracle drafted none."""
    return DraftBlock(tuple(pb.token_ids)) if pb.token_ids else None


# ---- enums ------------------------------------------------------------------------------

K = TypeVar("K")


def _both_ways(to_pb: dict[K, Any]) -> tuple[dict[K, Any], dict[int, K]]:
    """A core enum's wire values, and the way back."""
    return to_pb, {int(v): k for k, v in to_pb.items()}


_FINISH_TO_PB, _FINISH_FROM_PB = _both_ways(
    {
        FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
        FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
        FinishReason.STOP_TOKEN: common_pb2.FINISH_REASON_STOP_TOKEN,
        FinishReason.STOP_STRING: common_pb2.FINISH_REASON_STOP_STRING,
        FinishReason.CONTEXT_LIMIT: common_pb2.FINISH_REASON_CONTEXT_LIMIT,
    }
)
_DRAFTER_TO_PB, _DRAFTER_FROM_PB = _both_ways(
    {
        DrafterKind.AUTO: common_pb2.DRAFTER_KIND_UNSPECIFIED,
        DrafterKind.MODEL: common_pb2.DRAFTER_KIND_MODEL,
        DrafterKind.NGRAM: common_pb2.DRAFTER_KIND_NGRAM,
        DrafterKind.NONE: common_pb2.DRAFTER_KIND_NONE,
    }
)
_WORKER_KIND_TO_PB, _WORKER_KIND_FROM_PB = _both_ways(
    {
        WorkerKind.DRAFT: gateway_pb2.WORKER_KIND_DRAFT,
        WorkerKind.ORACLE: gateway_pb2.WORKER_KIND_ORACLE,
    }
)
_STATUS_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}


def finish_reason_to_pb(reason: FinishReason | None) -> common_pb2.FinishReason:
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_TO_PB[reason]


def finish_reason_from_pb(value: int) -> FinishReason | None:
    return _FINISH_FROM_PB.get(value)


def drafter_to_pb(kind: DrafterKind) -> common_pb2.DrafterKind:
    return _DRAFTER_TO_PB[kind]


def drafter_from_pb(value: int, field: str = "speculation.drafter") -> DrafterKind:
    kind = _DRAFTER_FROM_PB.get(value)
    if kind is None:
        raise InvalidArgument(
            f"{field} must be one of {common_pb2.DrafterKind.keys()}, got {value}"
        )
    return kind


def status_code(name: str) -> int:
    """A grpc.StatusCode name -> its number on the wire (INTERNAL for no known name)."""
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)
    return int(code.value[0])


def status_name(value: int) -> str:
    """A status number from the wire -> its grpc.StatusCode name (UNKNOWN if none)."""
    return _STATUS_NAMES.get(value, "UNKNOWN")


# ---- chat ------------------------------------------------------------------------------


def messages_from_pb(messages: Sequence[gateway_pb2.ChatMessage]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m.role, m.content) for m in messages)


def messages_to_pb(messages: Sequence[ChatMessage]) -> list[gateway_pb2.ChatMessage]:
    return [gateway_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]


# ---- speculation --------------------------------------------------------------------------

# Core field -> SpeculationParams field, where the names differ.
_SPECULATION_PB_NAMES = {"k": "num_speculative_tokens"}


def _speculation_label(prefix: str) -> Any:
    return lambda name: f"{prefix}.{_SPECULATION_PB_NAMES.get(name, name)}"


def speculation_from_pb(pb: common_pb2.SpeculationParams) -> Speculation:
    """A request's SpeculationParams -> validated Speculation; unset fields stay None
    (the server's default). ``draft_ahead`` is the draft's own: no request field."""
    speculation = Speculation(
        k=pb.num_speculative_tokens if pb.HasField("num_speculative_tokens") else None,
        adaptive=pb.adaptive if pb.HasField("adaptive") else None,
        drafter=drafter_from_pb(pb.drafter),
        pipeline_depth=pb.pipeline_depth if pb.HasField("pipeline_depth") else None,
        branches=pb.branches if pb.HasField("branches") else None,
        rescue=pb.rescue if pb.HasField("rescue") else None,
    )
    speculation.validate(_speculation_label("speculation"))
    return speculation


def speculation_to_pb(speculation: Speculation) -> common_pb2.SpeculationParams:
    """Unvalidated: a client sends what it is given and the gateway judges it."""
    pb = common_pb2.SpeculationParams(drafter=drafter_to_pb(speculation.drafter))
    if speculation.adaptive is not None:
        pb.adaptive = speculation.adaptive
    if speculation.k is not None:
        pb.num_speculative_tokens = speculation.k
    if speculation.pipeline_depth is not None:
        pb.pipeline_depth = speculation.pipeline_depth
    if speculation.branches is not None:
        pb.branches = speculation.branches
    if speculation.rescue is not None:
        pb.rescue = speculation.rescue
    return pb


# ---- a turn's statistics and rounds -----------------------------------------------------

# TurnStats field -> GenerationStats field (every one; the rest of GenerationStats is
# derived from them or names the turn's workers).
_STATS_PB_NAMES = {
    "prompt_tokens": "prompt_tokens",
    "output_tokens": "output_tokens",
    "rounds": "rounds",
    "proposed": "proposed_tokens",
    "accepted": "accepted_tokens",
    "rejected_rounds": "rejected_rounds",
    "ahead_hits": "draft_ahead_hits",
    "pipelined_rounds": "pipelined_rounds",
    "branch_rounds": "branch_rounds",
    "rescued_rounds": "rescued_rounds",
    "oracle_alone_rounds": "oracle_alone_rounds",
    "skipped_blocks": "skipped_blocks",
    "cached_tokens": "cached_tokens",
    "prefilled_tokens": "prefilled_tokens",
    "prefill_ns": "prefill_ns",
    "draft_ns": "draft_ns",
    "verify_ns": "verify_ns",
    "network_ns": "network_ns",
    "queue_ns": "queue_ns",
    "total_ns": "total_ns",
    "time_to_first_token_ns": "time_to_first_token_ns",
    "accepted_per_position": "accepted_per_position",
    "proposed_per_position": "proposed_per_position",
}


def stats_fields(stats: TurnStats) -> dict[str, Any]:
    """The ``GenerationStats`` fields of ``stats``, by their API names (the computed ones
    too): what the gRPC and the HTTP API both report."""
    return {
        **{pb: getattr(stats, core) for core, pb in _STATS_PB_NAMES.items()},
        "acceptance_rate": stats.acceptance_rate,
        "mean_tokens_per_round": stats.mean_tokens_per_round,
        "mean_speculative_tokens": stats.proposed / stats.rounds if stats.rounds else 0.0,
    }


def stats_to_pb(
    stats: TurnStats,
    *,
    oracle_id: str = "",
    draft_id: str = "",
    drafter: DrafterKind = DrafterKind.AUTO,
    failovers: int = 0,
) -> common_pb2.GenerationStats:
    return common_pb2.GenerationStats(
        **stats_fields(stats),
        oracle_id=oracle_id,
        draft_id=draft_id,
        drafter=drafter_to_pb(drafter),
        failovers=failovers,
    )


def stats_from_pb(pb: common_pb2.GenerationStats) -> TurnStats:
    values = {core: getattr(pb, name) for core, name in _STATS_PB_NAMES.items()}
    for name in ("accepted_per_position", "proposed_per_position"):
        values[name] = list(values[name])
    return TurnStats(**values)


# RoundReport fields a commit carries as they are; k, committed, committed_length and
# wall_ns are not sent (see ``round_from_pb``).
_ROUND_FIELDS = (
    "round",
    "proposed",
    "accepted",
    "is_bonus",
    "draft_ns",
    "verify_ns",
    "network_ns",
    "queue_ns",
    "drafted_ahead",
    "pipelined",
    "skipped_blocks",
    "branch",
    "rescued",
)


def round_to_pb(report: RoundReport) -> registry_pb2.RoundReport:
    return registry_pb2.RoundReport(
        **{name: getattr(report, name) for name in _ROUND_FIELDS},
        logprobs=logprobs_to_pb(report.logprobs),
    )


def round_from_pb(
    pb: registry_pb2.RoundReport, base_length: int, token_ids: Sequence[int]
) -> RoundReport:
    """The round of a commit of ``token_ids`` after ``base_length`` tokens: k is taken as
    what was proposed, the tokens as committed, and the wall time is not known here."""
    return RoundReport(
        **{name: getattr(pb, name) for name in _ROUND_FIELDS},
        k=pb.proposed,
        committed=len(token_ids),
        committed_length=base_length + len(token_ids),
        logprobs=logprobs_from_pb(pb.logprobs),
    )


# ---- commit proofs ---------------------------------------------------------------------------


def ticket_to_pb(ticket: CommitTicket | None) -> common_pb2.CommitTicket | None:
    return (
        None
        if ticket is None
        else common_pb2.CommitTicket(key_id=ticket.key_id, nonce=ticket.nonce)
    )


def ticket_from_pb(pb: common_pb2.CommitTicket) -> CommitTicket | None:
    """None when unset (no key named): the oracle then proves nothing."""
    return CommitTicket(pb.key_id, pb.nonce) if pb.key_id else None


# ---- workers -------------------------------------------------------------------------------


def registration_to_pb(info: WorkerRegistration) -> registry_pb2.RegisterWorker:
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    fields["kind"] = _WORKER_KIND_TO_PB[info.kind]
    fields["eos_token_ids"] = list(info.eos_token_ids)
    fields["cached_session_ids"] = list(info.cached_session_ids)
    return registry_pb2.RegisterWorker(**fields)


def registration_from_pb(pb: registry_pb2.RegisterWorker) -> WorkerRegistration:
    kind = _WORKER_KIND_FROM_PB.get(pb.kind)
    if kind is None:
        raise InvalidArgument(f"RegisterWorker.kind must be DRAFT or ORACLE, got {pb.kind}")
    fields = {f.name: getattr(pb, f.name) for f in dataclasses.fields(WorkerRegistration)}
    fields["kind"] = kind
    fields["eos_token_ids"] = tuple(pb.eos_token_ids)
    fields["cached_session_ids"] = tuple(pb.cached_session_ids)
    return WorkerRegistration(**fields)


def worker_info_to_pb(
    info: WorkerRegistration, *, active_sessions: int, kv_cache_bytes: int, uptime_s: float
) -> gateway_pb2.WorkerInfo:
    """A registered worker as ListWorkers shows it."""
    return gateway_pb2.WorkerInfo(
        worker_id=info.worker_id,
        kind=_WORKER_KIND_TO_PB[info.kind],
        model=info.model,
        vocab_fingerprint=info.vocab_fingerprint,
        address=info.address,
        active_sessions=active_sessions,
        max_sessions=info.max_sessions,
        device=info.device,
        kv_cache_bytes=kv_cache_bytes,
        uptime_s=uptime_s,
    )


def assignment_to_pb(job: Assignment) -> registry_pb2.Assignment:
    """Of the speculation only what a draft takes from a request: k, adaptive and the
    draft settings (unset: the draft's own); the drafter is the draft's model."""
    s = job.speculation
    pb = registry_pb2.Assignment(
        assignment_id=job.assignment_id,
        session_id=job.session_id,
        oracle_id=job.oracle_id,
        oracle_address=job.oracle_address,
        token_ids=list(job.token_ids),
        prompt_tokens=job.prompt_tokens,
        sampling=sampling_to_pb(job.params),
        seed=job.seed,
        num_speculative_tokens=s.k or 0,
        adaptive=bool(s.adaptive),
        grant=job.grant,
        trace_context=dict(job.trace_context),
        max_context=job.max_context,
        pipeline_depth=s.pipeline_depth or 0,  # 0: the draft's default
        commit=ticket_to_pb(job.commit),
    )
    if s.branches is not None:
        pb.branches = s.branches
    if s.rescue is not None:
        pb.rescue = s.rescue
    return pb


def assignment_from_pb(pb: registry_pb2.Assignment) -> Assignment:
    speculation = Speculation(
        k=pb.num_speculative_tokens,
        adaptive=pb.adaptive,
        drafter=DrafterKind.MODEL,
        pipeline_depth=pb.pipeline_depth or None,
        branches=pb.branches if pb.HasField("branches") else None,
        rescue=pb.rescue if pb.HasField("rescue") else None,
    )
    speculation.validate(_speculation_label("assignment"))
    return Assignment(
        assignment_id=pb.assignment_id,
        session_id=pb.session_id,
        oracle_id=pb.oracle_id,
        oracle_address=pb.oracle_address,
        token_ids=tuple(pb.token_ids),
        prompt_tokens=pb.prompt_tokens,
        params=sampling_from_pb(pb.sampling),
        seed=pb.seed,
        speculation=speculation,
        grant=pb.grant,
        trace_context=dict(pb.trace_context),
        max_context=pb.max_context,
        commit=ticket_from_pb(pb.commit),
    )


# ---- the Connect stream: worker -> gateway ----------------------------------------------


def worker_message_to_pb(message: WorkerMessage) -> registry_pb2.ConnectRequest:
    if isinstance(message, WorkerRegistration):
        return registry_pb2.ConnectRequest(register=registration_to_pb(message))
    if isinstance(message, WorkerLoad):
        load = registry_pb2.WorkerLoad(
            active_sessions=message.active_sessions, kv_cache_bytes=message.kv_cache_bytes
        )
        return registry_pb2.ConnectRequest(load=load)
    if isinstance(message, AssignmentOpened):
        o = message.opened
        opened = registry_pb2.AssignmentOpened(
            assignment_id=message.assignment_id,
            cached_tokens=o.cached_tokens,
            prefilled_tokens=o.computed_tokens,
            prefill_ns=o.prefill_ns,
            oracle_id=o.oracle_id,
        )
        return registry_pb2.ConnectRequest(opened=opened)
    if isinstance(message, AssignmentCommitted):
        commit = registry_pb2.AssignmentCommit(
            assignment_id=message.assignment_id,
            base_length=message.base_length,
            token_ids=list(message.token_ids),
            round=round_to_pb(message.report),
            proof=message.proof,
        )
        return registry_pb2.ConnectRequest(commit=commit)
    if isinstance(message, AssignmentFinished):
        finished = registry_pb2.AssignmentFinished(
            assignment_id=message.assignment_id,
            finish_reason=finish_reason_to_pb(message.reason),
            stats=stats_to_pb(
                message.stats,
                oracle_id=message.oracle_id,
                draft_id=message.draft_id,
                drafter=DrafterKind.MODEL,
            ),
        )
        return registry_pb2.ConnectRequest(finished=finished)
    failed = registry_pb2.AssignmentFailed(
        assignment_id=message.assignment_id,
        status_code=status_code(message.status),
        message=message.message,
    )
    return registry_pb2.ConnectRequest(failed=failed)


def worker_message_from_pb(pb: registry_pb2.ConnectRequest) -> WorkerMessage | None:
    """None for an empty message. Reports are taken as sent (the gateway checks each
    commit against the session); only a registration is validated."""
    kind = pb.WhichOneof("kind")
    if kind == "register":
        return registration_from_pb(pb.register)
    if kind == "load":
        return WorkerLoad(pb.load.active_sessions, pb.load.kv_cache_bytes)
    if kind == "opened":
        o = pb.opened
        opened = OpenResult(o.cached_tokens, o.prefilled_tokens, o.prefill_ns, o.oracle_id)
        return AssignmentOpened(o.assignment_id, opened)
    if kind == "commit":
        c = pb.commit
        tokens = tuple(c.token_ids)
        report = round_from_pb(c.round, c.base_length, tokens)
        return AssignmentCommitted(c.assignment_id, c.base_length, tokens, report, c.proof)
    if kind == "finished":
        f = pb.finished
        return AssignmentFinished(
            f.assignment_id,
            finish_reason_from_pb(f.finish_reason),
            stats_from_pb(f.stats),
            oracle_id=f.stats.oracle_id,
            draft_id=f.stats.draft_id,
        )
    if kind == "failed":
        failed = pb.failed
        return AssignmentFailed(
            failed.assignment_id, status_name(failed.status_code), failed.message
        )
    return None


# ---- the Connect stream: gateway -> worker ----------------------------------------------


def gateway_message_to_pb(message: GatewayMessage) -> registry_pb2.ConnectResponse:
    if isinstance(message, Registered):
        registered = registry_pb2.Registered(load_interval_ms=message.load_interval_ms)
        if message.commit_key is not None:
            key = message.commit_key
            registered.commit_key.CopyFrom(
                registry_pb2.CommitKey(key_id=key.key_id, secret=key.secret)
            )
        return registry_pb2.ConnectResponse(registered=registered)
    if isinstance(message, Assignment):
        return registry_pb2.ConnectResponse(assignment=assignment_to_pb(message))
    if isinstance(message, CancelAssignment):
        cancel = registry_pb2.CancelAssignment(
            assignment_id=message.assignment_id, reason=message.reason
        )
        return registry_pb2.ConnectResponse(cancel=cancel)
    if isinstance(message, ReleaseSessions):
        release_sessions = registry_pb2.ReleaseSessions(session_ids=list(message.session_ids))
        return registry_pb2.ConnectResponse(release_sessions=release_sessions)
    release = registry_pb2.ReleaseDraftSession(session_id=message.session_id)
    return registry_pb2.ConnectResponse(release=release)


def wire_size(message: GatewayMessage) -> int:
    """Bytes ``message`` takes on a worker's Connect stream (what its size limit counts)."""
    return int(gateway_message_to_pb(message).ByteSize())


def gateway_message_from_pb(pb: registry_pb2.ConnectResponse) -> GatewayMessage | None:
    """None for an empty message; an assignment is validated (``InvalidArgument``)."""
    kind = pb.WhichOneof("kind")
    if kind == "registered":
        key = pb.registered.commit_key
        commit_key = CommitKey(key.key_id, key.secret) if key.key_id else None
        return Registered(pb.registered.load_interval_ms, commit_key)
    if kind == "assignment":
        return assignment_from_pb(pb.assignment)
    if kind == "cancel":
        return CancelAssignment(pb.cancel.assignment_id, pb.cancel.reason)
    if kind == "release":
        return ReleaseDraftSession(pb.release.session_id)
    if kind == "release_sessions":
        return ReleaseSessions(tuple(pb.release_sessions.session_ids))
    return None
