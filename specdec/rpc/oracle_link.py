"""The client end of an oracle's Verify stream, as the ``OracleLink`` of the core loop.

Used by the draft service (model drafter) and by the gateway (oracle alone,
n-gram). One link = one Verify stream = one turn of one session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from specdec.core.errors import SpecdecError
from specdec.core.messages import CommitTicket
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock, OpenResult, Rescue, VerifyResult
from specdec.rpc import convert
from specdec.v1 import oracle_pb2, oracle_pb2_grpc

# How long a closed stream may take to end on its own before it is cancelled.
CLOSE_GRACE_S = 5.0
_closing: set[asyncio.Task[None]] = set()

# What grpc core reports for an operation on a stream whose transport failed under it.
CORE_INTERNAL = "Internal error from Core"

# Statuses meaning "this oracle cannot go on": the turn may move to another one.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


class OracleRpcError(SpecdecError):
    """The oracle refused or failed; ``status`` is the gRPC status name it returned."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"oracle: {details}")
        self.status = code.name
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class GrpcOracleLink:
    """Opens a Verify stream on first use; ``close`` half-closes it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        session_id: str,
        grant: str = "",
        trace_context: Callable[[int | None], dict[str, str]] | None = None,
        timeout_s: float | None = None,
        round_timeout_s: float | None = None,
        allow_rescue: bool = False,
        commit: CommitTicket | None = None,
    ) -> None:
        """``allow_rescue``: let the oracle draft a block itself after a miss (greedy
        turns; see ``specdec.core.types.Rescue``). ``commit``: the gateway's ticket, under
        which the oracle proves each verdict (``specdec.rpc.commit_proof``)."""
        self._stub = oracle_pb2_grpc.OracleStub(channel)
        self._session_id = session_id
        self._grant = grant
        # The trace context of a round (None: of the turn, for the open message).
        self._trace_context = trace_context or _no_trace_context
        self._timeout_s = timeout_s  # the whole stream's deadline
        # Each exchange (open -> opened, block -> verdict): a stalled link or a hung oracle
        # sends nothing at all, and only a deadline per exchange notices it.
        self._round_timeout_s = round_timeout_s
        self._call: grpc.aio.StreamStreamCall | None = None
        # Pipelined verifies overlap: requests go out, and answers are read, in call order.
        self._writing = asyncio.Lock()
        self._reading = asyncio.Lock()
        # Why this link cancelled its call (a stalled exchange): the other exchanges in
        # flight on it then fail for the same reason, not as "cancelled".
        self._broken: OracleRpcError | None = None
        self._allow_rescue = allow_rescue
        self._commit = commit
        # Rescue: what the next follow-up response on the stream (a rescue decision,
        # a rescue block's verdict) resolves. Whichever reads it first routes it: a
        # reader started for it, or an exchange in flight (which then reads on). One
        # read before the verdict it follows was parsed waits in ``_early``.
        self._expect: asyncio.Future[Any] | None = None
        self._early: deque[oracle_pb2.VerifyResponse] = deque()
        self._followers: set[asyncio.Task[None]] = set()
        self.oracle_id = ""

    async def _exchange(
        self,
        request: oracle_pb2.VerifyRequest | None,
        follow_up: asyncio.Future[Any] | None = None,
    ) -> oracle_pb2.VerifyResponse | None:
        """Send ``request`` and read its answer; None: read the follow-up response that
        resolves ``follow_up`` (returns None, or what came instead of it)."""
        call = self._call  # (close() may drop it while a pipelined exchange waits)
        assert call is not None
        # Not wait_for: on timeout it waits for the cancelled exchange to end, and grpc's
        # send on a dead transport may never end. The call is cancelled instead.
        sending = asyncio.ensure_future(self._send(request, follow_up))
        sending.add_done_callback(_consume)  # its failure is read below, or nobody's concern
        try:
            await asyncio.wait({sending}, timeout=self._round_timeout_s)
        finally:
            if not sending.done():  # timed out, or this turn was cancelled
                call.cancel()
                sending.cancel()
        if not sending.done():
            if self._broken is None:
                self._broken = OracleRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no answer within {self._round_timeout_s}s: the oracle or the link to it "
                    "stalled",
                )
            raise self._broken
        if sending.cancelled():
            # Another exchange of this link gave up on the call, or grpc cancelled it (its
            # channel closed), not us.
            raise self._broken or OracleRpcError(
                grpc.StatusCode.CANCELLED, "the Verify stream was cancelled"
            )
        try:
            response = sending.result()
        except grpc.aio.AioRpcError as exc:
            call.cancel()  # a failed stream is not closed gracefully: see close()
            details = exc.details() or exc.code().name
            raise OracleRpcError(_link_status(exc.code(), details), details) from exc
        if response is None:
            return None
        if response is grpc.aio.EOF:
            code, details = grpc.StatusCode.UNAVAILABLE, "stream ended"
            with contextlib.suppress(TimeoutError):  # a status that never comes: as gone
                code, details = await asyncio.wait_for(_status(call), CLOSE_GRACE_S)
            call.cancel()
            if code in (None, grpc.StatusCode.OK):  # ended without a verdict: as good as gone
                code = grpc.StatusCode.UNAVAILABLE
            raise OracleRpcError(_link_status(code, details), details or "stream ended")
        return response  # type: ignore[no-any-return]

    async def _send(
        self, request: oracle_pb2.VerifyRequest | None, follow_up: asyncio.Future[Any] | None = None
    ) -> Any:
        """Write ``request`` and read its answer, routing follow-up responses read on the
        way; None: read the follow-up that resolves ``follow_up`` (None if one was read
        for it already)."""
        call = self._call  # (close() may drop it while a pipelined exchange waits)
        assert call is not None
        if request is not None:
            try:
                async with self._writing:
                    await call.write(request)
            except asyncio.InvalidStateError:
                return grpc.aio.EOF  # the stream already ended (link dropped): its status says why
        async with self._reading:
            while True:
                if request is None and follow_up is not self._expect:
                    return None  # an exchange read it
                response = await call.read()
                if not _follow_up(response):
                    return response
                self._route(response)
                if request is None:
                    return None

    def _result(self, verdict: oracle_pb2.VerifyVerdict) -> VerifyResult:
        """The verdict as the loop sees it, with a future for its rescue decision if one
        is pending."""
        decision: asyncio.Future[Rescue | None] | None = None
        if verdict.rescue_pending:
            decision = asyncio.get_running_loop().create_future()
            self._follow(decision)
        return convert.verify_result_from_pb(verdict, decision)

    def _follow(self, future: asyncio.Future[Any]) -> None:
        """The next follow-up response on the stream resolves ``future``."""
        self._expect = future
        if self._early:
            self._route(self._early.popleft())
            return
        task = asyncio.ensure_future(self._read_follow_up(future))
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    def _route(self, response: oracle_pb2.VerifyResponse) -> None:
        """Resolve the expected future with a follow-up response: a decision (None, or the
        oracle's block, whose verdict is then expected) or a rescue block's verdict."""
        future, self._expect = self._expect, None
        if future is None:
            self._early.append(response)
            return
        value: Rescue | VerifyResult | None = None
        if response.WhichOneof("kind") == "rescue":
            block = convert.rescue_block_from_pb(response.rescue)
            if block is not None:
                follow: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
                value = Rescue(block, follow)
                self._follow(follow)
        else:
            value = self._result(response.verdict)
        if not future.done():
            future.set_result(value)

    async def _read_follow_up(self, future: asyncio.Future[Any]) -> None:
        """Read the follow-up response for ``future`` when no exchange in flight does."""
        if self._call is None:
            return  # the turn is over (close() came first)
        try:
            response = await self._exchange(None, future)
        except Exception as exc:  # the stream failed: the loop learns it from ``future``
            if not future.done():
                future.set_exception(exc)
            return
        if response is not None and not future.done():  # an answer to no request
            future.set_exception(
                OracleRpcError(
                    grpc.StatusCode.INTERNAL,
                    "the oracle owed a rescue decision or a rescue block's verdict, and "
                    f"sent a `{response.WhichOneof('kind')}` instead",
                )
            )

    async def open(self, tokens: list[int], params: SamplingParams, seed: int) -> OpenResult:
        self._call = self._stub.Verify(timeout=self._timeout_s)
        request = oracle_pb2.VerifyRequest(
            open=oracle_pb2.OpenVerify(
                session_id=self._session_id,
                token_ids=tokens,
                sampling=convert.sampling_to_pb(params),
                seed=seed,
                grant=self._grant,
                allow_rescue=self._allow_rescue,
                commit=convert.ticket_to_pb(self._commit),
            ),
            trace_context=self._trace_context(None),
        )
        response = await self._exchange(request)
        assert response is not None
        opened = convert.opened_from_pb(response.opened)
        self.oracle_id = opened.oracle_id
        return opened

    async def verify(
        self,
        round_index: int,
        base_length: int,
        block: DraftBlock,
        draft_ns: int,
        assumed: tuple[int, ...] = (),
        last_alternative: bool = False,
    ) -> VerifyResult:
        request = oracle_pb2.VerifyRequest(
            block=oracle_pb2.VerifyBlock(
                round=round_index,
                base_length=base_length,
                token_ids=list(block.token_ids),
                draft_distributions=[convert.sparse_to_pb(q) for q in block.q or ()],
                draft_ns=draft_ns,
                assumed_token_ids=list(assumed),
                last_alternative=last_alternative,
            ),
            trace_context=self._trace_context(round_index),
        )
        response = await self._exchange(request)
        assert response is not None
        return self._result(response.verdict)

    async def close(self) -> None:
        """Half-close the stream and return at once; the rest happens in the background.

        Nothing here waits on the transport: on a broken connection grpc's half-close
        (``done_writing``) can wait forever, and the turn must fail over, not hang.
        """
        if self._call is not None:
            # The oracle ends the stream once our side is closed; read that end in the
            # background so the RPC finishes OK and its client span ends.
            task = asyncio.ensure_future(_finish(self._call))
            _closing.add(task)
            task.add_done_callback(_closing.discard)
            self._call = None
            if self._expect is not None:
                self._expect.cancel()
            for reader in self._followers:
                reader.cancel()


def _follow_up(response: Any) -> bool:
    """A rescue decision or a rescue block's verdict: no request's answer."""
    if response is grpc.aio.EOF:
        return False
    kind = response.WhichOneof("kind")
    return kind == "rescue" or (kind == "verdict" and response.verdict.rescued)


def _no_trace_context(round_index: int | None) -> dict[str, str]:
    return {}


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned exchange's outcome (no 'exception never retrieved' noise)."""
    if not task.cancelled():
        task.exception()


def _link_status(code: grpc.StatusCode, details: str) -> grpc.StatusCode:
    """The status a failed exchange stands for.

    INTERNAL "Internal error from Core" is grpc core's answer to a read or write racing a
    transport that just died (a reset link; pipelined exchanges overlap), as the error of
    the operation or as the stream's final status: the link broke, the oracle did not fail.
    """
    if code == grpc.StatusCode.INTERNAL and details == CORE_INTERNAL:
        return grpc.StatusCode.UNAVAILABLE
    return code


async def _status(call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode, str]:
    return await call.code(), await call.details()


async def _finish(call: grpc.aio.StreamStreamCall) -> None:
    async def drain() -> None:
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    # Not wait_for: it would wait for the cancelled drain, which a dead transport can block.
    closing = asyncio.ensure_future(drain())
    try:
        await asyncio.wait({closing}, timeout=CLOSE_GRACE_S)
    finally:
        call.cancel()
        closing.cancel()
        closing.add_done_callback(_consume)
