"""Protobuf <-> core conversions (``specdec.rpc.convert``): every field survives the trip.

Each round trip starts from a core value whose every field differs from its default
(``distinct`` fills them in from the field's type), so a field added to a core type
and forgotten by its conversion fails here. Fields that deliberately do not travel
are listed, each with its reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import types
import typing
from typing import Any

import pytest

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
    Registered,
    ReleaseDraftSession,
    ReleaseSessions,
    WorkerKind,
    WorkerLoad,
    WorkerRegistration,
)
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason
from specdec.core.types import (
    DraftBlock,
    DrafterKind,
    OpenResult,
    Rescue,
    RoundReport,
    Speculation,
    TurnStats,
    Verdict,
    VerifyResult,
)
from specdec.rpc import convert
from specdec.v1 import common_pb2, gateway_pb2, registry_pb2

_counter = itertools.count(3)


def _value(hint: Any, default: Any) -> Any:
    """A value of type ``hint`` that is not ``default`` and not one used before."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _value(next(a for a in typing.get_args(hint) if a is not type(None)), default)
    if hint is bool:
        return not default if isinstance(default, bool) else True
    if hint is int:
        return next(_counter)
    if hint is float:
        return next(_counter) + 0.5
    if hint is str:
        return f"s{next(_counter)}"
    if hint is bytes:
        return b"b%d" % next(_counter)
    if origin is list:
        return [next(_counter), next(_counter)]
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item):  # e.g. tuple[TokenLogprob, ...]
            return (distinct(item), distinct(item))  # type: ignore[arg-type]
        return (_value(item, None), _value(item, None))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return next(member for member in hint if member != default)
    raise TypeError(f"give a value for fields of type {hint}")


def distinct(cls: type, **given: Any) -> Any:
    """An instance of dataclass ``cls`` with every field not ``given`` set to a value of
    its type that differs from its default."""
    hints = typing.get_type_hints(cls, localns={"SamplingParams": SamplingParams})
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        values[f.name] = _value(hints[f.name], None if default is dataclasses.MISSING else default)
    return cls(**values)


def test_distinct_sets_every_field_off_its_default() -> None:
    stats = distinct(TurnStats)
    assert all(
        getattr(stats, f.name) != getattr(TurnStats(), f.name) for f in dataclasses.fields(stats)
    )


# -- speculation ------------------------------------------------------------------------------

SPECULATION_FIELDS = {f.name for f in dataclasses.fields(Speculation)}
# Speculation fields a request cannot carry: the draft's own setting.
NOT_IN_A_REQUEST = {"draft_ahead"}


def test_speculation_round_trip() -> None:
    speculation = distinct(Speculation, k=5, pipeline_depth=3, branches=6, draft_ahead=None)
    for name in SPECULATION_FIELDS - NOT_IN_A_REQUEST:
        assert getattr(speculation, name) not in (None, getattr(Speculation(), name)), name
    assert convert.speculation_from_pb(convert.speculation_to_pb(speculation)) == speculation


def test_unset_speculation_stays_unset() -> None:
    pb = convert.speculation_to_pb(Speculation())
    assert not any(pb.HasField(f) for f in ("num_speculative_tokens", "pipeline_depth"))
    assert not any(pb.HasField(f) for f in ("branches", "rescue"))
    assert convert.speculation_from_pb(pb) == Speculation()
    assert convert.speculation_from_pb(common_pb2.SpeculationParams()) == Speculation()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"num_speculative_tokens": 33},
            r"speculation.num_speculative_tokens must be in \[0, 32\]",
        ),
        ({"num_speculative_tokens": -1}, r"speculation.num_speculative_tokens must be in"),
        ({"pipeline_depth": 0}, r"speculation.pipeline_depth must be in \[1, 4\], got 0"),
        ({"pipeline_depth": 5}, r"speculation.pipeline_depth must be in \[1, 4\], got 5"),
        ({"branches": 9}, r"speculation.branches must be in \[0, 8\], got 9"),
        ({"drafter": 7}, r"speculation.drafter must be one of .*DRAFTER_KIND_NGRAM.*got 7"),
    ],
)
def test_a_request_out_of_range_is_refused_naming_its_field(
    fields: dict[str, int], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        convert.speculation_from_pb(common_pb2.SpeculationParams(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(DrafterKind))
def test_every_drafter_kind_has_a_wire_value(kind: DrafterKind) -> None:
    assert convert.drafter_from_pb(convert.drafter_to_pb(kind)) is kind


# -- a turn's statistics and rounds ----------------------------------------------------------


def test_stats_round_trip() -> None:
    stats = distinct(TurnStats)
    pb = convert.stats_to_pb(stats, oracle_id="o", draft_id="d", drafter=DrafterKind.NGRAM)
    assert convert.stats_from_pb(pb) == stats
    assert (pb.oracle_id, pb.draft_id, pb.drafter) == ("o", "d", common_pb2.DRAFTER_KIND_NGRAM)
    assert pb.acceptance_rate == pytest.approx(stats.acceptance_rate)
    assert pb.mean_speculative_tokens == pytest.approx(stats.proposed / stats.rounds)


# RoundReport fields a commit does not carry: the gateway derives them from the commit.
DERIVED_ROUND_FIELDS = {"k", "committed", "committed_length", "wall_ns"}
# ... and those it carries outside its RoundReport: the proof as AssignmentCommit.proof,
# the tokens after a stop among its token_ids.
RELAYED_ROUND_FIELDS = {"proof", "cut"}


def test_a_commit_round_trips_with_its_round() -> None:
    tokens = (11, 12)
    report = distinct(
        RoundReport,
        committed=len(tokens),
        committed_length=40 + len(tokens),
        wall_ns=0,
        proof=b"",
        cut=(),
    )
    report = dataclasses.replace(report, k=report.proposed)
    commit = AssignmentCommitted("a1", 40, tokens, report, proof=b"the oracle's")
    back = convert.worker_message_from_pb(convert.worker_message_to_pb(commit))
    assert back == commit
    assert len(back.report.logprobs) == len(tokens) and back.report.logprobs[0].top_token_ids
    sent = {f.name for f in registry_pb2.RoundReport.DESCRIPTOR.fields}
    assert {f.name for f in dataclasses.fields(RoundReport)} == (
        sent | DERIVED_ROUND_FIELDS | RELAYED_ROUND_FIELDS
    )


# -- workers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(WorkerKind))
def test_registration_round_trip(kind: WorkerKind) -> None:
    registration = distinct(WorkerRegistration, kind=kind)
    back = convert.worker_message_from_pb(convert.worker_message_to_pb(registration))
    assert back == registration


def test_a_registration_of_no_known_kind_is_refused() -> None:
    pb = registry_pb2.RegisterWorker(worker_id="w", kind=gateway_pb2.WORKER_KIND_UNSPECIFIED)
    with pytest.raises(InvalidArgument, match=r"RegisterWorker\.kind must be DRAFT or ORACLE"):
        convert.registration_from_pb(pb)


def test_worker_info_shows_the_registration_and_the_load() -> None:
    registration = distinct(WorkerRegistration, kind=WorkerKind.ORACLE)
    pb = convert.worker_info_to_pb(
        registration, active_sessions=3, kv_cache_bytes=1 << 40, uptime_s=2.5
    )
    assert pb.kind == gateway_pb2.WORKER_KIND_ORACLE
    assert (pb.worker_id, pb.model, pb.address) == (
        registration.worker_id, registration.model, registration.address,
    )  # fmt: skip
    assert (pb.active_sessions, pb.kv_cache_bytes, pb.uptime_s) == (3, 1 << 40, 2.5)


def _assignment(**speculation: Any) -> Assignment:
    # Floats a float32 field holds exactly.
    params = SamplingParams(
        temperature=0.75, top_k=5, top_p=0.875, seed=77, max_new_tokens=9,
        stop_token_ids=(2, 4), stop=("\n\n",), logprobs=3,
    )  # fmt: skip
    return distinct(
        Assignment,
        params=params,
        speculation=Speculation(drafter=DrafterKind.MODEL, **speculation),
        trace_context={"traceparent": "00-abc-def-01"},
        commit=CommitTicket("k1", b"nonce"),
    )


# Speculation fields an assignment does not carry: a draft always drafts with its
# model, and draft_ahead is its own setting.
NOT_IN_AN_ASSIGNMENT = {"drafter", "draft_ahead"}


def test_assignment_round_trip() -> None:
    job = _assignment(k=6, adaptive=True, pipeline_depth=3, branches=5, rescue=False)
    for name in SPECULATION_FIELDS - NOT_IN_AN_ASSIGNMENT:
        assert getattr(job.speculation, name) not in (None, getattr(Speculation(), name)), name
    assert convert.gateway_message_from_pb(convert.gateway_message_to_pb(job)) == job


def test_an_assignment_leaves_the_drafts_settings_unset() -> None:
    # k and adaptive are the gateway's to resolve: an assignment carries them set.
    job = _assignment(k=4, adaptive=False)
    back = convert.assignment_from_pb(convert.assignment_to_pb(job))
    assert back.speculation == Speculation(k=4, adaptive=False, drafter=DrafterKind.MODEL)


def test_adaptive_left_unset_in_a_request_stays_unset() -> None:
    for adaptive in (None, False, True):
        pb = convert.speculation_to_pb(Speculation(adaptive=adaptive))
        assert pb.HasField("adaptive") == (adaptive is not None)
        assert convert.speculation_from_pb(pb).adaptive is adaptive


def test_an_assignment_out_of_range_is_refused() -> None:
    pb = convert.assignment_to_pb(_assignment(k=4))
    pb.branches = 99
    with pytest.raises(InvalidArgument, match=r"assignment.branches must be in \[0, 8\]"):
        convert.assignment_from_pb(pb)


@pytest.mark.parametrize(
    "report",
    [
        AssignmentOpened("a1", OpenResult(5, 7, 123, "o1")),
        AssignmentFinished("a1", FinishReason.STOP_STRING, distinct(TurnStats), "o1", "d1"),
        AssignmentFinished("a1", None),
        AssignmentFailed("a1", "RESOURCE_EXHAUSTED", "full"),
        WorkerLoad(3, 1 << 33),
    ],
    ids=lambda r: type(r).__name__,
)
def test_worker_messages_round_trip(report: Any) -> None:
    assert convert.worker_message_from_pb(convert.worker_message_to_pb(report)) == report


@pytest.mark.parametrize("reason", [*FinishReason, None])
def test_every_finish_reason_has_a_wire_value(reason: FinishReason | None) -> None:
    assert convert.finish_reason_from_pb(convert.finish_reason_to_pb(reason)) is reason


def test_a_failure_with_a_status_unknown_here_reads_as_unknown() -> None:
    pb = registry_pb2.ConnectRequest(
        failed=registry_pb2.AssignmentFailed(assignment_id="a", status_code=999, message="?")
    )
    assert convert.worker_message_from_pb(pb) == AssignmentFailed("a", "UNKNOWN", "?")
    assert convert.worker_message_from_pb(registry_pb2.ConnectRequest()) is None


@pytest.mark.parametrize(
    "message",
    [
        Registered(250),
        Registered(250, CommitKey("k1", b"secret")),
        CancelAssignment("a1", "done"),
        ReleaseDraftSession("s1"),
        ReleaseSessions(("s1", "s2")),
    ],
    ids=lambda m: type(m).__name__,
)
def test_gateway_messages_round_trip(message: Any) -> None:
    assert convert.gateway_message_from_pb(convert.gateway_message_to_pb(message)) == message


# -- the Verify stream's answers ---------------------------------------------------------------


def test_opened_round_trip() -> None:
    opened = distinct(OpenResult)
    pb = convert.opened_to_pb(opened, committed_length=17).opened
    assert convert.opened_from_pb(pb) == opened
    assert pb.committed_length == 17


async def test_verdict_round_trip_with_its_pending_rescue_decision() -> None:
    decision: asyncio.Future[Rescue | None] = asyncio.get_running_loop().create_future()
    result = distinct(VerifyResult, verdict=distinct(Verdict), decision=decision)
    pb = convert.verdict_to_pb(9, result, rescued=True).verdict
    assert (pb.round, pb.rescue_pending, pb.rescued) == (9, True, True)
    assert result.verdict is not None and result.verdict.logprobs  # they travel too
    assert convert.verify_result_from_pb(pb, decision) == result
    settled = dataclasses.replace(result, decision=None)
    assert not convert.verdict_to_pb(9, settled).verdict.rescue_pending


def test_a_skipped_block_round_trips_as_skipped() -> None:
    result = VerifyResult(None, committed_length=30, verify_ns=0, queue_ns=55)
    pb = convert.verdict_to_pb(4, result).verdict
    assert pb.skipped
    assert convert.verify_result_from_pb(pb) == result


async def test_rescue_decision_round_trip() -> None:
    follow: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
    block = DraftBlock((5, 6, 7))
    pb = convert.rescue_decision_to_pb(3, Rescue(block, follow)).rescue
    assert pb.round == 3
    assert convert.rescue_block_from_pb(pb) == block
    assert convert.rescue_block_from_pb(convert.rescue_decision_to_pb(3, None).rescue) is None
