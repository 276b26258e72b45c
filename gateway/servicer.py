"""The public Gateway API: thin handlers (from_pb -> core -> to_pb)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.generation import Chunk, TurnRequest, TurnRunner
from gateway.limits import RequestLimits
from gateway.resume import check_turn_id, plan
from gateway.sessions import Session, SessionTable, ephemeral_session_id
from specdec.core.errors import InvalidArgument, NotFound, Unavailable
from specdec.core.messages import ReleaseDraftSession
from specdec.core.sampling import resolve_seed
from specdec.core.types import DrafterKind, Speculation
from specdec.rpc import convert
from specdec.rpc.security import current_principal
from specdec.telemetry.gateway import request_observer
from specdec.v1 import gateway_pb2, gateway_pb2_grpc, oracle_pb2

log = logging.getLogger(__name__)

# How long a resumed turn waits for the session's turn lock: a dead replica's lock
# expires within its TTL (gateway.store.redis.LOCK_TTL_S), a live gateway lets go as
# soon as it notices that the client of the cut stream is gone.
RESUME_LOCK_WAIT_S = 15.0


def caller_of(context: Any) -> str:
    """The principal a request runs as: proven by its bearer token to the auth
    interceptor ("" when authentication is off). Never read from request metadata,
    which the client chooses."""
    return current_principal()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        runner: TurnRunner,
        sessions: SessionTable,
        tokenizer: Any,
        *,
        default_k: int,
        default_max_new_tokens: int,
        default_adaptive: bool,
        limits: RequestLimits,
    ) -> None:
        self._runner = runner
        self._sessions = sessions
        self._tokenizer = tokenizer
        self._defaults = Speculation(k=default_k, adaptive=default_adaptive)
        self._default_max_new_tokens = default_max_new_tokens
        self._limits = limits
        # Off the event loop, one prompt at a time (a fast tokenizer is not thread-safe).
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        # Set when the gateway stops: the turns it cuts are resumed on another replica.
        self.draining = False

    def close(self) -> None:
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    # -- Generate ------------------------------------------------------------

    async def _turn_request(self, request: gateway_pb2.GenerateRequest) -> TurnRequest:
        if request.prompt and request.prompt_token_ids:
            raise InvalidArgument("set either prompt or prompt_token_ids, not both")
        contexts = [o.info.max_context for o in self._runner.registry.oracles()]
        self._limits.check(request.prompt, request.sampling.stop, max(contexts, default=0))
        resume_after = (
            request.resume_after_tokens if request.HasField("resume_after_tokens") else None
        )
        check_turn_id(request.turn_id, resume_after)
        speculation = convert.speculation_from_pb(request.speculation)
        speculation = speculation.over(self._defaults)
        if speculation.drafter is DrafterKind.NONE:
            speculation = dataclasses.replace(speculation, k=0)
        params = convert.sampling_from_pb(
            request.sampling,
            default_max_new_tokens=self._default_max_new_tokens,
            eos_token_ids=self._runner.eos_token_ids(),
        )
        if request.prompt:
            prompt_ids = await asyncio.get_running_loop().run_in_executor(
                self._tokenizing, self._tokenize, request.prompt
            )
        else:
            prompt_ids = list(request.prompt_token_ids)
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty: set prompt or prompt_token_ids")
        return TurnRequest(
            prompt_ids,
            dataclasses.replace(params, seed=resolve_seed(params.seed)),
            speculation,
            request.turn_id or uuid.uuid4().hex,
            resume_after,
        )

    def _tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    async def _session_of(
        self, request: gateway_pb2.GenerateRequest, turn: TurnRequest, owner: str
    ) -> Session:
        """The request's session; a one-off request's own (found again by its turn id)."""
        if request.session_id:
            return await self._sessions.get(request.session_id, owner)
        session_id = ephemeral_session_id(owner, turn.turn_id)
        session = await self._sessions.find(session_id, owner)
        if session is not None:
            return session
        if turn.resume_after:
            raise NotFound(
                f"cannot resume turn {turn.turn_id!r}: the one-off request is gone (it "
                "finished, was cancelled, or expired)"
            )
        return await self._sessions.create(owner, ephemeral=True, session_id=session_id)

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        turn = await self._turn_request(request)
        owner = caller_of(context)
        session = await self._session_of(request, turn, owner)
        # A resumed turn waits for the lock of the gateway it was cut on: a dead
        # replica's expires, a live one lets go once it sees its client gone.
        wait_s = RESUME_LOCK_WAIT_S if turn.resume_after is not None else 0.0
        async with self._sessions.turn(session, wait_s) as session:
            after = plan(session, turn.turn_id, turn.resume_after)
            if after is not None and session.turn is not None:
                t = session.turn
                prompt = session.tokens[t.start : t.prompt_end]
                turn = TurnRequest(prompt, t.params, t.speculation, turn.turn_id, after)
            else:
                turn = dataclasses.replace(turn, resume_after=None)
            watch = request_observer(  # None when telemetry is off
                session.session_id, len(turn.prompt_ids), turn.params, turn.k, not session.ephemeral
            )
            public_id = "" if session.ephemeral else session.session_id
            resumable = False
            try:
                async for chunk in self._runner.run(session, turn):
                    if watch is not None:
                        watch.chunk(chunk)
                    yield _response(chunk, public_id, turn.turn_id)
            except Unavailable:
                resumable = True  # the client may resume it: a one-off's session stays
                raise
            finally:
                if watch is not None:
                    watch.close()
                if session.ephemeral and not (resumable or self.draining):
                    await self._sessions.discard(session)
                    await self.release_caches(session.session_id)

    def drain(self) -> None:
        """The gateway is stopping: the one-off turns it cuts stay resumable elsewhere."""
        self.draining = True

    # -- sessions ------------------------------------------------------------

    async def CreateSession(
        self, request: gateway_pb2.CreateSessionRequest, context: Any
    ) -> gateway_pb2.CreateSessionResponse:
        for expired in await self._sessions.expire_idle():
            await self.release_caches(expired)
        session = await self._sessions.create(caller_of(context))
        return gateway_pb2.CreateSessionResponse(session_id=session.session_id)

    async def GetSession(
        self, request: gateway_pb2.GetSessionRequest, context: Any
    ) -> gateway_pb2.GetSessionResponse:
        session = await self._sessions.get(request.session_id, caller_of(context))
        return gateway_pb2.GetSessionResponse(
            session_id=session.session_id,
            token_ids=session.tokens,
            text=self._tokenizer.decode(session.tokens, skip_special_tokens=True),
            turns=session.turns,
            oracle_id=session.oracle_id,
            draft_id=session.draft_id,
            created_unix_ms=session.created_unix_ms,
            last_used_unix_ms=session.last_used_unix_ms,
        )

    async def CloseSession(
        self, request: gateway_pb2.CloseSessionRequest, context: Any
    ) -> gateway_pb2.CloseSessionResponse:
        session = await self._sessions.close(request.session_id, caller_of(context))
        await self.release_caches(session.session_id)
        return gateway_pb2.CloseSessionResponse(token_count=len(session.tokens))

    async def ListWorkers(
        self, request: gateway_pb2.ListWorkersRequest, context: Any
    ) -> gateway_pb2.ListWorkersResponse:
        workers = sorted(self._runner.registry.workers(), key=lambda w: (w.info.kind, w.worker_id))
        return gateway_pb2.ListWorkersResponse(
            workers=[
                convert.worker_info_to_pb(
                    w.info,
                    active_sessions=w.load,
                    kv_cache_bytes=w.kv_cache_bytes,
                    uptime_s=w.uptime_s,
                )
                for w in workers
            ]
        )

    async def release_caches(self, session_id: str) -> None:
        """Tell every worker to forget this session's KV cache (best effort: soft state)."""
        registry = self._runner.registry
        for worker in registry.workers():
            if worker.is_oracle:
                try:
                    await worker.oracle_stub().ReleaseSession(
                        oracle_pb2.ReleaseSessionRequest(session_id=session_id), timeout=2
                    )
                except Exception as exc:
                    log.debug("release on %s failed: %s", worker.worker_id, exc)
            else:
                # Every draft, not only session.draft_id: a turn cancelled or failed over
                # before it ended left caches on drafts the session never recorded.
                worker.outbox.put_nowait(ReleaseDraftSession(session_id))


def _response(chunk: Chunk, session_id: str, turn_id: str) -> gateway_pb2.GenerateResponse:
    response = gateway_pb2.GenerateResponse(
        token_ids=chunk.token_ids, text=chunk.text, session_id=session_id, turn_id=turn_id
    )
    if chunk.finish_reason is not None:
        response.finish_reason = convert.finish_reason_to_pb(chunk.finish_reason)
    if chunk.summary is not None:
        s = chunk.summary
        response.stats.CopyFrom(
            convert.stats_to_pb(
                s.stats,
                oracle_id=s.oracle_id,
                draft_id=s.draft_id,
                drafter=s.drafter,
                failovers=s.failovers,
            )
        )
    return response
