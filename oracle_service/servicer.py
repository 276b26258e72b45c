"""The Oracle gRPC servicer: protobuf in, engine call, protobuf out; no logic of its own.

Errors are raised as the core's typed errors; ``specdec.serving``'s error
interceptor turns them into statuses (a bad block aborts its stream with,
e.g., FAILED_PRECONDITION, and the session's state is left as it was).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from oracle_service.engine import OracleEngine
from specdec.errors import InvalidArgument, Unavailable
from specdec.serving.convert import block_from_pb, sampling_from_pb
from specdec.serving.grants import GrantSigner
from specdec.telemetry.oracle import verify_observer
from specdec.v1 import oracle_pb2, oracle_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = oracle_pb2.DESCRIPTOR.services_by_name["Oracle"].full_name


class OracleServicer(oracle_pb2_grpc.OracleServicer):  # type: ignore[misc]
    """Serves ``engine``; until one is set (the model is loading) every call is UNAVAILABLE."""

    def __init__(
        self, engine: OracleEngine | None = None, grants: GrantSigner | None = None
    ) -> None:
        self.engine = engine
        self.grants = grants  # set: open only sessions the gateway granted to this oracle

    def _engine(self) -> OracleEngine:
        if self.engine is None:
            raise Unavailable("the oracle is still loading its model; retry in a moment")
        return self.engine

    async def Verify(
        self,
        request_iterator: AsyncIterator[oracle_pb2.VerifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[oracle_pb2.VerifyResponse]:
        engine = self._engine()
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return  # the client closed without opening: nothing to do
        if not first.HasField("open"):
            raise InvalidArgument(
                "the first message of a Verify stream must be `open` (OpenVerify), got "
                f"`{first.WhichOneof('kind') or 'nothing'}`"
            )
        request = first.open
        if self.grants is not None:  # PERMISSION_DENIED before any GPU work
            self.grants.verify(request.grant, request.session_id, engine.oracle_id)
        # Stopping fields do not matter to verification; EOS handling is the caller's.
        sampling = sampling_from_pb(request.sampling)
        watch = verify_observer(engine.sessions, request.session_id)  # None: telemetry off
        lease, opened = await engine.open(
            request.session_id, request.token_ids, sampling, request.seed
        )
        if watch is not None:
            watch.opened(first.trace_context, opened, lease.reprefill)
        try:
            yield oracle_pb2.VerifyResponse(
                opened=oracle_pb2.VerifyOpened(
                    cached_tokens=opened.cached_tokens,
                    computed_tokens=opened.computed_tokens,
                    prefill_ns=opened.prefill_ns,
                    committed_length=len(request.token_ids),
                    oracle_id=opened.oracle_id,
                )
            )
            async for message in request_iterator:
                if not message.HasField("block"):
                    raise InvalidArgument(
                        "after `open`, every message of a Verify stream must be a `block`; "
                        "open a new stream to start another turn"
                    )
                pb = message.block
                block = block_from_pb(pb.token_ids, pb.draft_distributions)
                if watch is not None:
                    watch.mark()
                result = await engine.verify(lease, pb.base_length, block, pb.assumed_token_ids)
                verdict = result.verdict
                if verdict is None:  # a pipelined block whose assumption failed
                    log.debug("session %s round %d: skipped", request.session_id, pb.round)
                    yield oracle_pb2.VerifyResponse(
                        verdict=oracle_pb2.VerifyVerdict(
                            round=pb.round,
                            skipped=True,
                            committed_length=result.committed_length,
                            queue_ns=result.queue_ns,
                        )
                    )
                    continue
                if watch is not None:
                    watch.verified(message.trace_context, pb.round, len(block), result)
                log.debug(
                    "session %s round %d: %d/%d accepted, next %d",
                    request.session_id,
                    pb.round,
                    verdict.num_accepted,
                    len(block),
                    verdict.next_token,
                )
                yield oracle_pb2.VerifyResponse(
                    verdict=oracle_pb2.VerifyVerdict(
                        round=pb.round,
                        num_accepted=verdict.num_accepted,
                        next_token_id=verdict.next_token,
                        is_bonus=verdict.is_bonus,
                        committed_length=result.committed_length,
                        verify_ns=result.verify_ns,
                        queue_ns=result.queue_ns,
                    )
                )
        finally:
            # Ended, cancelled or aborted: the session keeps its cache for its next turn.
            engine.close(lease)

    async def GetInfo(
        self, request: oracle_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> oracle_pb2.GetInfoResponse:
        info = self._engine().info()
        return oracle_pb2.GetInfoResponse(
            oracle_id=info.oracle_id,
            model=info.model,
            vocab_fingerprint=info.vocab_fingerprint,
            vocab_size=info.vocab_size,
            max_context=info.max_context,
            eos_token_ids=list(info.eos_token_ids),
            active_sessions=info.active_sessions,
            cached_sessions=info.cached_sessions,
            kv_cache_bytes=info.kv_cache_bytes,
            kv_cache_budget_bytes=info.kv_cache_budget_bytes,
            device=info.device,
            batches=info.batches,
            verified_blocks=info.verified_blocks,
            verify_busy_ns=info.verify_busy_ns,
        )

    async def ReleaseSession(
        self, request: oracle_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> oracle_pb2.ReleaseSessionResponse:
        if not request.session_id:
            raise InvalidArgument("ReleaseSessionRequest.session_id must not be empty")
        released = await self._engine().release(request.session_id)
        return oracle_pb2.ReleaseSessionResponse(released=released)
