"""One Generate turn at the gateway: pick workers, run the rounds, stream, fail over.

The gateway's session tokens are the source of truth. Workers report commits;
each commit must extend exactly the session's committed length (anything else
is a duplicate or stale report and is ignored). The gateway runs its own stop
checker over the committed stream, so the output ends exactly where the
oracle alone would end, even across a failover. When a worker disappears
mid-turn, the turn resumes on another one from the committed tokens (the new
oracle re-prefills them): time is lost, tokens never are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc

from gateway.detokenize import IncrementalDecoder
from gateway.registry import Registry, Worker
from gateway.sessions import Session
from specdec.core.adaptive import AdaptiveMemory
from specdec.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from specdec.core.loop import run_turn
from specdec.core.sampling import SamplingParams, resolve_seed, validate_token_ids
from specdec.core.stopping import FinishReason, StopChecker
from specdec.core.types import OpenResult, RoundReport, Turn, TurnStats, check_k
from specdec.core.vocab import vocabulary_mismatch
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.proposers import InlineProposer
from specdec.rpc import convert
from specdec.rpc.oracle_link import GrpcOracleLink, OracleRpcError
from specdec.telemetry.gateway import record_round
from specdec.telemetry.rounds import current_trace_context, round_tracer
from specdec.v1 import common_pb2, oracle_pb2, registry_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnRequest:
    """A validated Generate request, protobuf-free."""

    prompt_ids: list[int]
    params: SamplingParams
    k: int
    adaptive: bool
    drafter: int  # common_pb2.DrafterKind
    pipeline_depth: int = 0  # blocks in flight to the oracle (0 = the draft's default)
    branches: int | None = None  # likely corrections drafted ahead (None = the draft's default)
    rescue: bool | None = None  # the oracle drafts after a miss (None = the draft's default)


@dataclass(frozen=True)
class Chunk:
    """What one GenerateResponse carries; the last one has finish_reason and summary."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    summary: TurnSummary | None = None


@dataclass
class TurnSummary:
    stats: TurnStats
    oracle_id: str = ""
    draft_id: str = ""
    drafter: int = common_pb2.DRAFTER_KIND_UNSPECIFIED
    failovers: int = 0
    model: str = ""  # the oracle's model (the output is what it alone would produce)


# Events of one attempt (one pair of workers).
@dataclass(frozen=True)
class _Committed:
    base_length: int
    tokens: list[int]
    report: RoundReport


@dataclass(frozen=True)
class _Opened:
    cached_tokens: int
    prefilled_tokens: int
    prefill_ns: int


@dataclass(frozen=True)
class _Ended:
    reason: FinishReason | None


_Event = _Opened | _Committed | _Ended


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
        if request.drafter == common_pb2.DRAFTER_KIND_MODEL and drafts and not compatible:
            raise FailedPrecondition(
                f"no registered draft can draft for oracle {oracle.worker_id}: "
                + "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
            )
        free = [d for d in compatible if d.has_capacity]
        return _prefer(free, session.draft_id) if free else None

    # -- the turn ------------------------------------------------------------

    async def run(self, session: Session, request: TurnRequest) -> AsyncIterator[Chunk]:
        """Stream the turn's chunks; commits land in ``session.tokens`` as they arrive."""
        check_k(request.k)
        params = request.params
        # EOS ends the turn only when it is among the stop ids (not with ignore_eos): the
        # checker stops at every id it is given as EOS.
        eos = [t for t in self.eos_token_ids() if t in params.stop_token_ids]
        stop = StopChecker(params, eos, self._decode if params.stop else None)
        decoder = IncrementalDecoder(self._decode_text)
        summary = TurnSummary(TurnStats(prompt_tokens=len(request.prompt_ids)))
        seed = resolve_seed(params.seed)
        excluded: set[str] = set()
        context_before = len(session.tokens)
        started = False
        produced = 0
        loop = asyncio.get_running_loop()
        t_start = loop.time()
        while True:
            oracle = await self.pick_oracle(session, excluded)
            if not started:
                self._check_prompt(session, request, oracle)
                session.tokens.extend(request.prompt_ids)
                started = True
            remaining = dataclasses.replace(params, max_new_tokens=params.max_new_tokens - produced)
            attempt, draft = self._attempt(session, request, remaining, seed, oracle, excluded)
            summary.oracle_id = oracle.worker_id
            summary.model = oracle.info.model
            summary.draft_id = draft.worker_id if draft else ""
            summary.drafter = _drafter_kind(request, draft)
            finish: FinishReason | None = None
            ended = False
            try:
                async for event in attempt:
                    if isinstance(event, _Opened):
                        summary.stats.cached_tokens += event.cached_tokens
                        summary.stats.prefilled_tokens += event.prefilled_tokens
                        summary.stats.prefill_ns += event.prefill_ns
                        continue
                    if isinstance(event, _Ended):
                        finish = finish or event.reason or FinishReason.LENGTH
                        ended = True
                        break
                    if event.base_length != len(session.tokens):
                        log.warning(
                            "ignoring a commit at %d (session at %d)",
                            event.base_length,
                            len(session.tokens),
                        )
                        continue
                    keep, finish = stop.feed(event.tokens)
                    tokens = event.tokens[:keep]
                    session.tokens.extend(tokens)
                    produced += keep
                    summary.stats.add(dataclasses.replace(event.report, committed=keep))
                    record_round(event.report, summary.drafter)
                    if summary.stats.time_to_first_token_ns == 0 and tokens:
                        summary.stats.time_to_first_token_ns = int((loop.time() - t_start) * 1e9)
                    text = decoder.feed(tokens)
                    if finish is not None:
                        break
                    if tokens:
                        yield Chunk(tokens, text)
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
                    del session.tokens[context_before:]
                raise
            finally:
                await attempt.aclose()
            if finish is None and not ended:
                raise Unavailable("the worker stopped reporting without finishing the turn")
            session.oracle_id = oracle.worker_id
            session.draft_id = draft.worker_id if draft else session.draft_id
            summary.stats.total_ns = int((loop.time() - t_start) * 1e9)
            last = tokens if finish is not None and not ended else []
            tail = decoder.feed(last) if last else ""
            yield Chunk(last, tail + decoder.flush(), finish, summary)
            return

    def eos_token_ids(self) -> tuple[int, ...]:
        oracles = self.registry.oracles()
        return tuple(oracles[0].info.eos_token_ids) if oracles else ()

    def _check_prompt(self, session: Session, request: TurnRequest, oracle: Worker) -> None:
        validate_token_ids(request.prompt_ids, oracle.info.vocab_size, "prompt_token_ids")
        total = len(session.tokens) + len(request.prompt_ids)
        if oracle.info.max_context and total >= oracle.info.max_context:
            raise InvalidArgument(
                f"the context would be {total} tokens (session {len(session.tokens)} + prompt "
                f"{len(request.prompt_ids)}), but the oracle's model takes at most "
                f"{oracle.info.max_context - 1} so that one token can be generated"
            )

    def _attempt(
        self,
        session: Session,
        request: TurnRequest,
        params: SamplingParams,
        seed: int,
        oracle: Worker,
        excluded: set[str],
    ) -> tuple[AsyncGenerator[_Event, None], Worker | None]:
        want_model = request.k > 0 and request.drafter in (
            common_pb2.DRAFTER_KIND_UNSPECIFIED,
            common_pb2.DRAFTER_KIND_MODEL,
        )
        draft = self.pick_draft(session, oracle, request, excluded) if want_model else None
        if draft is not None:
            return self._draft_attempt(session, request, params, seed, oracle, draft), draft
        return self._local_attempt(session, request, params, seed, oracle), None

    async def _draft_attempt(
        self,
        session: Session,
        request: TurnRequest,
        params: SamplingParams,
        seed: int,
        oracle: Worker,
        draft: Worker,
    ) -> AsyncGenerator[_Event, None]:
        assignment_id = uuid.uuid4().hex
        queue = self.registry.expect(assignment_id, draft)
        oracle.assignments.add(assignment_id)
        assignment = registry_pb2.Assignment(
            assignment_id=assignment_id,
            session_id=session.session_id,
            oracle_id=oracle.worker_id,
            oracle_address=oracle.info.public_address or oracle.info.address,
            token_ids=session.tokens,
            prompt_tokens=len(request.prompt_ids),
            sampling=convert.sampling_to_pb(params),
            seed=seed,
            num_speculative_tokens=request.k,
            adaptive=request.adaptive,
            pipeline_depth=request.pipeline_depth,
            max_context=oracle.info.max_context,
            grant=self.registry.grant(session.session_id, oracle),
            trace_context=current_trace_context(),  # the Generate span: rounds hang under it
        )
        if request.branches is not None:
            assignment.branches = request.branches
        if request.rescue is not None:
            assignment.rescue = request.rescue
        finished = False
        try:
            await draft.outbox.put(registry_pb2.ConnectResponse(assignment=assignment))
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), self._worker_silence_s)
                except TimeoutError:
                    raise _Broke(
                        draft,
                        f"draft {draft.worker_id} reported nothing for {self._worker_silence_s}s",
                    ) from None
                kind = message.WhichOneof("kind")
                if kind == "opened":
                    o = message.opened
                    yield _Opened(o.cached_tokens, o.prefilled_tokens, o.prefill_ns)
                elif kind == "commit":
                    commit = message.commit
                    yield _Committed(commit.base_length, list(commit.token_ids), _report(commit))
                elif kind == "finished":
                    finished = True
                    yield _Ended(convert.finish_reason_from_pb(message.finished.finish_reason))
                    return
                else:
                    failed = message.failed
                    finished = True
                    code = _code(failed.status_code)
                    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
                        # The draft's report alone cannot tell a dead oracle from a broken
                        # draft -> oracle link: the gateway asks the oracle itself. Reachable:
                        # the pair's link (or the draft) failed, the oracle stays in the turn.
                        dead = not oracle.alive or (
                            "oracle" in failed.message and not await _reachable(oracle)
                        )
                        raise _Broke(oracle if dead else draft, failed.message)
                    error = OracleRpcError(code, failed.message)
                    raise error
        finally:
            self.registry.forget(assignment_id, draft)
            oracle.assignments.discard(assignment_id)
            if not finished and draft.alive:
                cancel = registry_pb2.CancelAssignment(assignment_id=assignment_id, reason="done")
                draft.outbox.put_nowait(registry_pb2.ConnectResponse(cancel=cancel))

    async def _local_attempt(
        self,
        session: Session,
        request: TurnRequest,
        params: SamplingParams,
        seed: int,
        oracle: Worker,
    ) -> AsyncGenerator[_Event, None]:
        """Oracle alone or n-gram: the gateway drives the rounds itself."""
        proposer = None
        if request.drafter == common_pb2.DRAFTER_KIND_NGRAM and request.k > 0:
            proposer = InlineProposer(NgramDrafter())
        rounds = round_tracer(session.session_id)  # None when tracing is off
        link = GrpcOracleLink(
            oracle.oracle_stub(),
            session.session_id,
            grant=self.registry.grant(session.session_id, oracle),
            trace_context=rounds.trace_context if rounds is not None else None,
            round_timeout_s=self._worker_silence_s,
        )
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        turn = Turn(
            context=list(session.tokens),
            prompt_tokens=len(request.prompt_ids),
            params=params,
            seed=seed,
            k=request.k if proposer else 0,
            stop=StopChecker(
                params,
                [t for t in oracle.info.eos_token_ids if t in params.stop_token_ids],  # ignore_eos
                self._decode if params.stop else None,
            ),
            max_context=oracle.info.max_context or 1 << 30,
        )
        base = [len(session.tokens)]

        async def on_commit(tokens: list[int], report: RoundReport) -> None:
            await queue.put(_Committed(base[0], tokens, report))
            base[0] += len(tokens)

        async def on_open(opened: OpenResult) -> None:
            await queue.put(
                _Opened(opened.cached_tokens, opened.computed_tokens, opened.prefill_ns)
            )

        key = f"{request.drafter}:{oracle.worker_id}"
        policy = self._adaptive.policy(key, turn.k) if request.adaptive and turn.k else None
        task = asyncio.create_task(
            run_turn(
                link, proposer, turn, on_commit, policy=policy, on_open=on_open, observer=rounds
            )
        )
        oracle.assignments.add(id(task).__str__())
        getter: asyncio.Future[_Event] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                try:
                    reason, _ = task.result()
                except OracleRpcError as exc:
                    if exc.retryable:
                        raise _Broke(oracle, str(exc)) from exc
                    raise
                yield _Ended(reason)
                return
        finally:
            oracle.assignments.discard(id(task).__str__())
            if policy is not None:
                self._adaptive.remember(key, policy)
            if getter is not None:
                getter.cancel()  # closed mid-wait: no pending Queue.get task left behind
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await link.close()
            if rounds is not None:
                rounds.close(None if task.cancelled() else task.exception())


async def _reachable(oracle: Worker, timeout_s: float = 2.0) -> bool:
    """Whether ``oracle`` answers GetInfo on the gateway's own channel to it."""
    try:
        await oracle.oracle_stub().GetInfo(oracle_pb2.GetInfoRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return True


def _prefer(workers: list[Worker], preferred_id: str) -> Worker:
    """The session's previous worker when it is still there (its caches are warm), else the
    least loaded."""
    for worker in workers:
        if worker.worker_id == preferred_id:
            return worker
    return min(workers, key=lambda w: (w.load, w.registered_at))


def _drafter_kind(request: TurnRequest, draft: Worker | None) -> int:
    if draft is not None:
        return common_pb2.DRAFTER_KIND_MODEL
    if request.k > 0 and request.drafter == common_pb2.DRAFTER_KIND_NGRAM:
        return common_pb2.DRAFTER_KIND_NGRAM
    return common_pb2.DRAFTER_KIND_NONE


def _report(commit: registry_pb2.AssignmentCommit) -> RoundReport:
    r = commit.round
    return RoundReport(
        round=r.round,
        k=r.proposed,
        proposed=r.proposed,
        accepted=r.accepted,
        is_bonus=r.is_bonus,
        committed=len(commit.token_ids),
        committed_length=commit.base_length + len(commit.token_ids),
        draft_ns=r.draft_ns,
        verify_ns=r.verify_ns,
        network_ns=r.network_ns,
        queue_ns=r.queue_ns,
        drafted_ahead=r.drafted_ahead,
        pipelined=r.pipelined,
        skipped_blocks=r.skipped_blocks,
        branch=r.branch,
        rescued=r.rescued,
    )


def _code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
