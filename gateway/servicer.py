"""The public Gateway API over gRPC: thin handlers (from_pb -> ``GatewayApi`` -> to_pb)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gateway.api import GatewayApi, GenerateCall
from gateway.generation import Chunk
from specdec.rpc import convert
from specdec.rpc.security import current_principal
from specdec.v1 import gateway_pb2, gateway_pb2_grpc


def caller_of(context: Any) -> str:
    """The principal a request runs as: proven by its bearer token to the auth
    interceptor ("" when authentication is off). Never read from request metadata,
    which the client chooses."""
    return current_principal()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, api: GatewayApi) -> None:
        self._api = api

    # -- Generate ------------------------------------------------------------

    def _call(self, request: gateway_pb2.GenerateRequest) -> GenerateCall:
        resume_after = (
            request.resume_after_tokens if request.HasField("resume_after_tokens") else None
        )
        # A new turn unnamed gets a name; a resume must name its turn (the api says so).
        picked = "" if resume_after is not None else uuid.uuid4().hex
        return GenerateCall(
            turn_id=request.turn_id or picked,
            prompt=request.prompt,
            prompt_token_ids=tuple(request.prompt_token_ids),
            messages=convert.messages_from_pb(request.messages),
            session_id=request.session_id,
            params=convert.sampling_from_pb(
                request.sampling, default_max_new_tokens=self._api.default_max_new_tokens
            ),
            ignore_eos=request.sampling.ignore_eos,
            speculation=convert.speculation_from_pb(request.speculation),
            resume_after=resume_after,
        )

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        call = self._call(request)
        # Closed as the call ends, cancelled or not: the turn's cleanup runs now.
        async with contextlib.aclosing(self._api.generate(call, caller_of(context))) as chunks:
            async for chunk in chunks:
                yield _response(chunk, call.session_id, call.turn_id)

    # -- sessions ------------------------------------------------------------

    async def CreateSession(
        self, request: gateway_pb2.CreateSessionRequest, context: Any
    ) -> gateway_pb2.CreateSessionResponse:
        session = await self._api.create_session(caller_of(context))
        return gateway_pb2.CreateSessionResponse(session_id=session.session_id)

    async def GetSession(
        self, request: gateway_pb2.GetSessionRequest, context: Any
    ) -> gateway_pb2.GetSessionResponse:
        session = await self._api.get_session(request.session_id, caller_of(context))
        return gateway_pb2.GetSessionResponse(
            session_id=session.session_id,
            token_ids=session.tokens,
            text=self._api.session_text(session),
            turns=session.turns,
            oracle_id=session.oracle_id,
            draft_id=session.draft_id,
            created_unix_ms=session.created_unix_ms,
            last_used_unix_ms=session.last_used_unix_ms,
        )

    async def CloseSession(
        self, request: gateway_pb2.CloseSessionRequest, context: Any
    ) -> gateway_pb2.CloseSessionResponse:
        session = await self._api.close_session(request.session_id, caller_of(context))
        return gateway_pb2.CloseSessionResponse(token_count=len(session.tokens))

    async def ListWorkers(
        self, request: gateway_pb2.ListWorkersRequest, context: Any
    ) -> gateway_pb2.ListWorkersResponse:
        return gateway_pb2.ListWorkersResponse(
            workers=[
                convert.worker_info_to_pb(
                    w.info,
                    active_sessions=w.load,
                    kv_cache_bytes=w.kv_cache_bytes,
                    uptime_s=w.uptime_s,
                )
                for w in self._api.workers()
            ]
        )


def _response(chunk: Chunk, session_id: str, turn_id: str) -> gateway_pb2.GenerateResponse:
    response = gateway_pb2.GenerateResponse(
        token_ids=chunk.token_ids,
        text=chunk.text,
        session_id=session_id,
        turn_id=turn_id,
        logprobs=convert.logprobs_to_pb(chunk.logprobs),
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
