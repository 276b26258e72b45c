"""One Generate turn at the gateway: pick workers, run the rounds, stream, fail over.

The gateway's session tokens are the source of truth. Workers report commits;
each must extend exactly the session's committed length and carry the oracle's
proof (``gateway.commits``): anything else is refused, and the turn fails over
without it. The gateway runs its own stop checker over the committed stream, so
the output ends exactly where the oracle alone would end, even across a failover.
When a worker disappears mid-turn, the turn resumes on another one from the
committed tokens (the new oracle re-prefills them): time is lost, tokens never are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import grpc

from gateway.commits import CommitGate, CommitRefused
from gateway.detokenize import IncrementalDecoder
from gateway.limits import check_fits_worker_link
from gateway.registry import Registry, Worker
from gateway.resume import continue_turn
from gateway.sessions import Session
from gateway.store import TurnRecord
from gateway.store.base import ChatRecord
from specdec.core.adaptive import AdaptiveMemory, DraftTurns
from specdec.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    SpecdecError,
    Unavailable,
    quoted,
)
from specdec.core.messages import (
    Assignment,
    AssignmentCommitted,
    AssignmentFailed,
    AssignmentFinished,
    AssignmentOpened,
    AssignmentReport,
    CancelAssignment,
)
from specdec.core.sampling import SamplingParams, resolve_seed, validate_token_ids
from specdec.core.stopping import FinishReason, turn_stop_checker
from specdec.core.types import DrafterKind, Speculation, TokenLogprob, TurnStats
from specdec.core.vocab import vocabulary_mismatch
from specdec.core.wiring import run_assignment
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.proposers import InlineProposer
from specdec.rpc import convert
from specdec.rpc.commit_proof import new_ticket
from specdec.rpc.oracle_link import GrpcOracleLink, OracleRpcError
from specdec.telemetry.gateway import record_round
from specdec.telemetry.rounds import current_trace_context, round_tracer

log = logging.getLogger(__name__)


# The gateway's own turns (the oracle alone, n-gram) draft nothing ahead.
LOCAL_SPECULATION = Speculation(draft_ahead=False, pipeline_depth=1, branches=0, rescue=False)


@dataclass(frozen=True)
class TurnRequest:
    """A validated Generate request, protobuf-free.

    speculation: k resolved (the gateway's default when unset; 0 with drafter none);
    the draft settings left unset are the draft's defaults. params: the seed resolved.
    turn_id: what the turn is resumed by. resume_after: None for a new turn; else the
    session's latest turn (``Session.turn``) goes on, after the first ``resume_after``
    of its generated tokens, which the client has (``gateway.resume``).
    """

    prompt_ids: list[int]
    params: SamplingParams
    speculation: Speculation
    turn_id: str = ""
    resume_after: int | None = None
    chat: ChatRecord | None = None  # a chat turn's conversation (``gateway.chat``)

    @property
    def k(self) -> int:
        return self.speculation.k or 0


@dataclass(frozen=True)
class Chunk:
    """What one GenerateResponse carries; the last one has finish_reason and summary.
    ``logprobs``: one per token id when the request asks for them, else empty."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    summary: TurnSummary | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class TurnSummary:
    stats: TurnStats
    oracle_id: str = ""
    draft_id: str = ""
    drafter: DrafterKind = DrafterKind.AUTO
    failovers: int = 0
    model: str = ""  # the oracle's model (the output is what it alone would produce)


# What one attempt (one pair of workers) yields: its reports, up to AssignmentFinished.
_Event = AssignmentOpened | AssignmentCommitted | AssignmentFinished


class _Broke(Exception):
    """The attempt's worker failed in a way another worker can recover from."""

    def __init__(self, worker: Worker, message: str) -> None:
        super().__init__(message)
        self.worker = worker


class TurnRunner:
    """Runs Generate turns against the registered workers."""

    def __init__(
        self,
        registry: Registry,
        decode: Callable[[Sequence[int]], str],
        decode_text: Callable[[Sequence[int]], str],
        *,
        max_failovers: int,
        worker_wait_s: float,
        worker_silence_s: float = 60.0,
    ) -> None:
        self.registry = registry
        self._decode = decode  # for stop strings: special tokens kept, as HF matches them
        self._decode_text = decode_text  # for the streamed text: special tokens skipped
        self._max_failovers = max_failovers
        self._worker_wait_s = worker_wait_s
        # A worker that sends nothing for this long is hung or cut off (a dead TCP peer
        # behind a stalled link is silent, not disconnected): the turn fails over.
        self._worker_silence_s = worker_silence_s
        self._adaptive = AdaptiveMemory()  # n-gram turns, per oracle
        self._draft_turns = DraftTurns()  # whether drafting pays, per draft-oracle pair

    # -- worker choice -------------------------------------------------------

    async def wait_for_oracle(self, excluded: set[str]) -> list[Worker]:
        """Live oracles not excluded; waits briefly for one to register (start-up races)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._worker_wait_s
        while True:
            oracles = [
                o for o in self.registry.oracles() if o.worker_id not in excluded and o.responsive
            ]
            if oracles or loop.time() >= deadline:
                return oracles
            with contextlib.suppress(TimeoutError):
                async with self.registry.changed:
                    await asyncio.wait_for(
                        self.registry.changed.wait(), max(0.01, deadline - loop.time())
                    )

    async def pick_oracle(self, session: Session, excluded: set[str]) -> Worker:
        oracles = await self.wait_for_oracle(excluded)
        if not oracles and excluded:
            raise Unavailable(
                f"no oracle left for this turn: {sorted(excluded)} failed during it and no "
                "other responsive oracle is registered; retry later"
            )
        if not oracles:
            raise Unavailable(
                "no oracle is registered at the gateway; start one with "
                "`specdec oracle --gateway <this gateway>`"
            )
        free = [o for o in oracles if o.has_capacity]
        if not free:
            raise ResourceExhausted(
                f"all {len(oracles)} oracles are at their session limit; retry later"
            )
        return _prefer(free, session.oracle_id)

    def pick_draft(
        self, session: Session, oracle: Worker, request: TurnRequest, excluded: set[str]
    ) -> Worker | None:
        drafts = [d for d in self.registry.drafts() if d.worker_id not in excluded and d.responsive]
        reasons = {
            d.worker_id: vocabulary_mismatch(
                d.info.vocab_fingerprint,
                d.info.vocab_size,
                oracle.info.vocab_fingerprint,
                oracle.info.vocab_size,
            )
            for d in drafts
        }
        compatible = [d for d in drafts if reasons[d.worker_id] is None]
        if request.speculation.drafter is DrafterKind.MODEL and drafts and not compatible:
            raise FailedPrecondition(
                f"no registered draft can draft for oracle {oracle.worker_id}: "
                + "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
            )
        free = [d for d in compatible if d.has_capacity]
        return _prefer(free, session.draft_id) if free else None

    # -- the turn ------------------------------------------------------------

    async def run(self, session: Session, request: TurnRequest) -> AsyncGenerator[Chunk, None]:
        """Stream the turn's chunks; commits land in ``session.tokens`` as they arrive."""
        params = request.params
        stop = turn_stop_checker(params, self.eos_token_ids(), self._decode)
        decoder = IncrementalDecoder(self._decode_text)
        summary = TurnSummary(TurnStats(prompt_tokens=len(request.prompt_ids)))
        seed = resolve_seed(params.seed)
        excluded: set[str] = set()
        context_before = len(session.tokens)
        started = False
        produced = 0
        loop = asyncio.get_running_loop()
        t_start = loop.time()
        if request.resume_after is not None:
            # A turn cut by its gateway's death goes on from its durable tokens.
            resumed = continue_turn(session, request.resume_after, stop, decoder)
            context_before, produced, started = resumed.start, resumed.produced, True
            if resumed.finish is not None:
                if session.turn is not None and session.turn.finish is None:
                    await session.finish_turn(resumed.finish, session.oracle_id, "")
                yield Chunk(resumed.tokens, resumed.text, resumed.finish, summary)
                return
            if resumed.tokens:
                yield Chunk(resumed.tokens, resumed.text)
        while True:
            oracle = await self.pick_oracle(session, excluded)
            if not started:
                self._check_prompt(session, request, oracle)
                await session.begin_turn(
                    request.prompt_ids,
                    TurnRecord(
                        request.turn_id,
                        len(session.tokens),
                        len(request.prompt_ids),
                        dataclasses.replace(params, seed=seed),
                        request.speculation,
                        chat=request.chat,
                    ),
                )
                started = True
            remaining = dataclasses.replace(params, max_new_tokens=params.max_new_tokens - produced)
            attempt, draft, gate = self._attempt(
                session, request, remaining, seed, oracle, excluded
            )
            summary.oracle_id = oracle.worker_id
            summary.model = oracle.info.model
            summary.draft_id = draft.worker_id if draft else ""
            summary.drafter = _drafter_kind(request, draft)
            finish: FinishReason | None = None
            ended = opened = False
            try:
                async for event in attempt:
                    if isinstance(event, AssignmentOpened):
                        summary.stats.cached_tokens += event.opened.cached_tokens
                        summary.stats.prefilled_tokens += event.opened.computed_tokens
                        summary.stats.prefill_ns += event.opened.prefill_ns
                        opened = True
                        continue
                    try:
                        if isinstance(event, AssignmentFinished):
                            gate.finish(event, len(session.tokens))
                        else:
                            gate.commit(event, len(session.tokens))
                    except CommitRefused as refused:
                        raise await self._refuse(refused, session, oracle, draft) from None
                    if isinstance(event, AssignmentFinished):
                        finish = finish or event.reason or FinishReason.LENGTH
                        ended = True
                        break
                    keep, finish = stop.feed(event.token_ids)
                    tokens = list(event.token_ids[:keep])
                    logprobs = event.report.logprobs[:keep]
                    await session.commit(tokens)  # durable before the client sees them
                    produced += keep
                    summary.stats.add(dataclasses.replace(event.report, committed=keep))
                    record_round(event.report, summary.drafter)
                    if summary.stats.time_to_first_token_ns == 0 and tokens:
                        summary.stats.time_to_first_token_ns = int((loop.time() - t_start) * 1e9)
                    text = decoder.feed(tokens)
                    if finish is not None:
                        break
                    if tokens:
                        yield Chunk(tokens, text, logprobs=logprobs)
            except _Broke as broke:
                if summary.failovers >= self._max_failovers:
                    raise Unavailable(
                        f"{broke}; gave up after {summary.failovers} failovers"
                    ) from None
                summary.failovers += 1
                excluded.add(broke.worker.worker_id)
                log.warning("turn of session %s fails over: %s", session.session_id[:8], broke)
                continue
            except BaseException:
                if produced == 0:  # nothing was generated: the turn never happened
                    await session.rollback(context_before)
                if opened:  # its workers hold the session's context: the next turn reuses it
                    with contextlib.suppress(SpecdecError):
                        await session.note_workers(
                            oracle.worker_id, draft.worker_id if draft else ""
                        )
                raise
            finally:
                await attempt.aclose()
            if finish is None and not ended:
                raise Unavailable("the worker stopped reporting without finishing the turn")
            await session.finish_turn(
                finish or FinishReason.LENGTH,
                oracle.worker_id,
                draft.worker_id if draft else "",
            )
            if draft is not None and request.speculation.adaptive:
                stats = summary.stats
                self._draft_turns.record(
                    _pair(draft, oracle, params), stats.rounds, stats.output_tokens
                )
            summary.stats.total_ns = int((loop.time() - t_start) * 1e9)
            last = tokens if finish is not None and not ended else []
            tail = decoder.feed(last) if last else ""
            yield Chunk(last, tail + decoder.flush(), finish, summary, logprobs if last else ())
            return

    async def _refuse(
        self, refused: CommitRefused, session: Session, oracle: Worker, draft: Worker | None
    ) -> _Broke:
        """A report that is not the oracle's word: nothing of it was applied. The turn
        fails over without its worker, and a draft that sent it is dismissed."""
        culprit = draft or oracle
        log.warning(
            "refused a report of %s %s for session %s: %s; the turn fails over",
            "draft" if draft else "oracle",
            quoted(culprit.worker_id),
            session.session_id[:8],
            refused,
        )
        if draft is not None:
            await self.registry.dismiss(draft, f"the gateway refused its report: {refused}")
        return _Broke(culprit, f"{culprit.worker_id}'s report refused: {refused}")

    def eos_token_ids(self) -> tuple[int, ...]:
        oracles = self.registry.oracles()
        return tuple(oracles[0].info.eos_token_ids) if oracles else ()

    def _check_prompt(self, session: Session, request: TurnRequest, oracle: Worker) -> None:
        """Before the prompt joins the session: its ids, the context, and that the turn's
        messages to its workers fit their links."""
        validate_token_ids(request.prompt_ids, oracle.info.vocab_size, "prompt_token_ids")
        total = len(session.tokens) + len(request.prompt_ids)
        if oracle.info.max_context and total >= oracle.info.max_context:
            raise InvalidArgument(
                f"the context would be {total} tokens (session {len(session.tokens)} + prompt "
                f"{len(request.prompt_ids)}), but the oracle's model takes at most "
                f"{oracle.info.max_context - 1} so that one token can be generated"
            )
        tokens = (*session.tokens, *request.prompt_ids)
        probe = self._job(session, request, request.params, 0, oracle, request.speculation, tokens)
        check_fits_worker_link(convert.wire_size(probe), total)

    def _job(
        self,
        session: Session,
        request: TurnRequest,
        params: SamplingParams,
        seed: int,
        oracle: Worker,
        speculation: Speculation,
        tokens: Sequence[int],
    ) -> Assignment:
        """One attempt of the turn on ``oracle``, from the session's ``tokens``."""
        return Assignment(
            assignment_id=uuid.uuid4().hex,
            session_id=session.session_id,
            oracle_id=oracle.worker_id,
            oracle_address=oracle.info.draft_address,
            token_ids=tuple(tokens),
            prompt_tokens=len(request.prompt_ids),
            params=params,
            seed=seed,
            speculation=speculation,
            grant=self.registry.grant(session.session_id, oracle),
            max_context=oracle.info.max_context,
            commit=new_ticket(oracle.commit_key) if oracle.commit_key else None,
        )

    def _attempt(
        self,
        session: Session,
        request: TurnRequest,
        params: SamplingParams,
        seed: int,
        oracle: Worker,
        excluded: set[str],
    ) -> tuple[AsyncGenerator[_Event, None], Worker | None, CommitGate]:
        want_model = request.k > 0 and request.speculation.drafter in (
            DrafterKind.AUTO,
            DrafterKind.MODEL,
        )
        draft = self.pick_draft(session, oracle, request, excluded) if want_model else None
        auto = request.speculation.adaptive and request.speculation.drafter is DrafterKind.AUTO
        if (
            draft is not None
            and auto
            and not self._draft_turns.use_draft(_pair(draft, oracle, params))
        ):
            draft = None  # drafting did not pay last time: the oracle alone, one hop less
        speculation = dataclasses.replace(
            request.speculation, drafter=_drafter_kind(request, draft)
        )
        job = self._job(session, request, params, seed, oracle, speculation, session.tokens)
        gate = CommitGate(job, oracle.commit_key)
        if draft is not None:
            return self._draft_attempt(job, oracle, draft), draft, gate
        return self._local_attempt(job, oracle), None, gate

    async def _draft_attempt(
        self, job: Assignment, oracle: Worker, draft: Worker
    ) -> AsyncGenerator[_Event, None]:
        queue = self.registry.expect(job.assignment_id, draft)
        oracle.assignments.add(job.assignment_id)
        # The Generate span's context: the draft's rounds hang under it.
        job = dataclasses.replace(job, trace_context=current_trace_context())
        finished = False
        try:
            await draft.outbox.put(job)
            while True:
                try:
                    report = await asyncio.wait_for(queue.get(), self._worker_silence_s)
                except TimeoutError:
                    raise _Broke(
                        draft,
                        f"draft {draft.worker_id} reported nothing for {self._worker_silence_s}s",
                    ) from None
                if not isinstance(report, AssignmentFailed):
                    finished = isinstance(report, AssignmentFinished)
                    yield report
                    if finished:
                        return
                    continue
                finished = True
                code = getattr(grpc.StatusCode, report.status, grpc.StatusCode.UNKNOWN)
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
                    # The draft's report alone cannot tell a dead oracle from a broken
                    # draft -> oracle link: the gateway asks the oracle itself. Reachable:
                    # the pair's link (or the draft) failed, the oracle stays in the turn.
                    dead = not oracle.alive or (
                        "oracle" in report.message and not await oracle.reachable()
                    )
                    raise _Broke(oracle if dead else draft, report.message)
                raise OracleRpcError(code, report.message)
        finally:
            self.registry.forget(job.assignment_id, draft)
            oracle.assignments.discard(job.assignment_id)
            if not finished and draft.alive:
                draft.outbox.put_nowait(CancelAssignment(job.assignment_id, reason="done"))

    async def _local_attempt(self, job: Assignment, oracle: Worker) -> AsyncGenerator[_Event, None]:
        """Oracle alone or n-gram: the gateway drives the rounds itself."""
        proposer = None
        if job.speculation.drafter is DrafterKind.NGRAM:
            proposer = InlineProposer(NgramDrafter())
        rounds = round_tracer(job.session_id)  # None when tracing is off
        link = GrpcOracleLink(
            oracle.oracle_channel(),
            job.session_id,
            grant=job.grant,
            trace_context=rounds.trace_context if rounds is not None else None,
            round_timeout_s=self._worker_silence_s,
            commit=job.commit,
        )
        queue: asyncio.Queue[AssignmentReport] = asyncio.Queue()
        task = asyncio.create_task(
            run_assignment(
                link,
                proposer,
                job,
                queue.put,
                defaults=LOCAL_SPECULATION,
                eos_token_ids=oracle.info.eos_token_ids,
                decode=self._decode,
                max_context=1 << 30,
                memory=self._adaptive,
                observer=rounds,
            )
        )
        oracle.assignments.add(job.assignment_id)
        getter: asyncio.Future[AssignmentReport] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _own_report(getter.result())
                    continue
                getter.cancel()
                while not queue.empty():
                    yield _own_report(queue.get_nowait())
                try:
                    reason, _ = task.result()
                except OracleRpcError as exc:
                    if exc.retryable:
                        raise _Broke(oracle, str(exc)) from exc
                    raise
                yield AssignmentFinished(job.assignment_id, reason)
                return
        finally:
            oracle.assignments.discard(job.assignment_id)
            if getter is not None:
                getter.cancel()  # closed mid-wait: no pending Queue.get task left behind
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await link.close()
            if rounds is not None:
                rounds.close(None if task.cancelled() else task.exception())


def _own_report(report: AssignmentReport) -> _Event:
    """A report of a turn the gateway runs itself: ``run_assignment`` reports only its
    open and its commits."""
    assert not isinstance(report, AssignmentFailed)
    return report


def _pair(draft: Worker, oracle: Worker, params: SamplingParams) -> str:
    """A draft-oracle pair, greedy or sampling (which accept differently)."""
    return f"{draft.worker_id}\0{oracle.worker_id}\0{params.greedy}"


def _prefer(workers: list[Worker], preferred_id: str) -> Worker:
    """The session's previous worker when it is still there (its caches are warm), else the
    least loaded."""
    for worker in workers:
        if worker.worker_id == preferred_id:
            return worker
    return min(workers, key=lambda w: (w.load, w.registered_at))


def _drafter_kind(request: TurnRequest, draft: Worker | None) -> DrafterKind:
    """The proposer that drafts the turn: the draft's model, n-gram or none."""
    if draft is not None:
        return DrafterKind.MODEL
    if request.k > 0 and request.speculation.drafter is DrafterKind.NGRAM:
        return DrafterKind.NGRAM
    return DrafterKind.NONE
