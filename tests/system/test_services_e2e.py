"""End to end: gateway, oracle and draft as real processes over real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec.client import Client
from specdec.launch import Cluster, cluster

PROMPTS = [[1, 5, 9, 12], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 40], [1, 7]]


def reference(model_path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF greedy generate of the oracle alone: the output speculation must equal."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[tuple[Cluster, Path]]:
    oracle_path = model_dir("llama", "oracle")
    draft_path = model_dir("llama", "close_draft")
    with cluster(tmp_path_factory.mktemp("e2e")) as c:
        c.start_gateway("--tokenizer", str(oracle_path))
        # The draft's model as rescue draft: a miss is rescued by the oracle (on by
        # default for greedy turns), so every test here also runs through rescues.
        c.start_oracle(oracle_path, "--rescue-draft", str(draft_path), oracle_id="oracle-a")
        c.start_draft(draft_path, draft_id="draft-a")
        c.wait_workers(oracles=1, drafts=1)
        yield c, oracle_path


def test_pipeline_depth_is_per_request_and_changes_no_token(system: tuple[Cluster, Path]) -> None:
    c, oracle_path = system
    with Client(c.address, timeout=60) as client:
        for prompt in PROMPTS:
            expected = reference(oracle_path, prompt, 24)
            for depth in (1, 2, 4):
                result = client.generate(
                    prompt, max_new_tokens=24, k=3, ignore_eos=True, pipeline_depth=depth
                )
                assert result.token_ids == expected, (depth, prompt)
                # Every round's block waited some time at the oracle, less than the turn.
                assert 0 < result.stats.queue_ns < result.stats.total_ns
                if depth == 1:  # each block waits for the verdict before it
                    assert result.stats.pipelined_rounds == result.stats.skipped_blocks == 0


def test_branches_are_per_request_and_change_no_token(system: tuple[Cluster, Path]) -> None:
    # Blocks drafted for likely corrections: some verdicts find theirs ready (the close
    # draft's runner-up is often the oracle's token), and no token changes. Whether a
    # branch is ready when its verdict comes is a race with the oracle: up to five passes.
    c, oracle_path = system
    branch_rounds = {0: 0, 3: 0}
    with Client(c.address, timeout=60) as client:
        for _ in range(5):
            for prompt in PROMPTS:
                expected = reference(oracle_path, prompt, 24)
                for branches in (0, 3):
                    result = client.generate(
                        prompt, max_new_tokens=24, k=3, ignore_eos=True, pipeline_depth=2,
                        branches=branches,
                    )  # fmt: skip
                    assert result.token_ids == expected, (branches, prompt)
                    branch_rounds[branches] += result.stats.branch_rounds
            if branch_rounds[3] > 0:
                break
    assert branch_rounds[0] == 0 and branch_rounds[3] > 0, branch_rounds


def test_rescue_is_per_request_and_changes_no_token(system: tuple[Cluster, Path]) -> None:
    # Without branches every rejection is a miss: with rescue the oracle drafts those
    # blocks itself; without it, none. The tokens are the same.
    c, oracle_path = system
    rescued = {False: 0, True: 0}
    with Client(c.address, timeout=60) as client:
        for prompt in PROMPTS:
            expected = reference(oracle_path, prompt, 24)
            for rescue in (False, True):
                result = client.generate(
                    prompt, max_new_tokens=24, k=3, ignore_eos=True, branches=0,
                    rescue=rescue,
                )  # fmt: skip
                assert result.token_ids == expected, (rescue, prompt)
                assert result.stats.output_tokens == 24
                rescued[rescue] += result.stats.rescued_rounds
    assert rescued[False] == 0 and rescued[True] > 0, rescued


@pytest.fixture(scope="module")
def useless_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The demo oracle with a draft that knows nothing: the demo draft's architecture and
    tokenizer, random weights; also the oracle's rescue draft, as ``specdec up`` on a CPU
    would make it."""
    from specdec.bench.workload import useless_draft
    from specdec.engine.models import DEMO_DRAFT, DEMO_ORACLE

    workdir = tmp_path_factory.mktemp("useless")
    draft = useless_draft(str(DEMO_DRAFT), workdir / "draft", seed=0)
    with cluster(tmp_path_factory.mktemp("useless-run")) as c:
        c.start_gateway("--tokenizer", str(DEMO_ORACLE))
        c.start_oracle(None, "--rescue-draft", str(draft))
        c.start_draft(draft)
        c.wait_workers(oracles=1, drafts=1)
        yield c


CODE_PROMPT = "def moving_average(values, window):\n    "


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_controller_gives_up_a_useless_draft_and_changes_no_token(
    useless_pair: Cluster, temperature: float
) -> None:
    # Requests without speculation settings get the controller. Its first turn with this
    # pair finds that nothing is accepted and takes plain steps (k = 0: nothing drafted),
    # probing now and then. Drafting did not pay, so the pair's next turns run as the
    # oracle alone on the gateway's own link. The output is the oracle alone's (sampled:
    # the same seed gives the same draws).
    sampling: dict[str, Any] = {"max_new_tokens": 40, "ignore_eos": True}
    if temperature:
        sampling.update(temperature=temperature, seed=11)
    with Client(useless_pair.address, timeout=120) as client:
        alone = client.generate(CODE_PROMPT, k=0, **sampling)
        assert alone.stats.oracle_alone_rounds == alone.stats.rounds == 40
        first, *later = [client.generate(CODE_PROMPT, **sampling) for _ in range(3)]
    for turn in (first, *later):
        assert turn.token_ids == alone.token_ids
    assert first.stats.draft_id  # the draft ran the turn
    assert first.stats.proposed_tokens > 0 and first.stats.accepted_tokens <= 4, first.stats
    assert first.stats.oracle_alone_rounds >= 0.6 * first.stats.rounds, first.stats
    for turn in later:  # the oracle alone, at the gateway
        assert turn.stats.draft_id == "" and turn.stats.proposed_tokens == 0, turn.stats
        assert turn.stats.oracle_alone_rounds == turn.stats.rounds == 40


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_greedy_output_equals_oracle_alone(system: tuple[Cluster, Path], k: int) -> None:
    c, oracle_path = system
    with Client(c.address, timeout=60) as client:
        for prompt in PROMPTS:
            result = client.generate(prompt, max_new_tokens=24, k=k, ignore_eos=True)
            assert result.token_ids == reference(oracle_path, prompt, 24), (k, prompt)
            assert result.finish_reason == "length"
            assert result.stats.output_tokens == 24
            if k > 0:
                assert result.stats.draft_id == "draft-a"
                assert result.stats.proposed_tokens > 0
            assert result.stats.accepted_tokens <= result.stats.proposed_tokens


def test_a_stop_inside_a_verdict_ends_the_output_there(system: tuple[Cluster, Path]) -> None:
    """A draft reports each verdict whole (the oracle's proof covers all of it); the
    gateway's stop checker cuts the output right after the stop token."""
    c, oracle_path = system
    cuts = 0
    with Client(c.address, timeout=60) as client:
        for prompt in PROMPTS:
            expected = reference(oracle_path, prompt, 24)
            # The latest first occurrence: a stop likely inside a multi-token verdict.
            stop = max(expected, key=expected.index)
            end = expected.index(stop) + 1
            session = client.create_session()
            result = client.generate(
                prompt, session_id=session, max_new_tokens=24, k=4, stop_token_ids=[stop],
                ignore_eos=True,
            )  # fmt: skip
            assert result.token_ids == expected[:end], prompt
            assert result.finish_reason == "stop_token"
            assert list(client.get_session(session).token_ids) == prompt + expected[:end]
            assert (result.stats.draft_id, result.stats.failovers) == ("draft-a", 0)
            cuts += result.stats.proposed_tokens > 0 and end > 1
    assert cuts > 0


def test_ngram_drafter_is_exact(system: tuple[Cluster, Path]) -> None:
    c, oracle_path = system
    prompt = PROMPTS[1] * 2
    with Client(c.address, timeout=60) as client:
        result = client.generate(prompt, max_new_tokens=20, k=4, drafter="ngram", ignore_eos=True)
    assert result.token_ids == reference(oracle_path, prompt, 20)
    assert result.stats.drafter == 2  # DRAFTER_KIND_NGRAM


def test_tokens_stream_before_generation_ends(system: tuple[Cluster, Path]) -> None:
    c, _ = system
    arrivals: list[tuple[float, int]] = []
    with Client(c.address, timeout=60) as client:
        for response in client.stream(PROMPTS[0], max_new_tokens=48, k=2, ignore_eos=True):
            arrivals.append((time.monotonic(), len(response.token_ids)))
    with_tokens = [a for a in arrivals if a[1] > 0]
    assert len(with_tokens) >= 3, arrivals  # many rounds, many messages
    assert sum(n for _, n in arrivals) == 48
    assert arrivals[0][0] < arrivals[-1][0]


def test_second_turn_reuses_the_oracle_cache(system: tuple[Cluster, Path]) -> None:
    c, oracle_path = system
    with Client(c.address, timeout=60) as client:
        session = client.create_session()
        first = client.generate(PROMPTS[1], session_id=session, max_new_tokens=10, k=4)
        assert first.stats.prefilled_tokens == len(PROMPTS[1]) - 1
        follow_up = [40, 41, 42]
        second = client.generate(follow_up, session_id=session, max_new_tokens=10, k=4)
        # Only the new prompt (and the last generated token) needed computing.
        assert second.stats.cached_tokens >= len(PROMPTS[1]) + 10 - 1
        assert second.stats.prefilled_tokens <= len(follow_up) + 1
        state = client.get_session(session)
        whole = PROMPTS[1] + first.token_ids + follow_up
        assert list(state.token_ids) == whole + second.token_ids
        assert state.turns == 2
        # The session's continuation equals the oracle alone on the whole context.
        assert second.token_ids == reference(oracle_path, whole, 10)[: len(second.token_ids)]
        assert client.close_session(session) == len(state.token_ids)
        with pytest.raises(grpc.RpcError) as error:
            client.get_session(session)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_sessions_do_not_interfere(system: tuple[Cluster, Path]) -> None:
    c, oracle_path = system
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int, prompt: list[int], k: int) -> None:
        try:
            with Client(c.address, timeout=120) as client:
                results[i] = client.generate(
                    prompt, max_new_tokens=16, k=k, ignore_eos=True
                ).token_ids
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    jobs = [(i, PROMPTS[i % 3] + [i + 3], [0, 2, 4][i % 3]) for i in range(6)]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, prompt, _ in jobs:
        assert results[i] == reference(oracle_path, prompt, 16), i


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"prompt": []}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5, 10_000]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, -3]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "session_id": "no-such-session"}, grpc.StatusCode.NOT_FOUND),
        ({"prompt": [1, 5], "max_new_tokens": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "k": 33}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "k": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "temperature": -0.5}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1] * 200}, grpc.StatusCode.INVALID_ARGUMENT),  # longer than the context
        ({"prompt": [1, 5], "k": 4, "pipeline_depth": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "k": 4, "pipeline_depth": 5}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "k": 4, "branches": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": [1, 5], "k": 4, "branches": 9}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_get_clear_statuses(
    system: tuple[Cluster, Path], kwargs: dict[str, Any], code: grpc.StatusCode
) -> None:
    c, _ = system
    prompt = kwargs.pop("prompt")
    with Client(c.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.generate(prompt, **kwargs)
        assert error.value.code() == code, error.value.details()
        assert error.value.details()  # a message a user can act on
        # The gateway is still fine afterwards.
        assert len(client.generate([1, 5], max_new_tokens=2).token_ids) >= 1


def test_health_and_reflection(system: tuple[Cluster, Path]) -> None:
    c, _ = system
    for address in (c.address, f"127.0.0.1:{c.services[1].port}"):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
            names = {s.name for s in response.list_services_response.service}
            assert "grpc.health.v1.Health" in names
            assert names & {"specdec.v1.Gateway", "specdec.v1.Oracle"}


def test_list_workers(system: tuple[Cluster, Path]) -> None:
    c, _ = system
    with Client(c.address, timeout=10) as client:
        workers = {w.worker_id: w for w in client.list_workers()}
    assert set(workers) == {"oracle-a", "draft-a"}
    assert workers["oracle-a"].vocab_fingerprint == workers["draft-a"].vocab_fingerprint
    assert workers["oracle-a"].address.startswith("127.0.0.1:")
    assert workers["draft-a"].address == ""  # nothing dials into a draft
