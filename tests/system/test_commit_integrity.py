"""A draft holding the worker token cannot write anyone's output: only the oracle commits.

Real gateway and oracle processes, with the documented security settings (application
and worker tokens, grants and their secret). The drafts are fakes in this process:
they hold the worker token, speak the real protocol over real sockets, receive the
user's assignment, and lie, each in its own way: their own text, forged or missing
proofs, the right tokens without the oracle's proof, proofs replayed from another
attempt or session, tokens shifted or reordered, the oracle opened on another context
or sampling, the turn ended early. Every lie must be refused (the draft dismissed,
the turn failed over), and the user's output and the session's tokens must be exactly
the oracle's alone. An honest relay through the same fake is the control: it is used,
and its commits are applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from specdec.client import AsyncClient, Client
from specdec.core.errors import quoted
from specdec.core.messages import (
    Assignment,
    AssignmentCommitted,
    AssignmentFailed,
    AssignmentFinished,
    AssignmentReport,
    Registered,
    WorkerKind,
    WorkerRegistration,
)
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason
from specdec.core.types import DraftBlock, RoundReport
from specdec.launch import Cluster, cluster
from specdec.rpc import convert
from specdec.rpc.channels import open_channel
from specdec.rpc.oracle_link import CORE_INTERNAL, GrpcOracleLink
from specdec.rpc.security import ChannelSecurity
from specdec.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from tests.cluster_tools import reference

ALICE, WORKER = "alice-t0ken", "w0rker-t0ken"
GRANT_SECRET = "0123456789abcdef-grant-secret"
PROMPT = [1, 5, 9, 12]
NEW = 8  # tokens per turn

# A verdict as the oracle gave it: (base length, tokens, proof).
Commit = tuple[int, tuple[int, ...], bytes]


@dataclass
class Rig:
    cluster: Cluster
    oracle_path: Path
    fingerprint: str
    vocab_size: int

    @property
    def address(self) -> str:
        return self.cluster.address

    def expected(self, context: list[int] = PROMPT) -> list[int]:
        return reference(self.oracle_path, context, NEW)


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[Rig]:
    oracle_path = model_dir("llama", "oracle")
    with cluster(tmp_path_factory.mktemp("integrity")) as c:
        c.start_gateway(
            "--tokenizer", str(oracle_path), "--auth-tokens", f"alice:{ALICE}",
            "--worker-token", WORKER, "--grant-secret", GRANT_SECRET,
            "--worker-silence-s", "10",
        )  # fmt: skip
        c.start_oracle(
            oracle_path,
            "--auth-token",
            WORKER,
            "--grant-secret",
            GRANT_SECRET,
            oracle_id="oracle-i",
        )
        deadline = time.monotonic() + 300
        with Client(c.address, token=ALICE, timeout=5) as client:
            while True:
                with contextlib.suppress(grpc.RpcError):
                    oracles = [w for w in client.list_workers() if w.worker_id == "oracle-i"]
                    if oracles:
                        break
                assert time.monotonic() < deadline, c.services[-1].log()[-3000:]
                assert all(s.alive() for s in c.services), c.services[-1].log()[-3000:]
                time.sleep(0.2)
        yield Rig(c, oracle_path, oracles[0].vocab_fingerprint, 96)


# ---- the fake draft ------------------------------------------------------------------------

Strategy = Callable[["FakeDraft", Assignment], Awaitable[list[AssignmentReport]]]


@dataclass
class FakeDraft:
    """A draft holding the worker token: registers over the real Connect stream and
    answers every assignment with what ``strategy`` makes of it."""

    rig: Rig
    worker_id: str
    strategy: Strategy
    loot: dict[str, list[Commit]] = field(default_factory=dict)  # genuine verdicts it saw
    assignments: list[Assignment] = field(default_factory=list)
    ended: asyncio.Future[grpc.StatusCode] | None = None
    _outbox: asyncio.Queue[registry_pb2.ConnectRequest] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None

    async def connect(self) -> FakeDraft:
        registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ended = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve(registered))
        await asyncio.wait_for(registered, 30)
        return self

    async def _requests(self) -> AsyncIterator[registry_pb2.ConnectRequest]:
        me = WorkerRegistration(
            worker_id=self.worker_id,
            kind=WorkerKind.DRAFT,
            model="fake",
            vocab_fingerprint=self.rig.fingerprint,
            max_sessions=4,
            vocab_size=self.rig.vocab_size,
        )
        yield convert.worker_message_to_pb(me)
        while True:
            yield await self._outbox.get()

    async def _report_load(self) -> None:
        """A load report every half second keeps it responsive, as a real draft, until its
        first assignment: from then on it writes only its reports (a write racing the
        gateway's end of the stream can hide that end's status)."""
        while not self.assignments:
            await self._outbox.put(registry_pb2.ConnectRequest(load=registry_pb2.WorkerLoad()))
            await asyncio.sleep(0.5)

    async def _serve(self, registered: asyncio.Future[None]) -> None:
        assert self.ended is not None
        channel = open_channel(self.rig.address, ChannelSecurity(token=WORKER))
        code = grpc.StatusCode.OK
        load = asyncio.create_task(self._report_load())
        try:
            stub = registry_pb2_grpc.WorkerRegistryStub(channel)
            async for pb in stub.Connect(self._requests()):
                message = convert.gateway_message_from_pb(pb)
                if isinstance(message, Registered):
                    assert message.commit_key is None, "a draft was sent a commit key"
                    registered.set_result(None)
                elif isinstance(message, Assignment):
                    self.assignments.append(message)
                    for report in await self.strategy(self, message):
                        await self._outbox.put(convert.worker_message_to_pb(report))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INTERNAL and exc.details() == CORE_INTERNAL:
                code = self._gateway_said()
        finally:
            load.cancel()
            await channel.close()
            if not self.ended.done():
                self.ended.set_result(code)

    def _gateway_said(self) -> grpc.StatusCode:
        """The status the gateway ended this fake's stream with, from its own log: grpc core
        answers INTERNAL "Internal error from Core" to a write racing that end."""
        assert self.rig.cluster.gateway is not None
        gateway = self.rig.cluster.gateway.log()
        dismissed = f"refused a report of draft {quoted(self.worker_id)}" in gateway
        return grpc.StatusCode.PERMISSION_DENIED if dismissed else grpc.StatusCode.INTERNAL

    async def end(self, timeout_s: float = 10) -> grpc.StatusCode:
        """How the gateway ended its stream (waits up to ``timeout_s`` for it)."""
        assert self.ended is not None
        return await asyncio.wait_for(asyncio.shield(self.ended), timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def genuine(
        self,
        job: Assignment,
        rounds: int,
        *,
        context: tuple[int, ...] | None = None,
        params: SamplingParams | None = None,
    ) -> list[Commit]:
        """Verdicts of the real oracle (k = 0: one token each), with their proofs, for
        ``job``'s session and ticket; on ``context`` and ``params`` when given."""
        channel = open_channel(job.oracle_address, ChannelSecurity(token=WORKER))
        link = GrpcOracleLink(channel, job.session_id, job.grant, commit=job.commit)
        tokens = list(context or job.token_ids)
        try:
            await link.open(tokens, params or job.params, job.seed)
            base, commits = len(tokens), list[Commit]()
            for index in range(rounds):
                result = await link.verify(index, base, DraftBlock(()), 0)
                assert result.verdict is not None and result.proof
                commits.append((base, (result.verdict.next_token,), result.proof))
                base += 1
            return commits
        finally:
            await link.close()
            await channel.close()


def commit(
    job: Assignment, base: int, tokens: tuple[int, ...], proof: bytes
) -> AssignmentCommitted:
    report = RoundReport(
        round=0, k=0, proposed=0, accepted=0, is_bonus=False, committed=len(tokens),
        committed_length=base + len(tokens), draft_ns=0, verify_ns=0, network_ns=0, queue_ns=0,
    )  # fmt: skip
    return AssignmentCommitted(job.assignment_id, base, tokens, report, proof)


def relay(job: Assignment, commits: list[Commit]) -> list[AssignmentReport]:
    return [commit(job, base, tokens, proof) for base, tokens, proof in commits]


# ---- the lies ----------------------------------------------------------------------------------


async def honest(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """The control: every verdict relayed as the oracle gave it."""
    commits = await fake.genuine(job, NEW)
    fake.loot[job.session_id] = commits
    return relay(job, commits)


async def own_text(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """Never asks the oracle: commits its own tokens."""
    return [commit(job, len(job.token_ids), (7, 7, 7), b"")]


async def forged_proof(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """The oracle's tokens, with a proof of its own making."""
    ((base, tokens, _),) = await fake.genuine(job, 1)
    return [commit(job, base, tokens, os.urandom(16))]


async def right_tokens_no_proof(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """Exactly the oracle's tokens, but without its proof."""
    ((base, tokens, _),) = await fake.genuine(job, 1)
    return [commit(job, base, tokens, b"")]


async def own_token_with_a_real_proof(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """A genuine proof carrying another token."""
    ((base, tokens, proof),) = await fake.genuine(job, 1)
    return [commit(job, base, ((tokens[0] + 1) % fake.rig.vocab_size,), proof)]


async def shifted_tokens(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """The first verdict honestly, then the second's proof over the oracle's next two
    tokens: right tokens, but one more than that proof is for."""
    first, second, third = await fake.genuine(job, 3)
    return [*relay(job, [first]), commit(job, second[0], second[1] + third[1], second[2])]


async def shifted_base(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """The first verdict honestly, then the second one a position further on."""
    first, second = await fake.genuine(job, 2)
    return [*relay(job, [first]), commit(job, second[0] + 1, second[1], second[2])]


async def reordered(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """The second verdict's tokens and proof first, at the session's length."""
    first, second = await fake.genuine(job, 2)
    return [commit(job, first[0], second[1], second[2])]


async def tampered_context(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """The oracle opened on a context with the user's last token changed."""
    context = (*job.token_ids[:-1], (job.token_ids[-1] + 1) % fake.rig.vocab_size)
    return relay(job, await fake.genuine(job, NEW, context=context))


async def tampered_sampling(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """The oracle asked to sample (the user asked for greedy)."""
    params = SamplingParams(temperature=1.5, seed=3, max_new_tokens=NEW)
    return relay(job, await fake.genuine(job, NEW, params=params))


async def early_finish(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
    """One genuine verdict, then the turn reported over (EOS) where the oracle goes on."""
    return [
        *relay(job, await fake.genuine(job, 1)),
        AssignmentFinished(job.assignment_id, FinishReason.EOS),
    ]


LIES = [
    own_text, forged_proof, right_tokens_no_proof, own_token_with_a_real_proof, shifted_tokens,
    shifted_base, reordered, tampered_context, tampered_sampling, early_finish,
]  # fmt: skip


async def _turn(rig: Rig) -> tuple[list[int], common_pb2.GenerationStats, list[int]]:
    """(output, stats, the session's tokens afterwards) of one greedy turn with k = 4."""
    async with AsyncClient(rig.address, token=ALICE, timeout=120) as client:
        session = await client.create_session()
        result = await client.generate(
            PROMPT, session_id=session, max_new_tokens=NEW, k=4, ignore_eos=True
        )
        state = await client.get_session(session)
        await client.close_session(session)
    return result.token_ids, result.stats, list(state.token_ids)


async def _workers(rig: Rig) -> set[str]:
    async with AsyncClient(rig.address, token=ALICE, timeout=10) as client:
        return {w.worker_id for w in await client.list_workers()}


# ---- the tests --------------------------------------------------------------------------------


async def test_an_honest_relay_is_applied(rig: Rig) -> None:
    fake = await FakeDraft(rig, "fake-honest", honest).connect()
    try:
        output, stats, tokens = await _turn(rig)
    finally:
        await fake.close()
    assert output == rig.expected()
    assert tokens == PROMPT + output
    assert (stats.draft_id, stats.failovers) == ("fake-honest", 0)
    assert len(fake.assignments) == 1


@pytest.mark.parametrize("lie", LIES, ids=lambda lie: lie.__name__)
async def test_a_lying_draft_changes_no_committed_token(rig: Rig, lie: Strategy) -> None:
    fake = await FakeDraft(rig, f"fake-{lie.__name__}", lie).connect()  # type: ignore[attr-defined]
    try:
        output, stats, tokens = await _turn(rig)
        # It got the user's turn, its report was refused, and it was sent away.
        assert len(fake.assignments) == 1
        assert await fake.end() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await fake.close()
    assert output == rig.expected()
    assert tokens == PROMPT + output
    assert stats.failovers >= 1 and stats.draft_id == ""
    assert fake.worker_id not in await _workers(rig)


async def test_proofs_replayed_from_another_attempt_are_refused(rig: Rig) -> None:
    """One fake collects the oracle's verdicts and reports a failure; the turn fails over
    to a second fake, which relays them: the same session, base and tokens, but proved
    under the first attempt's nonce."""
    loot: dict[str, list[Commit]] = {}

    async def collect(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
        loot[job.session_id] = await fake.genuine(job, NEW)
        return [AssignmentFailed(job.assignment_id, "UNAVAILABLE", "the draft broke")]

    async def replay(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
        return relay(job, loot[job.session_id])

    first = await FakeDraft(rig, "fake-collect", collect).connect()
    second = await FakeDraft(rig, "fake-replay", replay).connect()
    try:
        output, stats, tokens = await _turn(rig)
        assert (len(first.assignments), len(second.assignments)) == (1, 1)
        assert await second.end() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await first.close()
        await second.close()
    assert output == rig.expected()
    assert tokens == PROMPT + output
    assert stats.failovers >= 2


async def test_proofs_of_another_session_are_refused(rig: Rig) -> None:
    """The fake relays one session's turn honestly, then a second session with the same
    prompt gets the first one's verdicts: the same base and tokens, another session."""
    loot: list[Commit] = []

    async def honest_then_replay(fake: FakeDraft, job: Assignment) -> list[AssignmentReport]:
        if not loot:
            loot.extend(await fake.genuine(job, NEW))
        return relay(job, loot)

    fake = await FakeDraft(rig, "fake-sessions", honest_then_replay).connect()
    try:
        first, first_stats, _ = await _turn(rig)
        second, second_stats, tokens = await _turn(rig)
        assert await fake.end() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await fake.close()
    assert first == second == rig.expected()
    assert first_stats.failovers == 0 and first_stats.draft_id == "fake-sessions"
    assert second_stats.failovers >= 1
    assert tokens == PROMPT + second
