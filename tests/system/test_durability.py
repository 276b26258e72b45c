"""Sessions survive the gateway: a SIGKILL and restart (SQLite store), the loss of one of
two replicas (Redis store), and the KV leases that free what no gateway knows.

Real processes over real sockets: gateways, an oracle and a draft (tiny llama pair),
a real ``redis-server``; the clients are ``specdec.client``'s, which resume a cut
stream by themselves. Every oracle link runs through a fault proxy adding a small
delay, so that turns are still running when the gateway dies. The reference of every
greedy turn is HF ``generate`` of the oracle alone over the session's whole context.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from specdec.client import AsyncClient, Client, build_request
from specdec.launch import Cluster, cluster, free_port
from tests.cluster_tools import list_workers, oracle_info, reference, wait_until
from tests.fault_proxy import FaultProxy
from tests.redis_server import redis_server

SESSIONS = 8
TURNS = 3
NEW_TOKENS = 24  # per turn: 3 turns of prompt 4 + 24 fit the tiny models' 128 positions
DELAY_S = 0.03  # added round trip on the oracle's links
RESUME = {"resume_attempts": 60, "resume_within_s": 240.0, "timeout": 300.0}


def prompt_of(session: int, turn: int) -> list[int]:
    return [1, 5 + session, 9 + turn, 12 + session + turn]


@dataclass
class Conversation:
    """One client thread's multi-turn session, and what it saw."""

    index: int
    addresses: str
    session_id: str = ""
    outputs: list[list[int]] = field(default_factory=list)
    turn: int = 0
    received: int = 0  # tokens of the current turn
    finished: bool = False  # the current turn's last message has come
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    second_turn_started: threading.Event = field(default_factory=threading.Event)

    @property
    def k(self) -> int:
        return 0 if self.index % 2 else 4  # the oracle alone, or the draft's model

    def run(self) -> None:
        try:
            with Client(self.addresses, **RESUME) as client:  # type: ignore[arg-type]
                self.session_id = client.create_session()
                for turn in range(TURNS):
                    with self.lock:
                        self.turn, self.received, self.finished = turn, 0, False
                    tokens: list[int] = []
                    for response in client.stream(
                        prompt_of(self.index, turn),
                        session_id=self.session_id,
                        max_new_tokens=NEW_TOKENS,
                        ignore_eos=True,
                        k=self.k,
                    ):
                        tokens.extend(response.token_ids)
                        with self.lock:
                            self.received = len(tokens)
                            self.finished = bool(response.finish_reason)
                        if turn == 1 and tokens:
                            self.second_turn_started.set()
                    self.outputs.append(tokens)
        except BaseException as exc:
            self.error = exc
            self.second_turn_started.set()

    def mid_turn(self) -> bool:
        with self.lock:
            return self.received > 0 and not self.finished


def expected_session(oracle: Path, index: int) -> tuple[list[int], list[list[int]]]:
    """The session's tokens and each turn's output, as the oracle alone gives them."""
    context: list[int] = []
    outputs = []
    for turn in range(TURNS):
        context += prompt_of(index, turn)
        outputs.append(reference(oracle, context, NEW_TOKENS))
        context += outputs[-1]
    return context, outputs


def converse(
    conversations: list[Conversation], fault: Callable[[list[Conversation]], None]
) -> list[bool]:
    """Run the conversations at once; ``fault`` once every one is in its second turn.
    Which conversations were mid-turn when it struck."""
    threads = [threading.Thread(target=c.run) for c in conversations]
    for thread in threads:
        thread.start()
    for c in conversations:
        assert c.second_turn_started.wait(120), f"conversation {c.index} never got going"
    cut = [c.mid_turn() for c in conversations]
    fault(conversations)
    for thread in threads:
        thread.join(300)
        assert not thread.is_alive(), "a conversation hangs"
    return cut


def check_conversations(conversations: list[Conversation], oracle: Path, address: str) -> None:
    with Client(address, timeout=30) as client:
        for c in conversations:
            assert c.error is None, f"conversation {c.index}: {c.error!r}"
            tokens, outputs = expected_session(oracle, c.index)
            stored = client.get_session(c.session_id)
            assert (list(stored.token_ids), stored.turns) == (tokens, TURNS), c.index
            assert c.outputs == outputs, f"conversation {c.index}: output differs"


@dataclass
class Rig:
    cluster: Cluster
    oracle_path: Path
    oracle_port: int
    gateway_flags: list[str]

    def start_gateway(self, *flags: str, port: int = 0) -> None:
        self.cluster.start_gateway(*self.gateway_flags, *flags, port=port)


def start_workers(c: Cluster, rig: Rig, draft_path: Path, proxies: list[FaultProxy]) -> None:
    """One oracle behind delaying proxies (the gateway's link and the draft's) and one
    draft, registered at every gateway of ``c``."""
    port = rig.oracle_port
    to_oracle, from_draft = (
        FaultProxy("127.0.0.1", port, DELAY_S),
        FaultProxy("127.0.0.1", port, DELAY_S),
    )
    proxies += [to_oracle, from_draft]
    c.start_oracle(
        rig.oracle_path,
        "--advertise-address",
        to_oracle.address,
        "--public-address",
        from_draft.address,
        oracle_id="oracle-a",
        port=port,
    )
    c.start_draft(draft_path, draft_id="draft-a")
    c.wait_workers(oracles=1, drafts=1)


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[Rig]:
    """A gateway on the default SQLite store, an oracle and a draft."""
    oracle_path = model_dir("llama", "oracle")
    proxies: list[FaultProxy] = []
    with cluster(tmp_path_factory.mktemp("durability")) as c:
        flags = ["--tokenizer", str(oracle_path), "--worker-wait-s", "30"]
        built = Rig(c, oracle_path, free_port(), flags)
        c.start_gateway(*flags)
        try:
            start_workers(c, built, model_dir("llama", "close_draft"), proxies)
            yield built
        finally:
            for service in c.services:
                service.kill()
            for proxy in proxies:
                proxy.close()


def sampled_one_off(address: str, seen: threading.Event, out: dict[str, Any]) -> None:
    """A seeded sampled one-off request through the asyncio client (k = 0: every draw
    is the oracle's at its position); ``seen`` is set at its first tokens."""

    async def run() -> None:
        async with AsyncClient(address, **RESUME) as client:  # type: ignore[arg-type]
            tokens: list[int] = []
            async for response in client.stream(
                [1, 7, 11], max_new_tokens=60, temperature=0.9, seed=7, k=0, ignore_eos=True
            ):
                tokens.extend(response.token_ids)
                if tokens:
                    seen.set()
            out["tokens"] = tokens

    try:
        asyncio.run(run())
    except BaseException as exc:
        out["error"] = exc
        seen.set()


def test_gateway_sigkill_and_restart_loses_no_session(rig: Rig) -> None:
    c = rig.cluster
    assert c.gateway is not None
    gateway, port = c.gateway, c.gateway.port
    conversations = [Conversation(i, c.address) for i in range(SESSIONS)]
    one_off: dict[str, Any] = {}
    one_off_seen = threading.Event()
    one_off_thread = threading.Thread(
        target=sampled_one_off, args=(c.address, one_off_seen, one_off)
    )

    def kill_and_restart(_: list[Conversation]) -> None:
        one_off_thread.start()
        assert one_off_seen.wait(60)
        gateway.kill()  # SIGKILL: no goodbye
        rig.start_gateway(port=port)

    cut = converse(conversations, kill_and_restart)
    one_off_thread.join(300)
    assert sum(cut) >= 2, f"too few streams were cut mid-turn: {cut}"
    # Every session goes on from its committed tokens: each turn's output is the
    # oracle's alone, and GetSession on the restarted gateway has every token.
    check_conversations(conversations, rig.oracle_path, c.address)
    # The cut sampled stream resumed to exactly what an uninterrupted one gives.
    assert "error" not in one_off, one_off.get("error")
    again: dict[str, Any] = {}
    sampled_one_off(c.address, threading.Event(), again)
    assert one_off["tokens"] == again["tokens"] and len(again["tokens"]) == 60


def test_workers_keep_the_kv_of_known_sessions_and_release_the_rest(rig: Rig) -> None:
    """KV leases: a worker re-registering tells the gateway the sessions it caches; it
    keeps those the store knows and releases the others."""
    c = rig.cluster
    assert c.gateway is not None
    with Client(c.address, timeout=60) as client:
        session = client.create_session()
        client.generate([1, 5, 9], session_id=session, max_new_tokens=8, k=4)
    cached = wait_until(lambda: oracle_info(rig.oracle_port).cached_sessions, what="a cache")

    def drafts_kv(address: str) -> int:
        with Client(address, timeout=5) as client:
            return sum(w.kv_cache_bytes for w in client.list_workers() if w.kind == 1)

    def restart(*flags: str) -> None:
        assert c.gateway is not None
        port = c.gateway.port
        c.gateway.kill()
        rig.start_gateway(*flags, port=port)
        c.wait_workers(oracles=1, drafts=1)

    restart()  # the same SQLite store: every session is known
    wait_until(lambda: drafts_kv(c.address) > 0, what="the draft's load report")
    assert oracle_info(rig.oracle_port).cached_sessions == cached
    restart("--session-store", "memory")  # a gateway that knows no session
    wait_until(
        lambda: oracle_info(rig.oracle_port).cached_sessions == 0, what="the oracle's release"
    )
    wait_until(lambda: drafts_kv(c.address) == 0, what="the draft's release")


def test_two_replicas_on_redis_lose_no_session_when_one_dies(
    tmp_path: Path, model_dir: Callable[[str, str], Path]
) -> None:
    oracle_path = model_dir("llama", "oracle")
    proxies: list[FaultProxy] = []
    with redis_server(tmp_path / "redis") as url, cluster(tmp_path) as c:
        flags = ["--tokenizer", str(oracle_path), "--worker-wait-s", "30", "--session-store", url]
        rig = Rig(c, oracle_path, free_port(), flags)
        doomed = c.start_gateway(*flags)
        survivor = c.start_gateway(*flags)
        a, b = (f"127.0.0.1:{g.port}" for g in (doomed, survivor))
        try:
            start_workers(c, rig, model_dir("llama", "close_draft"), proxies)
            wait_until(lambda: len(list_workers(a)) == 2, what="workers at a")
            # Half the clients start on each replica; all of them know both.
            conversations = [
                Conversation(i, f"{a},{b}" if i % 2 == 0 else f"{b},{a}") for i in range(SESSIONS)
            ]
            cut = converse(conversations, lambda _: doomed.kill())
            on_doomed = [x for i, x in enumerate(cut) if i % 2 == 0]
            assert sum(on_doomed) >= 1, f"no stream of the killed replica was cut: {cut}"
            check_conversations(conversations, oracle_path, b)
        finally:
            for service in c.services:
                service.kill()
            for proxy in proxies:
                proxy.close()


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_resume_requests_are_checked_and_a_finished_turn_is_replayed(rig: Rig) -> None:
    """The protocol under the client's resumption, request by request."""
    address = rig.cluster.address
    with Client(address, timeout=60, resume_attempts=0) as client:
        session = client.create_session()
        first = client.generate([1, 5, 9], session_id=session, max_new_tokens=10, turn_id="t1")
        assert first.finish_reason == "length" and len(first.token_ids) == 10

        def resume(after: int, turn_id: str = "t1", **kwargs: Any) -> Any:
            request = build_request([1, 5, 9], turn_id=turn_id, **kwargs)
            request.resume_after_tokens = after
            return list(client._stub.Generate(request, timeout=60))

        # Its last messages were lost: the rest of the turn comes again, with the finish.
        tail = resume(6, session_id=session, max_new_tokens=10)
        assert [t for r in tail for t in r.token_ids] == first.token_ids[6:]
        assert tail[-1].finish_reason and tail[-1].turn_id == "t1"
        code, details = _code(lambda: resume(11, session_id=session))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "committed 10" in details
        code, details = _code(lambda: client.generate([1, 5, 9], session_id=session, turn_id="t1"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already ran" in details
        client.generate([1, 5, 9], session_id=session, max_new_tokens=4, turn_id="t2")
        code, details = _code(lambda: resume(3, session_id=session))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not the session's latest" in details
        # A one-off request that finished is gone: nothing to resume.
        client.generate([1, 5, 9], max_new_tokens=4, turn_id="once")
        code, details = _code(lambda: resume(2, turn_id="once"))
        assert code == grpc.StatusCode.NOT_FOUND and "one-off request is gone" in details
        # Never begun (the gateway died first): resuming at 0 begins it.
        again = resume(0, turn_id="never-begun", max_new_tokens=4)
        assert sum(len(r.token_ids) for r in again) == 4
        code, details = _code(lambda: resume(1, turn_id=""))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs the turn_id" in details
        client.close_session(session)
        code, _ = _code(lambda: resume(0, session_id=session))
        assert code == grpc.StatusCode.NOT_FOUND


def test_the_client_gives_up_after_its_attempts() -> None:
    with Client(f"127.0.0.1:{free_port()}", resume_attempts=2, resume_within_s=30) as client:
        start = time.monotonic()
        code, _ = _code(lambda: client.generate([1, 2, 3]))
    assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 20
