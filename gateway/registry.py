"""Registered workers and the WorkerRegistry.Connect stream they dial into.

Drafts and oracles dial OUT to the gateway and keep one Connect stream open;
the worker is alive exactly as long as that stream. Assignments (drafts) and
cancellations travel down it; commits and results travel up it and are routed
to the Generate call waiting on that assignment. The stream's edge is
``RegistryServicer``: the registry itself keeps and routes the core's
``specdec.core.messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gateway.identity import WorkerIdentity, check_role, check_takeover, identity_of
from specdec.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    SpecdecError,
    quoted,
)
from specdec.core.messages import (
    AssignmentFailed,
    AssignmentReport,
    CommitKey,
    GatewayMessage,
    Registered,
    ReleaseDraftSession,
    ReleaseSessions,
    WorkerKind,
    WorkerLoad,
    WorkerMessage,
    WorkerRegistration,
)
from specdec.rpc import convert
from specdec.rpc.channels import open_channel
from specdec.rpc.commit_proof import new_commit_key
from specdec.rpc.grants import GrantSigner
from specdec.rpc.security import ChannelSecurity
from specdec.v1 import oracle_pb2, oracle_pb2_grpc, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

LOAD_INTERVAL_MS = 1000
MAX_WORKER_ID_CHARS = 128
# A worker reports its load every LOAD_INTERVAL_MS; one silent for this long is hung (or
# its link stalled) even though its stream is open: it gets no new turns until it speaks.
SILENT_AFTER_S = 3 * LOAD_INTERVAL_MS / 1000


@dataclass(eq=False)
class Worker:
    """A connected draft or oracle."""

    info: WorkerRegistration
    outbox: asyncio.Queue[GatewayMessage] = field(default_factory=asyncio.Queue)
    registered_at: float = field(default_factory=time.monotonic)
    assignments: set[str] = field(default_factory=set)  # in flight on this worker
    reported_sessions: int = 0
    kv_cache_bytes: int = 0
    channel: grpc.aio.Channel | None = None  # oracles: the gateway's channel to it
    alive: bool = True
    last_seen: float = field(default_factory=time.monotonic)  # its last message, any kind
    security: ChannelSecurity | None = None  # how the gateway dials it (TLS, token)
    identity: WorkerIdentity = field(default_factory=WorkerIdentity)  # what it proved
    commit_key: CommitKey | None = None  # oracles: what they prove their commits with
    # Set (with the reason) when the gateway ends its stream: replaced, or caught lying.
    dismissed: asyncio.Event = field(default_factory=asyncio.Event)
    dismissal: str = ""

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def is_oracle(self) -> bool:
        return self.info.kind is WorkerKind.ORACLE

    @property
    def load(self) -> int:
        """Sessions it serves now, as far as the gateway knows."""
        return max(len(self.assignments), self.reported_sessions)

    @property
    def responsive(self) -> bool:
        return time.monotonic() - self.last_seen < SILENT_AFTER_S

    @property
    def has_capacity(self) -> bool:
        return self.info.max_sessions <= 0 or len(self.assignments) < self.info.max_sessions

    def oracle_channel(self) -> grpc.aio.Channel:
        """The gateway's channel to this oracle (opened on first use)."""
        if self.channel is None:
            self.channel = open_channel(self.info.address, self.security)
        return self.channel

    def oracle_stub(self) -> oracle_pb2_grpc.OracleStub:
        return oracle_pb2_grpc.OracleStub(self.oracle_channel())

    async def reachable(self, timeout_s: float = 2.0) -> bool:
        """Whether this oracle answers GetInfo on the gateway's own channel to it."""
        return await self._ask(
            lambda stub: stub.GetInfo(oracle_pb2.GetInfoRequest(), timeout=timeout_s)
        )

    async def release_session(self, session_id: str, timeout_s: float = 2.0) -> None:
        """Make this worker forget the session's KV cache: an oracle by ReleaseSession, a
        draft by a message down its stream (best effort: the caches are soft state)."""
        if not self.is_oracle:
            self.outbox.put_nowait(ReleaseDraftSession(session_id))
            return
        request = oracle_pb2.ReleaseSessionRequest(session_id=session_id)
        await self._ask(lambda stub: stub.ReleaseSession(request, timeout=timeout_s))

    async def _ask(self, call: Callable[[oracle_pb2_grpc.OracleStub], Any]) -> bool:
        """Make one call to this oracle: whether it answered.

        The call runs as a task of its own. When the oracle unregisters, closing its
        channel cancels the call, and grpc raises that as CancelledError in whatever
        awaits it: awaited directly, it would end the caller's turn as if the client had
        cancelled it, with no status sent. Here it reads as no answer.
        """
        if not self.alive:
            return False  # its channel is closed, or about to be
        answer = asyncio.ensure_future(call(self.oracle_stub()))
        try:
            await asyncio.wait({answer})
        finally:
            answer.cancel()  # no-op once done; the caller's own cancellation otherwise
        if answer.cancelled():
            return False
        error = answer.exception()
        if error is not None:
            log.debug("oracle %s did not answer: %s", self.worker_id, error)
        return error is None

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.registered_at


class Registry:
    """The live workers, and the queues of assignments in flight."""

    def __init__(
        self,
        required_fingerprint: str | None = None,
        security: ChannelSecurity | None = None,
        grants: GrantSigner | None = None,
        commit_secret: str = "",
    ) -> None:
        self._workers: dict[str, Worker] = {}
        self._waiting: dict[str, asyncio.Queue[AssignmentReport]] = {}
        self._required_fingerprint = required_fingerprint
        self._security = security  # dialling oracles: TLS material and worker token
        self._grants = grants
        self._commit_secret = commit_secret  # "": a random commit key per oracle registration
        self.changed = asyncio.Condition()

    def grant(self, session_id: str, oracle: Worker) -> str:
        """The OpenVerify.grant letting ``oracle`` serve ``session_id`` ("" without grants)."""
        return self._grants.issue(session_id, oracle.worker_id) if self._grants else ""

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def oracles(self) -> list[Worker]:
        return [w for w in self._workers.values() if w.is_oracle]

    def drafts(self) -> list[Worker]:
        return [w for w in self._workers.values() if not w.is_oracle]

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    async def register(
        self, info: WorkerRegistration, identity: WorkerIdentity | None = None
    ) -> Worker:
        """Add a worker; ALREADY_EXISTS when a live worker has its id and it does not
        prove to be that worker (``gateway.identity``)."""
        identity = identity or WorkerIdentity()
        if not info.worker_id or len(info.worker_id) > MAX_WORKER_ID_CHARS:
            raise InvalidArgument(
                f"RegisterWorker.worker_id must have 1 to {MAX_WORKER_ID_CHARS} characters, "
                f"got {len(info.worker_id)}"
            )
        check_role(info, identity)
        if info.kind is WorkerKind.ORACLE:
            if not info.address:
                raise InvalidArgument("an oracle must register the address it listens on")
            if self._required_fingerprint and info.vocab_fingerprint != self._required_fingerprint:
                raise FailedPrecondition(
                    f"oracle {info.worker_id!r} has vocabulary {info.vocab_fingerprint}, but the "
                    f"gateway's tokenizer is {self._required_fingerprint}: point the gateway's "
                    "--tokenizer at the oracle's model"
                )
        old = self._workers.get(info.worker_id)
        if old is not None:
            try:
                check_takeover(info.worker_id, old.identity, identity, old.uptime_s)
            except SpecdecError:
                log.warning(
                    "refused a registration under the id of live worker %s (it proved %s; "
                    "the live one %s)",
                    quoted(info.worker_id),
                    identity,
                    old.identity,
                )
                raise
            log.info("worker %s re-registered; dropping its previous connection", info.worker_id)
            await self.dismiss(old, "the same worker registered again on a new stream")
        worker = Worker(info, security=self._security, identity=identity)
        if worker.is_oracle:
            worker.commit_key = new_commit_key(info.worker_id, self._commit_secret)
        self._workers[info.worker_id] = worker
        log.info(
            "%s %s registered (model %s, %s)",
            "oracle" if worker.is_oracle else "draft",
            info.worker_id,
            info.model,
            info.address or info.device,
        )
        async with self.changed:
            self.changed.notify_all()
        return worker

    async def unregister(self, worker: Worker) -> None:
        if self._workers.get(worker.worker_id) is worker:
            del self._workers[worker.worker_id]
        if not worker.alive:
            return
        worker.alive = False
        log.info("worker %s is gone", worker.worker_id)
        # Every turn it was serving learns it at once, to fail over.
        for assignment_id in list(worker.assignments):
            self._deliver(
                AssignmentFailed(
                    assignment_id, "UNAVAILABLE", f"worker {worker.worker_id} disconnected"
                )
            )
        if worker.channel is not None:
            with contextlib.suppress(Exception):
                await worker.channel.close()

    async def dismiss(self, worker: Worker, reason: str) -> None:
        """Unregister ``worker`` and end its Connect stream (PERMISSION_DENIED, ``reason``)."""
        worker.dismissal = reason
        worker.dismissed.set()
        await self.unregister(worker)

    # -- assignments -------------------------------------------------------

    def expect(self, assignment_id: str, worker: Worker) -> asyncio.Queue[AssignmentReport]:
        queue: asyncio.Queue[AssignmentReport] = asyncio.Queue()
        self._waiting[assignment_id] = queue
        worker.assignments.add(assignment_id)
        return queue

    def forget(self, assignment_id: str, worker: Worker) -> None:
        self._waiting.pop(assignment_id, None)
        worker.assignments.discard(assignment_id)

    def _deliver(self, report: AssignmentReport) -> None:
        queue = self._waiting.get(report.assignment_id)
        if queue is not None:
            queue.put_nowait(report)

    def on_worker_message(self, worker: Worker, message: WorkerMessage | None) -> None:
        worker.last_seen = time.monotonic()
        if isinstance(message, WorkerLoad):
            worker.reported_sessions = message.active_sessions
            worker.kv_cache_bytes = message.kv_cache_bytes
        elif message is not None and not isinstance(message, WorkerRegistration):
            self._deliver(message)
        else:
            log.warning("worker %s sent an unexpected %s", worker.worker_id, message)


class RegistryServicer(registry_pb2_grpc.WorkerRegistryServicer):
    """Thin: the Connect stream of one worker.

    ``known``: which of some session ids are live sessions. A worker registers with the
    sessions whose KV it caches; it is told to release the others (its KV lease on
    them ended: closed or expired while it was away, or lost with the gateway).
    """

    def __init__(
        self,
        registry: Registry,
        known: Callable[[Sequence[str]], Awaitable[set[str]]] | None = None,
    ) -> None:
        self._registry = registry
        self._known = known

    async def Connect(
        self, request_iterator: AsyncIterator[registry_pb2.ConnectRequest], context: Any
    ) -> AsyncIterator[registry_pb2.ConnectResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("register"):
            raise InvalidArgument("the first message of Connect must be RegisterWorker")
        info = convert.registration_from_pb(first.register)
        worker = await self._registry.register(info, identity_of(context))
        reader = asyncio.create_task(self._read(worker, request_iterator))
        dismissed = asyncio.ensure_future(worker.dismissed.wait())
        try:
            yield convert.gateway_message_to_pb(Registered(LOAD_INTERVAL_MS, worker.commit_key))
            cached = worker.info.cached_session_ids
            if cached and self._known is not None:
                try:
                    unknown = set(cached) - await self._known(cached)
                except SpecdecError as exc:  # the store is down: keep the caches for now
                    log.warning("no KV lease check for %s: %s", worker.worker_id, exc)
                    unknown = set()
                if unknown:
                    log.info(
                        "worker %s releases %d unknown sessions", worker.worker_id, len(unknown)
                    )
                    release = ReleaseSessions(tuple(sorted(unknown)))
                    yield convert.gateway_message_to_pb(release)
            while True:
                getter = asyncio.ensure_future(worker.outbox.get())
                done, _ = await asyncio.wait(
                    {getter, reader, dismissed}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    if dismissed in done:
                        raise PermissionDenied(worker.dismissal)
                    error = None if reader.cancelled() else reader.exception()
                    if error is not None:
                        raise error  # a message the request guard refused
                    return  # the worker closed its side
                yield convert.gateway_message_to_pb(getter.result())
        finally:
            reader.cancel()
            dismissed.cancel()
            await self._registry.unregister(worker)

    async def _read(
        self, worker: Worker, request_iterator: AsyncIterator[registry_pb2.ConnectRequest]
    ) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for pb in request_iterator:
                try:
                    message = convert.worker_message_from_pb(pb)
                except SpecdecError as exc:  # a second registration, malformed
                    log.warning("worker %s sent a bad message: %s", worker.worker_id, exc)
                    message = None
                self._registry.on_worker_message(worker, message)
