"""The core's types: what a round sends, what the oracle answers, what a turn reports.

A leaf module: it imports nothing of models, gRPC, protobuf or torch at run time, so
the gateway, the converters, telemetry, the policies and the service configs can use
these types without loading the engine. Terms (accepted, rescued, bonus) are defined in
``specdec.core.verifier``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from specdec.core.errors import InvalidArgument

if TYPE_CHECKING:  # annotations only: importing these types' modules would load torch
    from specdec.core.sampling import SamplingParams, SparseDist
    from specdec.core.stopping import StopChecker

MAX_SPECULATIVE_TOKENS = 32


@dataclass(frozen=True)
class DraftBlock:
    """k proposed tokens, and the draft distributions they were sampled from.

    token_ids: the k proposed ids (k may be 0: a plain decode step).
    q: one SparseDist per proposed token, or None for token-only mode (each
       draft token treated as a point mass; lossless for any proposer).
    """

    token_ids: tuple[int, ...]
    q: tuple[SparseDist, ...] | None = None
    # Greedy drafters may add, per proposed token, their next choices there: what the
    # correction most likely is if that token is rejected. Drafting only; never sent.
    runner_ups: tuple[RunnerUps, ...] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.token_ids)

    def truncated(self, k: int) -> DraftBlock:
        """The first k proposed tokens, with what belongs to them."""
        if len(self) <= k:
            return self
        return DraftBlock(
            self.token_ids[:k],
            None if self.q is None else self.q[:k],
            None if self.runner_ups is None else self.runner_ups[:k],
        )

    def after_first(self) -> DraftBlock:
        """The proposal without its first token (whatever follows a guessed token)."""
        return DraftBlock(
            self.token_ids[1:],
            None if self.q is None else self.q[1:],
            None if self.runner_ups is None else self.runner_ups[1:],
        )


@dataclass(frozen=True)
class RunnerUps:
    """A greedy draft's choices behind the token it proposed, at one position of its block.

    token_ids: the next likeliest ids there, likeliest first (the runner-up, the third...);
    probs: the draft's probability of each; p_chosen: that of the token it proposed.
    """

    p_chosen: float
    token_ids: tuple[int, ...]
    probs: tuple[float, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A committed token's log-probability under the oracle, and the likeliest tokens at
    its position with theirs, likeliest first (``SamplingParams.logprobs`` says how many
    and defines the distribution)."""

    logprob: float
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """num_accepted draft tokens are kept, then exactly one more token follows.

    next_token: the recovered (correction) token after a rejection, or the
    bonus token when all k were accepted (is_bonus=True).
    logprobs: when the turn asks for them, one per committed token (the accepted ones,
    then next_token), from the logits this verdict was judged on.
    """

    num_accepted: int
    next_token: int
    is_bonus: bool
    logprobs: tuple[TokenLogprob, ...] | None = None


def committed_tokens(block: DraftBlock, verdict: Verdict) -> list[int]:
    """The tokens a round commits: the accepted prefix of the block, then next_token."""
    return [*block.token_ids[: verdict.num_accepted], verdict.next_token]


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, as a chat template renders it."""

    role: str  # "system", "user", "assistant" (whatever the template knows)
    content: str


# Blocks in flight to an oracle at once (a draft setting and a request field);
# deeper guesses are rarely all right.
MAX_PIPELINE_DEPTH = 4


# Likely corrections drafted ahead per block in flight (a draft setting and a request
# field); beyond a few, each adds less than it costs to draft and send.
MAX_BRANCHES = 8


class DrafterKind(str, Enum):
    """Which proposer drafts a turn's tokens."""

    AUTO = "auto"  # a draft model when one is registered, else the oracle alone
    MODEL = "model"  # a draft model in a draft service
    NGRAM = "ngram"  # prompt-lookup n-grams, run by the gateway
    NONE = "none"  # no proposals: the oracle alone, one token per round


class BranchTicket:
    """What the loop and the thread drafting its branches share (plain attributes: each is
    written by one side only, in one assignment).

    outcomes: each branch's ``assumed`` tokens, in branch order, set by ``choose`` (which
    then calls ``on_chosen``, from the drafting thread) before any row is drafted.
    cancelled: set by the loop when no branch can be used: drafting stops at the next step.
    """

    def __init__(self, on_chosen: Callable[[], None] | None = None) -> None:
        self.outcomes: tuple[tuple[int, ...], ...] | None = None
        self.cancelled = False
        self._on_chosen = on_chosen

    def choose(self, outcomes: tuple[tuple[int, ...], ...]) -> None:
        self.outcomes = outcomes
        if self._on_chosen is not None:
            self._on_chosen()


@dataclass(frozen=True)
class Branch:
    """A block drafted for one outcome of verifying the block in flight.

    assumed: the tokens that outcome commits after the context the block in flight
    extends (its accepted prefix, then the correction or the guessed bonus).
    block: the next block, drafted after them.
    """

    assumed: tuple[int, ...]
    block: DraftBlock


@dataclass(frozen=True)
class OpenResult:
    """The oracle's answer to opening a turn: how much of the context it had cached."""

    cached_tokens: int
    computed_tokens: int
    prefill_ns: int
    oracle_id: str = ""


@dataclass(frozen=True)
class VerifyResult:
    """A verdict and what it cost at the oracle; ``verdict`` None: the block was skipped.

    Only a pipelined block (one sent with assumed tokens) can be skipped: its
    assumption about the verdict before it did not hold, so it was not verified.
    ``decision`` (rescue, see ``Rescue``): set when no block extends the verdict
    yet; it gets the oracle's own block for what follows, or None.
    """

    verdict: Verdict | None
    committed_length: int
    verify_ns: int
    queue_ns: int = 0
    decision: asyncio.Future[Rescue | None] | None = None
    proof: bytes = b""  # the oracle's proof of the commit (``specdec.rpc.commit_proof``)


@dataclass(frozen=True)
class Rescue:
    """A block the oracle drafted itself after a verdict that no block sent extended.

    A miss (no block drafted ahead fits the verdict) would otherwise leave the oracle
    idle for a round trip plus a fresh draft. With a rescue draft (a copy of a
    small draft model) the oracle drafts ``block`` after the verdict and verifies it
    next; ``result`` gets that verdict. The verdict itself goes out at once, marked
    as awaiting this decision, so the draft keeps drafting ahead meanwhile; told of
    ``block``, it drafts ahead after it as after a block of its own. Lossless like
    any block: the oracle verifies it.
    """

    block: DraftBlock
    result: asyncio.Future[VerifyResult]


@dataclass(frozen=True)
class RoundReport:
    """One verified round."""

    round: int
    k: int  # tokens asked of the drafter
    proposed: int  # tokens it actually proposed
    accepted: int
    is_bonus: bool
    committed: int  # tokens this round added to the output (after stop truncation)
    committed_length: int  # sequence length after the round
    draft_ns: int
    verify_ns: int
    network_ns: int
    queue_ns: int
    drafted_ahead: bool = False  # the block was drafted during the previous verification
    pipelined: bool = False  # ... and sent before that verification's verdict came back
    branch: bool = False  # ... for a guessed correction of that block, not its full acceptance
    skipped_blocks: int = 0  # blocks sent ahead that this round's verdict made stale
    wall_ns: int = 0  # since the previous verdict (the first round: since the open)
    rescued: bool = False  # the oracle drafted the block itself (a ``Rescue``)
    # The verdict's logprobs (one per committed token, then one per ``cut`` token), when
    # the turn asks for them.
    logprobs: tuple[TokenLogprob, ...] = ()
    # The oracle's proof of the verdict (empty: none), and the verdict's tokens after a
    # stop condition, which the proof covers too: a draft relays both to the gateway.
    proof: bytes = field(default=b"", repr=False)
    cut: tuple[int, ...] = ()

    @property
    def block_origin(self) -> str:
        """How the block was drafted: alone (nothing was: the oracle alone's step), fresh
        (after the previous verdict), ahead (during its verification), piped (and sent
        before it), branch (for a guessed correction), branch+piped, rescue (by the
        oracle, after a verdict no block extended)."""
        if self.rescued:
            return "rescue"
        if not self.proposed:
            return "alone"
        if self.branch:
            return "branch+piped" if self.pipelined else "branch"
        if self.pipelined:
            return "piped"
        return "ahead" if self.drafted_ahead else "fresh"


@dataclass
class TurnStats:
    """Totals of one turn; ``add`` folds in a round."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    rejected_rounds: int = 0  # rounds that rejected a drafted token
    ahead_hits: int = 0  # rounds whose block was drafted during the previous verification
    pipelined_rounds: int = 0  # ... and sent before the previous verdict came back
    branch_rounds: int = 0  # ... drafted for a guessed correction, not a full acceptance
    rescued_rounds: int = 0  # rounds whose block the oracle drafted (``Rescue``)
    oracle_alone_rounds: int = 0  # rounds without speculation: no token drafted (k = 0)
    skipped_blocks: int = 0  # blocks sent ahead of a verdict that proved them stale
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    prefill_ns: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    network_ns: int = 0
    queue_ns: int = 0  # waiting at the oracle for its model thread
    total_ns: int = 0
    time_to_first_token_ns: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)

    def add(self, report: RoundReport) -> None:
        self.rounds += 1
        self.proposed += report.proposed
        self.accepted += report.accepted
        self.rejected_rounds += int(report.accepted < report.proposed)
        self.ahead_hits += int(report.drafted_ahead)
        self.pipelined_rounds += int(report.pipelined)
        self.branch_rounds += int(report.branch)
        self.rescued_rounds += int(report.rescued)
        self.oracle_alone_rounds += int(report.proposed == 0)
        self.skipped_blocks += report.skipped_blocks
        self.output_tokens += report.committed
        self.draft_ns += report.draft_ns
        self.verify_ns += report.verify_ns
        self.network_ns += report.network_ns
        self.queue_ns += report.queue_ns
        grow = report.proposed - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(report.proposed):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += int(i < report.accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@dataclass
class Turn:
    """Everything one turn needs besides the link and the proposer."""

    context: list[int]  # committed tokens, this turn's prompt included (not mutated)
    prompt_tokens: int
    params: SamplingParams
    seed: int
    k: int
    stop: StopChecker
    max_context: int
    # Draft the next block while this one is being verified (PEARL's post-verify,
    # SpecEdge's proactive drafting): the next block is drafted on the assumption that
    # the whole block is accepted, with one more token as the guess of the bonus; it is
    # used only when that assumption and guess turn out true, so the output is unchanged.
    draft_ahead: bool = False
    # Blocks in flight at once (needs draft_ahead): 2 sends the block drafted ahead
    # before the verdict it depends on, hiding the round trip when the guess is right.
    pipeline_depth: int = 1
    # Greedy, or sampled with coupled blocks (needs draft_ahead): besides the full
    # acceptance, draft ahead for this many likely corrections of each block in flight
    # (specdec.drafters.branches), so that a rejection, too, finds its next block
    # drafted (and, pipelined, sent).
    branches: int = 0


# The range of each numeric speculation setting: (lowest, highest).
SPECULATION_RANGES: dict[str, tuple[int, int]] = {
    "k": (0, MAX_SPECULATIVE_TOKENS),
    "pipeline_depth": (1, MAX_PIPELINE_DEPTH),
    "branches": (0, MAX_BRANCHES),
}


def _check_range(field_name: str, value: int, label: str) -> None:
    low, high = SPECULATION_RANGES[field_name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{label} must be in [{low}, {high}], got {value!r}")


def check_k(k: int) -> None:
    _check_range("k", k, "k (num_speculative_tokens)")


@dataclass(frozen=True)
class Speculation:
    """How a turn speculates: the one home of these settings, their defaults and ranges.

    A request leaves a setting None for "the server's default": ``k`` and ``adaptive``
    are then the gateway's (``--default-k``, ``--default-adaptive``), the others the
    draft's (its flags); ``over`` fills them in. ``adaptive`` left unset with ``k`` set
    is off: a request that names k gets exactly k. ``SPECULATION_DEFAULTS`` holds the
    defaults those flags ship with. None of these settings changes the output (greedy:
    the same tokens; sampled: the same distribution), only how fast it comes.
    """

    # Tokens drafted per round (the upper bound when adaptive); 0 = the oracle alone.
    k: int | None = None
    # Choose k per round, 0 (the oracle alone's plain step) included, from the measured
    # acceptance, costs and round trip (``specdec.core.adaptive``).
    adaptive: bool | None = None
    drafter: DrafterKind = DrafterKind.AUTO
    # Draft the next block while this one is verified (a draft's setting; no request field).
    draft_ahead: bool | None = None
    # Blocks in flight to the oracle at once: 2 sends the block drafted ahead before the
    # verdict it depends on (1 = wait for each verdict).
    pipeline_depth: int | None = None
    # Greedy, or sampled with a coupled draft: besides a block's full acceptance, draft
    # ahead for this many of its likeliest corrections (0 = none).
    branches: int | None = None
    # After a verdict no block drafted ahead extends, the oracle drafts the next block
    # itself with its rescue draft, where it has one.
    rescue: bool | None = None

    def over(self, defaults: Speculation) -> Speculation:
        """These settings, each unset one (None) taken from ``defaults``."""
        unset = {
            f.name: getattr(defaults, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None
        }
        if self.adaptive is None and self.k is not None:
            unset["adaptive"] = False  # an explicit k is a fixed k
        return dataclasses.replace(self, **unset)

    def validate(self, label: Callable[[str], str] = str) -> None:
        """Raise ``InvalidArgument`` naming the first setting out of range; ``label``
        turns a field name into the name the caller knows it by (a flag, a proto field)."""
        if not isinstance(self.drafter, DrafterKind):
            raise InvalidArgument(
                f"{label('drafter')} must be one of {[d.value for d in DrafterKind]}, "
                f"got {self.drafter!r}"
            )
        for name in SPECULATION_RANGES:
            value = getattr(self, name)
            if value is not None:
                _check_range(name, value, label(name))


# The defaults of the gateway's --default-k and --default-adaptive and of the draft's
# flags: the fastest configuration measured (docs/bench/CONTROLLER.md): the controller,
# k up to 8.
SPECULATION_DEFAULTS = Speculation(
    k=8,
    adaptive=True,
    drafter=DrafterKind.AUTO,
    draft_ahead=True,
    pipeline_depth=2,
    branches=3,
    rescue=True,
)
