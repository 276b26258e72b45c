"""The draft worker: takes assignments from the gateway and drives draft -> verify rounds.

For each assignment it dials the assigned oracle's Verify stream and runs the
core loop (``specdec.core.loop.run_turn``) with a model drafter, reporting every
commit back to the gateway over the worker's Connect stream. Draft KV caches
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
from specdec.core.loop import run_turn
from specdec.core.stopping import StopChecker
from specdec.core.types import OpenResult, RoundReport, Turn
from specdec.drafters.controlled import ControlledDrafter, References
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.proposers import ThreadProposer
from specdec.engine.models import LoadedModel
from specdec.rpc import convert
from specdec.rpc.channels import open_channel
from specdec.rpc.oracle_link import GrpcOracleLink, OracleRpcError
from specdec.rpc.registration import GatewayConnection
from specdec.rpc.security import ChannelSecurity
from specdec.telemetry.rounds import round_tracer
from specdec.v1 import gateway_pb2, oracle_pb2_grpc, registry_pb2

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
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._adaptive = AdaptiveMemory()  # learnt costs, per oracle and pipeline depth

    # -- registration --------------------------------------------------------

    def registration(self) -> registry_pb2.RegisterWorker:
        return registry_pb2.RegisterWorker(
            worker_id=self.worker_id,
            kind=gateway_pb2.WORKER_KIND_DRAFT,
            model=self.model.name,
            vocab_fingerprint=self.model.fingerprint,
            max_sessions=self.config.max_sessions,
            device=str(self.model.device),
            vocab_size=self.model.vocab_size,
            max_context=self.model.max_context,
            eos_token_ids=list(self.model.eos_token_ids),
        )

    def load(self) -> registry_pb2.WorkerLoad:
        return registry_pb2.WorkerLoad(
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

    async def on_message(
        self, message: registry_pb2.ConnectResponse, connection: GatewayConnection
    ) -> None:
        kind = message.WhichOneof("kind")
        if kind == "assignment":
            assignment = message.assignment
            task = asyncio.create_task(self._run(assignment, connection))
            self._tasks[assignment.assignment_id] = task
            task.add_done_callback(lambda _: self._tasks.pop(assignment.assignment_id, None))
        elif kind == "cancel":
            running = self._tasks.get(message.cancel.assignment_id)
            if running is not None:
                running.cancel()
        elif kind == "release":
            self._drafters.pop(message.release.session_id, None)

    async def on_disconnect(self) -> None:
        """The gateway is gone: it fails these turns over, so stop working on them."""
        for task in list(self._tasks.values()):
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

    def _oracle(self, address: str) -> oracle_pb2_grpc.OracleStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.security)
        return oracle_pb2_grpc.OracleStub(channel)

    async def _run(self, a: registry_pb2.Assignment, connection: GatewayConnection) -> None:
        # Rounds are traced under the gateway's request (None when telemetry is off).
        rounds = round_tracer(a.session_id, a.trace_context, draft_metrics=True)
        link = GrpcOracleLink(
            self._oracle(a.oracle_address),
            a.session_id,
            a.grant,
            trace_context=rounds.trace_context if rounds is not None else None,
            # A stalled link sends nothing: only a deadline per round notices it.
            round_timeout_s=self.config.verify_timeout_s or None,
            allow_rescue=a.rescue if a.HasField("rescue") else self.config.rescue,
        )
        try:
            params = convert.sampling_from_pb(a.sampling)
            drafter = self._drafter(a.session_id)
            drafter.seed = a.seed
            decode = self.model.decode if params.stop else None
            turn = Turn(
                context=list(a.token_ids),
                prompt_tokens=a.prompt_tokens,
                params=params,
                seed=a.seed,
                k=a.num_speculative_tokens,
                # EOS is among the stop ids unless the request set ignore_eos.
                stop=StopChecker(
                    params,
                    [t for t in self.model.eos_token_ids if t in params.stop_token_ids],
                    decode,
                ),
                max_context=a.max_context or self.model.max_context,
                draft_ahead=self.config.draft_ahead,
                pipeline_depth=a.pipeline_depth or self.config.pipeline_depth,
                branches=a.branches if a.HasField("branches") else self.config.branches,
            )
            base = [len(a.token_ids)]

            async def on_commit(tokens: list[int], report: RoundReport) -> None:
                await connection.send(
                    registry_pb2.ConnectRequest(
                        commit=registry_pb2.AssignmentCommit(
                            assignment_id=a.assignment_id,
                            base_length=base[0],
                            token_ids=tokens,
                            round=_round_to_pb(report),
                        )
                    )
                )
                base[0] += len(tokens)

            async def on_open(opened: OpenResult) -> None:
                await connection.send(
                    registry_pb2.ConnectRequest(
                        opened=registry_pb2.AssignmentOpened(
                            assignment_id=a.assignment_id,
                            cached_tokens=opened.cached_tokens,
                            prefilled_tokens=opened.computed_tokens,
                            prefill_ns=opened.prefill_ns,
                            oracle_id=opened.oracle_id,
                        )
                    )
                )

            proposer = ThreadProposer(drafter, self._executor)
            # Costs differ per oracle and with pipelining: learn them per pair.
            key = f"{a.oracle_id}:{turn.pipeline_depth}"
            policy = self._adaptive.policy(key, turn.k) if a.adaptive and turn.k else None
            reason, stats = await run_turn(
                link, proposer, turn, on_commit, policy=policy, on_open=on_open, observer=rounds
            )
            if policy is not None:
                self._adaptive.remember(key, policy)
            finished = registry_pb2.AssignmentFinished(
                assignment_id=a.assignment_id,
                finish_reason=convert.finish_reason_to_pb(reason),  # type: ignore[arg-type]
                stats=convert.stats_to_pb(stats, oracle_id=link.oracle_id, draft_id=self.worker_id),
            )
            await connection.send(registry_pb2.ConnectRequest(finished=finished))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if rounds is not None:
                rounds.close(exc)
            await connection.send(registry_pb2.ConnectRequest(failed=_failure(a, exc)))
        finally:
            await link.close()
            if rounds is not None:
                rounds.close(sys.exc_info()[1])  # cancelled, or nothing open any more


def _round_to_pb(report: RoundReport) -> registry_pb2.RoundReport:
    return registry_pb2.RoundReport(
        round=report.round,
        proposed=report.proposed,
        accepted=report.accepted,
        is_bonus=report.is_bonus,
        draft_ns=report.draft_ns,
        verify_ns=report.verify_ns,
        network_ns=report.network_ns,
        queue_ns=report.queue_ns,
        drafted_ahead=report.drafted_ahead,
        pipelined=report.pipelined,
        skipped_blocks=report.skipped_blocks,
        branch=report.branch,
        rescued=report.rescued,
    )


def _failure(a: registry_pb2.Assignment, exc: Exception) -> registry_pb2.AssignmentFailed:
    if isinstance(exc, OracleRpcError):
        code = exc.code
        message = f"oracle {a.oracle_id}: {exc}"
    elif isinstance(exc, SpecdecError):
        code = getattr(grpc.StatusCode, exc.status, grpc.StatusCode.INTERNAL)
        message = str(exc)
    else:
        log.exception("assignment %s failed", a.assignment_id)
        code, message = grpc.StatusCode.INTERNAL, f"draft error: {type(exc).__name__}: {exc}"
    return registry_pb2.AssignmentFailed(
        assignment_id=a.assignment_id, status_code=code.value[0], message=message
    )
