"""The Oracle gRPC servicer: protobuf in, engine call, protobuf out; no logic of its own.

Errors are raised as the core's typed errors; ``specdec.rpc``'s error
interceptor turns them into statuses (a bad block aborts its stream with,
e.g., FAILED_PRECONDITION, and the session's state is left as it was).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from oracle_service.engine import OracleEngine
from oracle_service.sessions import Lease
from specdec.core.errors import InvalidArgument, Unavailable
from specdec.core.sampling import SamplingParams
from specdec.core.types import MAX_BRANCHES, MAX_PIPELINE_DEPTH, Rescue, VerifyResult
from specdec.rpc.commit_proof import CommitChain, Keyring
from specdec.rpc.convert import (
    block_from_pb,
    opened_to_pb,
    rescue_decision_to_pb,
    sampling_from_pb,
    ticket_from_pb,
    verdict_to_pb,
)
from specdec.rpc.grants import GrantSigner
from specdec.telemetry.oracle import VerifyObserver, verify_observer
from specdec.v1 import oracle_pb2, oracle_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = oracle_pb2.DESCRIPTOR.services_by_name["Oracle"].full_name

# Blocks of one stream waiting for the engine: a draft pipelines at most
# MAX_PIPELINE_DEPTH levels of 1 + MAX_BRANCHES alternatives. Beyond that the stream
# is read no further until the engine answers one (flow control, not an error).
MAX_QUEUED = MAX_PIPELINE_DEPTH * (1 + MAX_BRANCHES)
# How long an OpenVerify waits for the commit key it names: a turn can reach the oracle
# just before the gateway's answer to its registration does.
COMMIT_KEY_WAIT_S = 5.0


class OracleServicer(oracle_pb2_grpc.OracleServicer):  # type: ignore[misc]
    """Serves ``engine``; until one is set (the model is loading) every call is UNAVAILABLE."""

    def __init__(
        self,
        engine: OracleEngine | None = None,
        grants: GrantSigner | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.engine = engine
        self.grants = grants  # set: open only sessions the gateway granted to this oracle
        self.keyring = keyring or Keyring()  # the commit keys its gateways gave it

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
        chain = await self._commit_chain(request, sampling)
        watch = verify_observer(engine.sessions, request.session_id)  # None: telemetry off
        lease, opened = await engine.open(
            request.session_id, request.token_ids, sampling, request.seed, request.allow_rescue
        )
        if watch is not None:
            watch.opened(first.trace_context, opened, lease.reprefill)
        try:
            yield opened_to_pb(opened, len(request.token_ids))
            # Blocks are read and queued as they arrive, not one verdict at a time: a
            # pipelined block (and the alternatives sent with it) waits in the engine's
            # queue while its predecessor is verified, so the batch after that verdict
            # finds it there. Answers go back in request order, as the client reads them.
            # A verdict with a rescue pending is followed by the decision and, if the
            # oracle drafted a block, by that block's verdict.
            answers: asyncio.Queue[_Answer | Exception | None] = asyncio.Queue()
            reader = asyncio.ensure_future(_read_blocks(request_iterator, engine, lease, answers))
            waiting: asyncio.Future[Any] | None = None  # a decision or a rescue's verdict
            try:
                while (answer := await answers.get()) is not None:
                    if isinstance(answer, Exception):
                        raise answer
                    yield await answer.response(watch, request.session_id, chain)
                    while (waiting := answer.decision()) is not None:
                        rescue = await waiting
                        yield rescue_decision_to_pb(answer.block.round, rescue)
                        if rescue is None:
                            break
                        waiting = rescue.result
                        answer = _Answer.rescued(answer, rescue)
                        yield await answer.response(watch, request.session_id, chain)
                    waiting = None
            finally:
                reader.cancel()
                if waiting is not None:  # nobody will read about it
                    waiting.cancel()
                while not answers.empty():  # queued blocks nobody will read the verdict of
                    left = answers.get_nowait()
                    if isinstance(left, _Answer):
                        left.result.cancel()
        finally:
            # Ended, cancelled or aborted: the session keeps its cache for its next turn.
            engine.close(lease)

    async def _commit_chain(
        self, request: oracle_pb2.OpenVerify, sampling: SamplingParams
    ) -> CommitChain | None:
        """The chain that proves this stream's commits to the gateway (None: no ticket)."""
        ticket = ticket_from_pb(request.commit)
        if ticket is None:
            return None
        secret = await self.keyring.get(ticket.key_id, COMMIT_KEY_WAIT_S)
        if secret is None:
            raise Unavailable(
                f"OpenVerify.commit names commit key {ticket.key_id[:24]!r}, which no gateway "
                "this oracle is registered at gave it: the turn must move to another oracle"
            )
        return CommitChain(
            secret,
            ticket,
            request.session_id,
            request.token_ids,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=request.seed,
        )

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
            rescue_draft=info.rescue_draft,
            rescue_blocks=info.rescue_blocks,
        )

    async def ReleaseSession(
        self, request: oracle_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> oracle_pb2.ReleaseSessionResponse:
        if not request.session_id:
            raise InvalidArgument("ReleaseSessionRequest.session_id must not be empty")
        released = await self._engine().release(request.session_id)
        return oracle_pb2.ReleaseSessionResponse(released=released)


@dataclass
class _Answer:
    """A block queued in the engine (read from the stream, or a rescue block the oracle
    drafted after the verdict of ``block``); ``response`` awaits its verdict."""

    block: oracle_pb2.VerifyBlock
    trace_context: dict[str, str]
    arrived_ns: int  # time.time_ns() when it was read (or announced): its span starts there
    result: asyncio.Future[VerifyResult]
    tokens: tuple[int, ...]  # its drafted tokens
    is_rescue: bool = False

    @property
    def k(self) -> int:
        return len(self.tokens)

    @classmethod
    def of(cls, message: oracle_pb2.VerifyRequest, result: asyncio.Future[VerifyResult]) -> _Answer:
        block = message.block
        tokens = tuple(block.token_ids)
        return cls(block, dict(message.trace_context), time.time_ns(), result, tokens)

    @classmethod
    def rescued(cls, after: _Answer, rescue: Rescue) -> _Answer:
        """The rescue block drafted after ``after``'s verdict (traced in its round)."""
        return cls(
            after.block,
            after.trace_context,
            time.time_ns(),
            rescue.result,
            rescue.block.token_ids,
            True,
        )

    def decision(self) -> asyncio.Future[Rescue | None] | None:
        """The rescue decision this answer's verdict awaits (call once it is answered)."""
        return self.result.result().decision

    async def response(
        self, watch: VerifyObserver | None, session_id: str, chain: CommitChain | None
    ) -> oracle_pb2.VerifyResponse:
        """Its verdict, with the proof of its commit when the stream has a ``chain``."""
        pb, result = self.block, await self.result
        verdict = result.verdict
        if verdict is None:  # a pipelined block whose assumption failed
            log.debug("session %s round %d: skipped", session_id, pb.round)
            return verdict_to_pb(pb.round, result)
        if watch is not None:
            watch.verified(self.trace_context, self.arrived_ns, pb.round, self.k, result)
        log.debug(
            "session %s round %d%s: %d/%d accepted, next %d",
            session_id,
            pb.round,
            " (rescue)" if self.is_rescue else "",
            verdict.num_accepted,
            self.k,
            verdict.next_token,
        )
        if chain is not None:
            committed = (*self.tokens[: verdict.num_accepted], verdict.next_token)
            base = result.committed_length - len(committed)
            proof = chain.seal(base, committed, verdict.logprobs or ())
            result = dataclasses.replace(result, proof=proof)
        return verdict_to_pb(pb.round, result, rescued=self.is_rescue)


async def _read_blocks(
    requests: AsyncIterator[oracle_pb2.VerifyRequest],
    engine: OracleEngine,
    lease: Lease,
    answers: asyncio.Queue[_Answer | Exception | None],
) -> None:
    """Queue every block of the stream in the engine as it arrives; None at its end.

    A malformed message or a failed read ends the stream: its error is queued in
    order, after the answers to the blocks before it. With MAX_QUEUED blocks
    waiting for the engine, reading pauses until it answers one. (Answers given but
    not yet sent do not count: while a chain of rescue blocks' verdicts goes out,
    the blocks the draft sends meanwhile must reach the engine, or none would ever
    end the chain.)
    """
    window = _Window(MAX_QUEUED)
    try:
        async for message in requests:
            if not message.HasField("block"):
                raise InvalidArgument(
                    "after `open`, every message of a Verify stream must be a `block`; "
                    "open a new stream to start another turn"
                )
            pb = message.block
            block = block_from_pb(pb.token_ids, pb.draft_distributions)
            result = engine.submit(
                lease, pb.base_length, block, pb.assumed_token_ids, pb.last_alternative
            )
            answers.put_nowait(_Answer.of(message, result))
            await window.admit(result)
    except Exception as exc:  # (not CancelledError: the stream is ending anyway)
        engine.blocks_ended(lease)
        answers.put_nowait(exc)
        return
    engine.blocks_ended(lease)
    answers.put_nowait(None)


class _Window:
    """How many of a stream's blocks wait for the engine; ``admit`` pauses at ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.waiting = 0
        self._room = asyncio.Event()
        self._room.set()

    async def admit(self, result: asyncio.Future[VerifyResult]) -> None:
        """Count ``result`` until it is set; return once fewer than ``size`` wait."""
        self.waiting += 1
        result.add_done_callback(self._answered)
        if self.waiting >= self.size:
            self._room.clear()
        await self._room.wait()

    def _answered(self, _: asyncio.Future[VerifyResult]) -> None:
        self.waiting -= 1
        if self.waiting < self.size:
            self._room.set()
