"""Faults: workers killed (SIGKILL), hung (SIGSTOP) or cut off mid-generation, clients that
give up, workers that come back. Nothing is lost, nothing duplicated, nothing leaks.

One cluster for the module: a gateway, two oracle replicas and two drafts, all
real processes. Every oracle sits behind two fault proxies (tests/fault_proxy.py):
one on the address the gateway dials (``--advertise-address``) and one on the
address the drafts dial (``--public-address``), each adding a small delay so a
100-token generation lasts long enough for a fault to land mid-way. The
reference of every greedy request is HF ``generate`` of the oracle alone; the
streamed token ids, concatenated, must equal it exactly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from gateway.registry import SILENT_AFTER_S
from specdec.client import Client
from specdec.launch import Cluster, Service, cluster, free_port
from tests.cluster_tools import (
    collect,
    generate_stream,
    list_workers,
    oracle_info,
    quiescent,
    reference,
    wait_until,
)
from tests.fault_proxy import FaultProxy

# Faults land mid-turn within seconds: run alone, not beside other tests' load.
pytestmark = pytest.mark.serial

ORACLES = ("oracle-a", "oracle-b")
DRAFTS = ("draft-a", "draft-b")
DELAY_S = 0.02  # added round trip on every oracle link
VERIFY_TIMEOUT_S = 1.5  # the drafts' deadline per verify exchange
SILENCE_S = 3.0  # the gateway's deadline for the next report of a turn's worker
PROMPT = [1, 5, 9, 12]
LONG = 100  # tokens: a fault after the first chunks lands mid-generation


@dataclass
class Rig:
    cluster: Cluster
    oracle_path: Path
    draft_path: Path
    ports: dict[str, int] = field(default_factory=dict)  # oracle id -> port it listens on
    to_oracle: dict[str, FaultProxy] = field(default_factory=dict)  # gateway -> oracle
    from_drafts: dict[str, FaultProxy] = field(default_factory=dict)  # drafts -> oracle
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.cluster.address

    def start_oracle(self, oracle_id: str) -> None:
        self.services[oracle_id] = self.cluster.start_oracle(
            self.oracle_path,
            "--advertise-address",
            self.to_oracle[oracle_id].address,
            "--public-address",
            self.from_drafts[oracle_id].address,
            oracle_id=oracle_id,
            port=self.ports[oracle_id],
        )

    def start_draft(self, draft_id: str) -> None:
        self.services[draft_id] = self.cluster.start_draft(
            self.draft_path, "--verify-timeout-s", str(VERIFY_TIMEOUT_S), draft_id=draft_id
        )

    def heal(self) -> None:
        """Restart every worker that is dead, once the gateway has noticed it is gone."""
        dead = [name for name, service in self.services.items() if not service.alive()]
        if dead:
            wait_until(
                lambda: not set(dead) & set(list_workers(self.address)), what=f"{dead} unlisted"
            )
        for name in dead:
            (self.start_oracle if name in ORACLES else self.start_draft)(name)
        wait_until(
            lambda: set(list_workers(self.address)) == {*ORACLES, *DRAFTS},
            timeout=300,
            what="every worker registered",
        )

    def serving(self, kind: tuple[str, ...]) -> str:
        """The worker of ``kind`` (ORACLES or DRAFTS) serving the one turn in flight."""
        busy = [i for i, w in list_workers(self.address).items() if i in kind and w.active_sessions]
        assert len(busy) == 1, busy
        return busy[0]

    def kill(self, name: str) -> None:
        self.services[name].kill()


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[Rig]:
    oracle_path = model_dir("llama", "oracle")
    with cluster(tmp_path_factory.mktemp("faults")) as c:
        built = Rig(c, oracle_path, model_dir("llama", "close_draft"))
        c.start_gateway("--tokenizer", str(oracle_path), "--worker-silence-s", str(SILENCE_S))
        for oracle_id in ORACLES:
            port = built.ports[oracle_id] = free_port()
            built.to_oracle[oracle_id] = FaultProxy("127.0.0.1", port, DELAY_S)
            built.from_drafts[oracle_id] = FaultProxy("127.0.0.1", port, DELAY_S)
            built.start_oracle(oracle_id)
        for draft_id in DRAFTS:
            built.start_draft(draft_id)
        try:
            c.wait_workers(oracles=2, drafts=2)
            yield built
        finally:
            for service in c.services:
                service.kill()  # a graceful stop waits out streams' grace periods
            for proxy in (*built.to_oracle.values(), *built.from_drafts.values()):
                proxy.close()


def run_with_fault(
    rig: Rig, fault: Callable[[], None], k: int, max_new_tokens: int = LONG
) -> tuple[list[int], int, str, str]:
    """Stream a greedy generation, ``fault()`` after its third chunk; (tokens, failovers,
    oracle_id, draft_id) of the whole turn."""
    rig.heal()
    quiescent(rig.address)
    call = generate_stream(
        rig.address, prompt=PROMPT, max_new_tokens=max_new_tokens, k=k, ignore_eos=True
    )
    tokens, last = collect(call, after_chunks=3, action=fault)
    assert last.finish_reason, "the stream ended without its final message"
    return tokens, last.stats.failovers, last.stats.oracle_id, last.stats.draft_id


@pytest.mark.parametrize(("k", "drafter"), [(0, None), (4, None), (4, "ngram")])
def test_ignore_eos_runs_past_eos_and_eos_ends_otherwise(
    rig: Rig, k: int, drafter: str | None
) -> None:
    """Nothing lost at EOS either: with ignore_eos the output is all max_new_tokens of the
    oracle alone, EOS included; without, it ends right after the EOS."""
    prompt, eos = [1, 5, 9, 12, 62], 2  # its greedy continuation has EOS at index 18
    expected = reference(rig.oracle_path, prompt, 40)
    assert eos in expected[:-1]
    rig.heal()
    with Client(rig.address, timeout=60) as client:
        result = client.generate(prompt, max_new_tokens=40, k=k, drafter=drafter, ignore_eos=True)
        assert (result.token_ids, result.finish_reason) == (expected, "length")
        result = client.generate(prompt, max_new_tokens=40, k=k, drafter=drafter)
        end = expected.index(eos) + 1
        assert (result.token_ids, result.finish_reason) == (expected[:end], "eos")


@pytest.mark.parametrize("k", [0, 4])
def test_oracle_killed_mid_generation_continues_on_the_replica(rig: Rig, k: int) -> None:
    killed: list[str] = []

    def kill_serving_oracle() -> None:
        killed.append(rig.serving(ORACLES))
        rig.kill(killed[0])

    tokens, failovers, oracle_id, _ = run_with_fault(rig, kill_serving_oracle, k)
    # Nothing lost, nothing duplicated: the replica re-prefilled the committed tokens.
    assert tokens == reference(rig.oracle_path, PROMPT, LONG)
    assert failovers >= 1
    assert oracle_id != killed[0] and oracle_id in ORACLES


def test_draft_killed_mid_generation_continues_elsewhere(rig: Rig) -> None:
    killed: list[str] = []

    def kill_serving_draft() -> None:
        killed.append(rig.serving(DRAFTS))
        rig.kill(killed[0])

    tokens, failovers, _, draft_id = run_with_fault(rig, kill_serving_draft, k=4)
    assert tokens == reference(rig.oracle_path, PROMPT, LONG)
    assert failovers >= 1
    assert draft_id != killed[0]  # the other draft, or the oracle alone ("")


@pytest.mark.parametrize("fault", ["cut", "reset", "stall"])
def test_draft_to_oracle_link_failure_resumes_from_the_committed_length(
    rig: Rig, fault: str
) -> None:
    """The drafts' links to both oracles fail; the gateway's own links are fine.

    cut (FIN) and reset (RST) end the draft's Verify stream at once; a stall
    sends nothing, so only the draft's per-round deadline (VERIFY_TIMEOUT_S)
    notices. Either way the gateway sees the oracle is still reachable, blames
    the link rather than the oracle, and the turn continues (on another draft
    or the oracle alone) from the committed tokens.
    """
    proxies = list(rig.from_drafts.values())

    def break_links() -> None:
        for proxy in proxies:
            if fault == "stall":
                proxy.stall()
            elif fault == "cut":
                proxy.cut()
            else:
                proxy.reset()

    try:
        tokens, failovers, oracle_id, _ = run_with_fault(rig, break_links, k=4)
    finally:
        for proxy in proxies:
            proxy.resume()
            proxy.cut()  # streams that hung behind the stall end now
    assert tokens == reference(rig.oracle_path, PROMPT, LONG)
    assert failovers >= 1
    assert oracle_id in ORACLES


def test_hung_draft_is_noticed_by_the_gateway(rig: Rig) -> None:
    """SIGSTOP: the draft's connections stay open but it reports nothing; after
    --worker-silence-s the gateway moves the turn on."""
    stopped: list[str] = []
    frozen_at: list[float] = []

    def freeze_serving_draft() -> None:
        stopped.append(rig.serving(DRAFTS))
        os.kill(rig.services[stopped[0]].process.pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    try:
        tokens, failovers, _, draft_id = run_with_fault(rig, freeze_serving_draft, k=4)
        assert tokens == reference(rig.oracle_path, PROMPT, LONG)
        assert failovers >= 1
        assert draft_id != stopped[0]
        # Still frozen, and silent for longer than three load intervals: new turns skip it
        # at once instead of each waiting out --worker-silence-s.
        time.sleep(max(0.0, frozen_at[0] + SILENT_AFTER_S + 0.5 - time.monotonic()))
        for prompt in ([1, 30, 31], [1, 40, 41], [1, 50]):
            call = generate_stream(rig.address, prompt=prompt, max_new_tokens=8, k=4)
            tokens, last = collect(call)
            assert tokens == reference(rig.oracle_path, prompt, 8)[: len(tokens)]
            assert last.stats.failovers == 0
            assert last.stats.draft_id not in ("", stopped[0])
    finally:
        if stopped:
            rig.kill(stopped[0])  # SIGKILL works on a stopped process; heal() restarts it


def test_restarted_workers_re_register_and_take_new_work(rig: Rig) -> None:
    """Kill an oracle and a draft, start them again: the same gateway routes to them."""
    rig.heal()
    rig.kill("oracle-a")
    rig.kill("draft-a")
    rig.heal()  # waits for the gateway to drop them, restarts, waits for re-registration
    workers = quiescent(rig.address)
    # The newcomers registered last, so a first turn goes to the older (idle) pair and a
    # second concurrent turn to the least loaded: the restarted pair.
    assert workers["oracle-a"].uptime_s < workers["oracle-b"].uptime_s
    first = generate_stream(rig.address, prompt=PROMPT, max_new_tokens=LONG, k=4, ignore_eos=True)
    second_prompt = [1, 30, 31, 32]
    results: dict[str, tuple[list[int], str, str]] = {}

    def start_second() -> None:
        def run() -> None:
            call = generate_stream(
                rig.address, prompt=second_prompt, max_new_tokens=12, k=4, ignore_eos=True
            )
            tokens, last = collect(call)
            results["second"] = (tokens, last.stats.oracle_id, last.stats.draft_id)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(60)

    tokens, last = collect(first, after_chunks=1, action=start_second)
    assert tokens == reference(rig.oracle_path, PROMPT, LONG)
    assert (last.stats.oracle_id, last.stats.draft_id) == ("oracle-b", "draft-b")
    second_tokens, oracle_id, draft_id = results["second"]
    assert second_tokens == reference(rig.oracle_path, second_prompt, 12)
    assert (oracle_id, draft_id) == ("oracle-a", "draft-a")


def _kv_state(rig: Rig) -> dict[str, tuple[int, int]]:
    """(active sessions, KV cache bytes) per worker: oracles from their own GetInfo,
    drafts from the gateway's ListWorkers (what they report every second)."""
    state = {}
    for oracle_id in ORACLES:
        info = oracle_info(rig.ports[oracle_id])
        state[oracle_id] = (info.active_sessions, info.kv_cache_bytes)
    for draft_id, worker in list_workers(rig.address).items():
        if draft_id in DRAFTS:
            state[draft_id] = (worker.active_sessions, worker.kv_cache_bytes)
    return state


# The deadline case runs the oracle alone: 100 rounds behind the delayed link outlast it.
@pytest.mark.parametrize(("k", "how"), [(0, "cancel"), (4, "cancel"), (0, "deadline")])
def test_client_that_gives_up_stops_the_work_and_frees_the_kv_caches(
    rig: Rig, k: int, how: str
) -> None:
    rig.heal()
    quiescent(rig.address)
    before = _kv_state(rig)
    assert all(active == 0 for active, _ in before.values()), before
    timeout = 1.0 if how == "deadline" else 60.0
    call = generate_stream(
        rig.address, timeout, prompt=PROMPT, max_new_tokens=LONG, k=k, ignore_eos=True
    )
    received = 0
    with pytest.raises(grpc.RpcError) as error:
        for response in call:
            received += len(response.token_ids)
            if how == "cancel" and received >= 6:
                # Mid-turn: caches are held on the serving oracle (and draft).
                during = _kv_state(rig)
                assert any(during[o][1] > before[o][1] for o in ORACLES), (before, during)
                call.cancel()
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.value.code() == expected
    assert 0 < received < LONG  # it really stopped mid-generation
    # Every stream closed and every byte of the session's caches freed, on oracles and
    # drafts, within a second (plus one load report interval for the drafts' numbers).
    after = wait_until(
        lambda: (s := _kv_state(rig)) == before and s, timeout=3.0, what="caches released"
    )
    assert after == before
