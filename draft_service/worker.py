"""The draft worker: takes assignments from the gateway and drives draft -> verify rounds.

For each assignment it dials the assigned oracle's Verify stream and runs the
turn (``specdec.core.wiring.run_assignment``) with a model drafter, reporting every
commit back to the gateway over the worker's Connect stream (which converts to and
from protobuf: this module sees only ``specdec.core.messages``). Draft KV caches
are kept per session (LRU) so the next turn of a session drafts without
re-prefilling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import grpc

from draft_service.config import DraftConfig
from specdec.core.adaptive import AdaptiveMemory
from specdec.core.errors import SpecdecError
from specdec.core.messages import (
    Assignment,
    AssignmentFailed,
    AssignmentFinished,
    CancelAssignment,
    GatewayMessage,
    ReleaseDraftSession,
    ReleaseSessions,
    WorkerKind,
    WorkerLoad,
    WorkerRegistration,
)
from specdec.core.wiring import run_assignment
from specdec.drafters.controlled import ControlledDrafter, References
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.proposers import ThreadProposer
from specdec.engine.models import LoadedModel
from specdec.rpc.channels import open_channel
from specdec.rpc.oracle_link import GrpcOracleLink, OracleRpcError
from specdec.rpc.registration import GatewayConnection
from specdec.rpc.security import ChannelSecurity
from specdec.telemetry.rounds import round_tracer

log = logging.getLogger(__name__)


class DraftWorker:
    """State of one draft service: its model, per-session drafters, running turns."""

    def __init__(
        self,
        config: DraftConfig,
        model: LoadedModel,
        worker_id: str,
        security: ChannelSecurity | None = None,  # TLS material and token to the oracles
    ) -> None:
        self.config = config
        self.security = security
        self.model = model
        self.worker_id = worker_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-model")
        self._drafters: OrderedDict[str, ModelDrafter | ControlledDrafter] = OrderedDict()
        # Benchmarks only: a drafter of chosen acceptance; each session drafts (sleeps)
        # in a thread of its own, as on a device of its own.
        self._references: References | None = None
        if config.bench_acceptance >= 0:
            self._references = References.load(config.bench_reference)
            self._executor = ThreadPoolExecutor(
                max_workers=config.max_sessions, thread_name_prefix="bench-draft"
            )
            log.warning(
                "BENCHMARK DRAFTER: proposing the oracle's greedy output at acceptance %.2f, "
                "%.2f ms a token (--bench-acceptance); not a real draft",
                config.bench_acceptance,
                config.bench_step_ms,
            )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._origin: dict[str, GatewayConnection] = {}  # the gateway each turn came from
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._adaptive = AdaptiveMemory()  # learnt costs, per oracle and pipeline depth

    # -- registration --------------------------------------------------------

    def registration(self) -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=self.worker_id,
            kind=WorkerKind.DRAFT,
            model=self.model.name,
            vocab_fingerprint=self.model.fingerprint,
            max_sessions=self.config.max_sessions,
            device=str(self.model.device),
            vocab_size=self.model.vocab_size,
            max_context=self.model.max_context,
            eos_token_ids=tuple(self.model.eos_token_ids),
            cached_session_ids=tuple(self._drafters),
        )

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            active_sessions=len(self._tasks),
            kv_cache_bytes=sum(
                d.cache.memory_bytes()
                for d in self._drafters.values()
                if isinstance(d, ModelDrafter)
            ),
        )

    @property
    def active_turns(self) -> int:
        return len(self._tasks)

    async def on_message(self, message: GatewayMessage, connection: GatewayConnection) -> None:
        if isinstance(message, Assignment):
            task = asyncio.create_task(self._run(message, connection))
            self._tasks[message.assignment_id] = task
            self._origin[message.assignment_id] = connection
            task.add_done_callback(lambda _: self._forget(message.assignment_id))
        elif isinstance(message, CancelAssignment):
            running = self._tasks.get(message.assignment_id)
            if running is not None:
                running.cancel()
        elif isinstance(message, ReleaseDraftSession):
            self._drafters.pop(message.session_id, None)
        elif isinstance(message, ReleaseSessions):  # no gateway knows them any more
            for session_id in message.session_ids:
                self._drafters.pop(session_id, None)

    def _forget(self, assignment_id: str) -> None:
        self._tasks.pop(assignment_id, None)
        self._origin.pop(assignment_id, None)

    async def on_disconnect(self, connection: GatewayConnection | None = None) -> None:
        """A gateway is gone (None: every one): it fails its turns over, or a client
        resumes them on another replica, so stop working on them."""
        for assignment_id, task in list(self._tasks.items()):
            if connection is None or self._origin.get(assignment_id) is connection:
                task.cancel()

    async def close(self) -> None:
        await self.on_disconnect()
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- one assignment -------------------------------------------------------

    def _drafter(self, session_id: str) -> ModelDrafter | ControlledDrafter:
        drafter = self._drafters.pop(session_id, None)
        if drafter is None and self._references is not None:
            drafter = ControlledDrafter(
                self._references,
                self.config.bench_acceptance,
                self.model.vocab_size,
                step_s=self.config.bench_step_ms / 1000,
            )
        elif drafter is None:
            drafter = ModelDrafter(
                self.model,
                max_support=self.config.max_support,
                lean=self.config.lean_forward,
            )
        self._drafters[session_id] = drafter  # most recently used last
        while len(self._drafters) > self.config.max_cached_sessions:
            self._drafters.popitem(last=False)
        return drafter

    def _oracle(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.security)
        return channel

    async def _run(self, a: Assignment, connection: GatewayConnection) -> None:
        # Rounds are traced under the gateway's request (None when telemetry is off).
        rounds = round_tracer(a.session_id, a.trace_context, draft_metrics=True)
        defaults = self.config.speculation()
        link = GrpcOracleLink(
            self._oracle(a.oracle_address),
            a.session_id,
            a.grant,
            trace_context=rounds.trace_context if rounds is not None else None,
            # A stalled link sends nothing: only a deadline per round notices it.
            round_timeout_s=self.config.verify_timeout_s or None,
            allow_rescue=bool(a.speculation.over(defaults).rescue),
            commit=a.commit,
        )
        try:
            drafter = self._drafter(a.session_id)
            drafter.seed = a.seed
            reason, stats = await run_assignment(
                link,
                ThreadProposer(drafter, self._executor),
                a,
                connection.send,
                defaults=defaults,
                eos_token_ids=self.model.eos_token_ids,
                decode=self.model.decode,
                max_context=self.model.max_context,
                memory=self._adaptive,
                observer=rounds,
            )
            finished = AssignmentFinished(
                a.assignment_id, reason, stats, oracle_id=link.oracle_id, draft_id=self.worker_id
            )
            await connection.send(finished)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if rounds is not None:
                rounds.close(exc)
            await connection.send(_failure(a, exc))
        finally:
            await link.close()
            if rounds is not None:
                rounds.close(sys.exc_info()[1])  # cancelled, or nothing open any more


def _failure(a: Assignment, exc: Exception) -> AssignmentFailed:
    if isinstance(exc, OracleRpcError):
        return AssignmentFailed(a.assignment_id, exc.status, f"oracle {a.oracle_id}: {exc}")
    if isinstance(exc, SpecdecError):
        return AssignmentFailed(a.assignment_id, exc.status, str(exc))
    log.exception("assignment %s failed", a.assignment_id)
    return AssignmentFailed(
        a.assignment_id, "INTERNAL", f"draft error: {type(exc).__name__}: {exc}"
    )
