"""What the gateway and its workers tell each other, as core types (no protobuf).

A worker (draft or oracle) keeps one ``WorkerRegistry.Connect`` stream open to the
gateway. Up it go a ``WorkerRegistration``, ``WorkerLoad`` reports and, from drafts,
``AssignmentReport``s about the turns they run; down it come ``Registered``, an
``Assignment`` (a turn for a draft to run), ``CancelAssignment``,
``ReleaseDraftSession`` and ``ReleaseSessions``. ``specdec.rpc.convert`` turns each
into its protobuf message and back at the stream's edge; everything between works on
these.

A leaf module like ``specdec.core.types``: no models, gRPC, protobuf or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from specdec.core.types import OpenResult, RoundReport, Speculation, TurnStats

if TYPE_CHECKING:  # annotations only: these modules' imports load torch
    from specdec.core.sampling import SamplingParams
    from specdec.core.stopping import FinishReason


class WorkerKind(str, Enum):
    """The role a worker plays."""

    DRAFT = "draft"
    ORACLE = "oracle"


@dataclass(frozen=True)
class WorkerRegistration:
    """A worker's first message: who it is and what it serves."""

    worker_id: str
    kind: WorkerKind
    model: str = ""
    vocab_fingerprint: str = ""  # hash of the tokenizer's vocabulary and special tokens
    address: str = ""  # oracles: where the gateway (and, by default, drafts) dial it
    public_address: str = ""  # oracles: where drafts dial it, when not ``address``
    max_sessions: int = 0  # most sessions it serves at once (0 = no limit)
    device: str = ""
    vocab_size: int = 0
    max_context: int = 0
    eos_token_ids: tuple[int, ...] = ()
    # Sessions whose KV cache it holds: the gateway releases those it does not know.
    cached_session_ids: tuple[str, ...] = ()

    @property
    def draft_address(self) -> str:
        """Where a draft dials this oracle."""
        return self.public_address or self.address


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's periodic report of how busy it is."""

    active_sessions: int = 0
    kv_cache_bytes: int = 0


@dataclass(frozen=True)
class CommitKey:
    """A secret the gateway shares with one oracle registration, to prove commits
    (``specdec.rpc.commit_proof``); only that oracle is ever sent it."""

    key_id: str
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class CommitTicket:
    """What the oracle of one attempt of a turn signs its commits with: which key, and
    a nonce the gateway chose for this attempt."""

    key_id: str
    nonce: bytes


@dataclass(frozen=True)
class Assignment:
    """One turn of one session, for a worker to run against an oracle.

    The gateway sends it to a draft, or runs it itself (the oracle alone, n-gram).
    ``speculation``: the request's settings; those left None are the runner's own.
    ``max_context``: the oracle model's context window (0 = the runner's model's).
    """

    assignment_id: str
    session_id: str
    oracle_id: str
    oracle_address: str
    token_ids: tuple[int, ...]  # every committed token of the session, this prompt included
    prompt_tokens: int  # of which this turn's prompt (the tail)
    params: SamplingParams
    seed: int
    speculation: Speculation
    grant: str = ""  # presented to the oracle (docs/security.md)
    trace_context: Mapping[str, str] = field(default_factory=dict)  # W3C, of the request
    max_context: int = 0
    commit: CommitTicket | None = None  # passed on to the oracle: it proves each commit


@dataclass(frozen=True)
class AssignmentOpened:
    """The oracle holds the session's context (reported before the first commit)."""

    assignment_id: str
    opened: OpenResult


@dataclass(frozen=True)
class AssignmentCommitted:
    """Tokens the oracle committed in one round, after ``base_length`` tokens: its whole
    verdict, also the tokens after a stop condition (the gateway cuts there itself), and
    the oracle's ``proof`` of it (``specdec.rpc.commit_proof``)."""

    assignment_id: str
    base_length: int
    token_ids: tuple[int, ...]
    report: RoundReport
    proof: bytes = b""


@dataclass(frozen=True)
class AssignmentFinished:
    """The turn is over; ``reason`` None: the worker did not say why."""

    assignment_id: str
    reason: FinishReason | None
    stats: TurnStats = field(default_factory=TurnStats)
    oracle_id: str = ""
    draft_id: str = ""


@dataclass(frozen=True)
class AssignmentFailed:
    """The turn could not go on; ``status`` names a grpc.StatusCode (as ``SpecdecError``)."""

    assignment_id: str
    status: str
    message: str


AssignmentReport = AssignmentOpened | AssignmentCommitted | AssignmentFinished | AssignmentFailed
WorkerMessage = WorkerRegistration | WorkerLoad | AssignmentReport


@dataclass(frozen=True)
class Registered:
    """The gateway took the registration; load reports are due every ``load_interval_ms``.
    An oracle gets the key it proves its commits with (a draft never does)."""

    load_interval_ms: int
    commit_key: CommitKey | None = None


@dataclass(frozen=True)
class CancelAssignment:
    assignment_id: str
    reason: str = ""


@dataclass(frozen=True)
class ReleaseDraftSession:
    """Forget this session's draft KV cache."""

    session_id: str


@dataclass(frozen=True)
class ReleaseSessions:
    """Forget the KV caches of these sessions (drafts and oracles): no gateway knows them."""

    session_ids: tuple[str, ...]


GatewayMessage = Registered | Assignment | CancelAssignment | ReleaseDraftSession | ReleaseSessions
