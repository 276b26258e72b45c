"""Bad input: hypothesis fuzzes the public API and the internal streams of live services.

Targets (bounded: a few hundred cases, well under a minute):

* ``Gateway.Generate``: wrong, missing and contradictory fields, huge prompts,
  negative / NaN / infinite / subnormal sampling values, unknown enums, foreign
  session ids;
* ``Oracle.Verify`` raw streams: opens and blocks in any order, stale,
  duplicated and out-of-order base lengths, invalid token ids, malformed sparse
  q (NaN, negative, not summing to one, mismatched lengths, duplicates), and
  opens on the id of a real user's session;
* ``WorkerRegistry.Connect``: registrations and reports a worker could send,
  malformed or for assignments that do not exist;
* the unary calls (sessions, GetInfo, ReleaseSession).

Every case ends OK or with its documented status (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN. Afterwards
every process is alive and SERVING, and a session created before the fuzzing
continues with exactly the oracle alone's output.
"""

from __future__ import annotations

import queue
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec.client import Client, build_request
from specdec.launch import Cluster, cluster
from specdec.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    oracle_pb2,
    oracle_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.cluster_tools import list_workers, reference, wait_until

VOCAB = 96  # tests/conftest.py's tiny vocabulary
CONTEXT = 128  # and its models' context
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CASES: Counter[str] = Counter()  # cases tried per target
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (target, status) of each case
MIN_CASES = 300
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@dataclass
class Rig:
    cluster: Cluster
    oracle_path: Path
    oracle_address: str
    gateway: grpc.Channel
    oracle: grpc.Channel
    bystander: str  # a session created before the fuzzing
    bystander_context: list[int]


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[Rig]:
    oracle_path = model_dir("llama", "oracle")
    with cluster(tmp_path_factory.mktemp("fuzz")) as c:
        # Requests leaving max_new_tokens at 0 get 4: the fuzz stays fast.
        c.start_gateway("--tokenizer", str(oracle_path), "--default-max-new-tokens", "4")
        oracle = c.start_oracle(oracle_path, oracle_id="oracle-a")
        c.start_draft(model_dir("llama", "close_draft"), draft_id="draft-a")
        c.wait_workers(oracles=1, drafts=1)
        prompt = [1, 5, 9, 12]
        with Client(c.address, timeout=60) as client:
            session = client.create_session()
            first = client.generate(prompt, session_id=session, max_new_tokens=12, k=4)
        oracle_address = f"127.0.0.1:{oracle.port}"
        with (
            grpc.insecure_channel(c.address) as gateway,
            grpc.insecure_channel(oracle_address) as oracle_channel,
        ):
            yield Rig(
                c, oracle_path, oracle_address, gateway, oracle_channel, session,
                prompt + first.token_ids,
            )  # fmt: skip
        for service in c.services:
            service.kill()  # a graceful stop waits out streams' grace periods


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert code in DOCUMENTED, f"{code.name}: {exc.details()}"
        assert exc.details(), "an error needs a message a user can act on"
        return code
    return grpc.StatusCode.OK


# -- strategies ----------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.one_of(
    st.floats(width=32),  # NaN, infinities, subnormals, negatives, huge
    st.sampled_from([0.0, 1.0, 0.5, 1e-45, 1e-30, -0.0, 2.0, 100.0]),
)
TOKEN = st.one_of(st.integers(0, VOCAB - 1), INT32)
VALID_TOKENS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
TOKENS = st.one_of(
    VALID_TOKENS,
    st.lists(TOKEN, max_size=12),
    st.sampled_from([CONTEXT - 1, CONTEXT, 5000, 200_000]).map(lambda n: [1] * n),  # huge
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["the quick brown fox", " ", "\x00", "a" * 100_000]),
)
WILD_FIELDS = (
    "session", "ids", "text", "no_prompt", "temperature", "top_k", "top_p", "max_new_tokens",
    "stop", "stop_ids", "k", "no_k", "drafter", "no_sampling", "no_speculation",
)  # fmt: skip


def _make_wild(request: gateway_pb2.GenerateRequest, name: str, draw: st.DrawFn) -> None:
    """Replace one field of ``request`` with a wrong, missing or extreme value."""
    sampling, speculation = request.sampling, request.speculation
    if name == "session":
        request.session_id = draw(st.text(max_size=30))  # a foreign or unknown id
    elif name == "ids":
        request.ClearField("prompt_token_ids")
        request.prompt_token_ids.extend(draw(TOKENS))
    elif name == "text":
        request.prompt = draw(TEXT)  # alone, or together with ids
    elif name == "no_prompt":
        request.ClearField("prompt_token_ids")
    elif name == "temperature":
        sampling.temperature = draw(FLOATS)
    elif name == "top_k":
        sampling.top_k = draw(st.one_of(INT32, st.integers(-3, VOCAB + 3)))
    elif name == "top_p":
        sampling.top_p = draw(FLOATS)
    elif name == "max_new_tokens":
        sampling.max_new_tokens = draw(INT32)
    elif name == "stop":
        sampling.stop.extend(draw(st.lists(st.text(max_size=5), min_size=1, max_size=3)))
    elif name == "stop_ids":
        sampling.stop_token_ids.extend(draw(st.lists(TOKEN, min_size=1, max_size=3)))
    elif name == "k":
        speculation.num_speculative_tokens = draw(st.one_of(INT32, st.integers(-2, 34)))
    elif name == "no_k":
        speculation.ClearField("num_speculative_tokens")
    elif name == "drafter":
        speculation.drafter = cast(Any, draw(st.integers(-5, 50)))  # unknown enum values too
    elif name == "no_sampling":
        request.ClearField("sampling")
    elif name == "no_speculation":
        request.ClearField("speculation")


@st.composite
def generate_requests(draw: st.DrawFn) -> gateway_pb2.GenerateRequest:
    """A valid request (greedy or sampled, any drafter) with 0-3 of its fields made wild:
    each validation is reached alone as well as in combination."""
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=draw(VALID_TOKENS),
        sampling=common_pb2.SamplingParams(
            temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 1.0])),
            top_k=draw(st.sampled_from([0, 0, 1, 5])),
            top_p=draw(st.sampled_from([0.0, 1.0, 0.9])),
            max_new_tokens=draw(st.integers(0, 4)),
            ignore_eos=draw(st.booleans()),
        ),
        speculation=common_pb2.SpeculationParams(
            num_speculative_tokens=draw(st.integers(0, 8)),
            adaptive=draw(st.booleans()),
            drafter=cast(Any, draw(st.integers(0, 3))),
        ),
    )
    if draw(st.booleans()):
        request.sampling.seed = draw(st.integers(0, 2**64 - 1))
    for name in draw(st.lists(st.sampled_from(WILD_FIELDS), max_size=3, unique=True)):
        _make_wild(request, name, draw)
    return request


@st.composite
def sparse(draw: st.DrawFn, token: int, valid: bool = False) -> common_pb2.SparseDistribution:
    """A q for ``token``: right (its support holds the token) or, unless ``valid``, anything:
    NaN, negative, not summing to one, mismatched lengths, duplicated or foreign ids."""
    kind = draw(st.sampled_from(["valid", "point"] if valid else ["valid", "point", "random"]))
    if kind == "point":
        return common_pb2.SparseDistribution(token_ids=[token], probs=[1.0])
    if kind == "valid":
        other = (token + 1) % VOCAB
        return common_pb2.SparseDistribution(token_ids=[token, other], probs=[0.75, 0.25])
    return common_pb2.SparseDistribution(
        token_ids=draw(st.lists(TOKEN, max_size=4)),
        probs=draw(st.lists(FLOATS, max_size=4)),  # NaN, negative, not summing, mismatched
    )


# A step of a Verify stream: (how its base_length is meant, the message). "relative":
# base_length is an offset from the committed length the oracle last reported, so
# offset 0 is the right block, -1 a stale or duplicated one, +1 one from the future.
Step = tuple[str, oracle_pb2.VerifyRequest]
STREAM_FAULTS = (
    "stale", "ahead", "any_base", "bad_tokens", "bad_q", "q_short", "reopen", "empty",
    "no_open", "bad_open", "too_long",
)  # fmt: skip


@st.composite
def verify_streams(draw: st.DrawFn, real_session: str) -> list[Step]:
    """A well-behaved stream (open, then 0-5 right blocks, token-only or with valid q)
    with 0-2 faults injected at random steps: each refusal alone and in combination."""
    session_ids = st.text(min_size=1, max_size=20).map("fuzz-".__add__)
    open_verify = oracle_pb2.OpenVerify(
        # Opening a real user's session id hijacks only the oracle's soft cache of it.
        session_id=draw(session_ids | st.just(real_session)),
        token_ids=draw(VALID_TOKENS),
        sampling=common_pb2.SamplingParams(
            temperature=draw(st.sampled_from([0.0, 1.0, 1e-45])), top_k=draw(st.integers(0, 5))
        ),
        seed=draw(st.integers(0, 2**64 - 1)),
    )
    trace = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2))
    steps: list[Step] = [
        ("absolute", oracle_pb2.VerifyRequest(open=open_verify, trace_context=trace))
    ]
    with_q = draw(st.booleans())
    for round_index in range(draw(st.integers(0, 5))):
        tokens = draw(st.lists(st.integers(0, VOCAB - 1), max_size=5))
        q = [draw(sparse(t, valid=True)) for t in tokens] if with_q else []
        block = oracle_pb2.VerifyBlock(round=round_index, token_ids=tokens, draft_distributions=q)
        steps.append(("relative", oracle_pb2.VerifyRequest(block=block)))
    for fault in draw(st.lists(st.sampled_from(STREAM_FAULTS), max_size=2)):
        if not steps:  # "no_open" took the only message
            break
        at = draw(st.integers(0, len(steps) - 1))
        kind, message = steps[at]
        block = message.block
        if fault in ("stale", "ahead") and kind == "relative":
            block.base_length = draw(st.integers(1, 3)) * (-1 if fault == "stale" else 1)
        elif fault == "any_base" and kind == "relative":
            steps[at] = ("absolute", message)
            block.base_length = draw(INT32)
        elif fault == "bad_tokens" and kind == "relative":
            block.ClearField("token_ids")
            block.token_ids.extend(draw(TOKENS))
        elif fault == "bad_q" and kind == "relative":
            block.ClearField("draft_distributions")
            block.draft_distributions.extend([draw(sparse(t)) for t in block.token_ids])
        elif fault == "q_short" and kind == "relative" and len(block.draft_distributions):
            block.draft_distributions.pop()
        elif fault == "reopen":
            steps.insert(at + 1, ("absolute", oracle_pb2.VerifyRequest(open=open_verify)))
        elif fault == "empty":
            steps.insert(at, ("absolute", oracle_pb2.VerifyRequest()))
        elif fault == "no_open" and steps and steps[0][1].HasField("open"):
            steps.pop(0)
        elif fault == "bad_open" and steps and steps[0][1].HasField("open"):
            wrong = steps[0][1].open
            wrong.session_id = draw(st.text(max_size=5))
            wrong.ClearField("token_ids")
            wrong.token_ids.extend(draw(TOKENS))
            wrong.sampling.CopyFrom(draw(sampling()))
        elif fault == "too_long" and kind == "relative":
            block.ClearField("token_ids")
            block.token_ids.extend([3] * draw(st.sampled_from([33, CONTEXT])))
    return steps or [("absolute", oracle_pb2.VerifyRequest())]


@st.composite
def sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        temperature=draw(FLOATS),
        top_k=draw(st.one_of(st.integers(-3, VOCAB + 3), INT32)),
        top_p=draw(FLOATS),
        max_new_tokens=draw(st.one_of(st.integers(-2, 4), INT32)),
        stop=draw(st.lists(st.text(max_size=5), max_size=2)),
        stop_token_ids=draw(st.lists(TOKEN, max_size=2)),
    )
    if draw(st.booleans()):
        pb.seed = draw(st.integers(0, 2**64 - 1))
    return pb


@st.composite
def connect_streams(draw: st.DrawFn, fingerprint: str) -> list[registry_pb2.ConnectRequest]:
    """What a worker could send up its Connect stream: a registration (right, wrong or
    missing) and then reports, mostly about assignments that do not exist."""
    register = registry_pb2.RegisterWorker(
        worker_id=draw(st.sampled_from(["", "fuzz-w"]) | st.text(min_size=1).map("fuzz-".__add__)),
        kind=cast(
            Any, draw(st.sampled_from([1, 1, 2, 2]) | st.integers(-2, 5))
        ),  # DRAFT, ORACLE, junk
        model=draw(st.text(max_size=10)),
        vocab_fingerprint=draw(st.just(fingerprint) | st.text(max_size=12)),
        address=draw(st.sampled_from(["", "127.0.0.1:1"]) | st.text(max_size=12)),
        max_sessions=draw(st.integers(0, 4) | INT32),
        vocab_size=draw(INT32),
        max_context=draw(INT32),
        eos_token_ids=draw(st.lists(INT32, max_size=3)),
    )
    first = draw(st.sampled_from(["register", "register", "register", "load", "empty"]))
    messages = [
        registry_pb2.ConnectRequest(register=register)
        if first == "register"
        else registry_pb2.ConnectRequest(load=registry_pb2.WorkerLoad())
        if first == "load"
        else registry_pb2.ConnectRequest()
    ]
    assignment = st.sampled_from(["", "a"]) | st.text(max_size=10)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["load", "commit", "finished", "failed", "opened", "again"]))
        if kind == "load":
            load = registry_pb2.WorkerLoad(
                active_sessions=draw(INT32), kv_cache_bytes=draw(st.integers(-(2**63), 2**63 - 1))
            )
            messages.append(registry_pb2.ConnectRequest(load=load))
        elif kind == "commit":
            commit = registry_pb2.AssignmentCommit(
                assignment_id=draw(assignment), base_length=draw(INT32), token_ids=draw(TOKENS)
            )
            messages.append(registry_pb2.ConnectRequest(commit=commit))
        elif kind == "finished":
            finished = registry_pb2.AssignmentFinished(
                assignment_id=draw(assignment), finish_reason=cast(Any, draw(st.integers(-1, 9)))
            )
            messages.append(registry_pb2.ConnectRequest(finished=finished))
        elif kind == "failed":
            failed = registry_pb2.AssignmentFailed(
                assignment_id=draw(assignment), status_code=draw(INT32), message="x"
            )
            messages.append(registry_pb2.ConnectRequest(failed=failed))
        elif kind == "opened":
            opened = registry_pb2.AssignmentOpened(assignment_id=draw(assignment))
            messages.append(registry_pb2.ConnectRequest(opened=opened))
        else:
            messages.append(registry_pb2.ConnectRequest(register=register))  # twice
    return messages


# -- the targets -------------------------------------------------------------------

# Found by this fuzzing: a subnormal temperature overflowed logits / T to inf, softmax
# gave NaN, and the oracle failed with INTERNAL (fixed in specdec/core/sampling.py).
NASTY_GENERATES: list[dict[str, Any]] = [
    {"temperature": 1e-45, "k": 0},
    {"temperature": 1e-45, "k": 4},
    {"temperature": 1e-40, "k": 4, "drafter": "ngram"},
    {"temperature": 1.0, "top_k": 2**31 - 1, "k": 4},
    {"temperature": 1.0, "top_p": 1e-45, "k": 4},
    {"temperature": 3e38, "k": 4},
]


def test_fuzz_generate(rig: Rig) -> None:
    stub = gateway_pb2_grpc.GatewayStub(rig.gateway)

    def check(request: gateway_pb2.GenerateRequest) -> None:
        CASES["Generate"] += 1
        responses: list[gateway_pb2.GenerateResponse] = []
        code = code_of(lambda: responses.extend(stub.Generate(request, timeout=30)))
        OUTCOMES["Generate", code.name] += 1
        if request.speculation.drafter not in common_pb2.DrafterKind.values():
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        if code == grpc.StatusCode.OK:
            tokens = [t for r in responses for t in r.token_ids]
            assert responses[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
            assert all(0 <= t < VOCAB for t in tokens)
            assert len(tokens) <= (request.sampling.max_new_tokens or 4)

    for kwargs in NASTY_GENERATES:
        check(build_request([1, 5, 9], max_new_tokens=4, **kwargs))
    given(request=generate_requests())(settings(FUZZ, max_examples=150)(check))()


def run_verify_stream(stub: oracle_pb2_grpc.OracleStub, steps: list[Step]) -> grpc.StatusCode:
    """Send the steps one at a time, each after the answer to the previous one, so that
    relative base lengths refer to the committed length the oracle really reached."""
    outbox: queue.Queue[oracle_pb2.VerifyRequest | None] = queue.Queue()
    call = stub.Verify(iter(outbox.get, None), timeout=30)
    length = 0
    try:
        for kind, message in steps:
            if kind == "relative":
                message.block.base_length = max(-(2**31), length + message.block.base_length)
            outbox.put(message)
            response = next(call, None)
            if response is None:
                break
            if response.HasField("opened"):
                length = response.opened.committed_length
            else:
                verdict = response.verdict
                block = message.block
                assert 0 <= verdict.next_token_id < VOCAB
                assert 0 <= verdict.num_accepted <= len(block.token_ids)
                assert verdict.committed_length == block.base_length + verdict.num_accepted + 1
                length = verdict.committed_length
                OUTCOMES["Verify", "verdicts"] += 1
        outbox.put(None)
        list(call)  # the stream's end (and its status)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert code in DOCUMENTED, f"{code.name}: {exc.details()}"
        assert exc.details(), "an error needs a message a user can act on"
        return code
    finally:
        outbox.put(None)
        call.cancel()
    return grpc.StatusCode.OK


def test_fuzz_verify_streams(rig: Rig) -> None:
    stub = oracle_pb2_grpc.OracleStub(rig.oracle)

    @settings(FUZZ, max_examples=200)
    @given(steps=verify_streams(rig.bystander))
    def case(steps: list[Step]) -> None:
        CASES["Verify"] += 1
        OUTCOMES["Verify", run_verify_stream(stub, steps).name] += 1

    case()


def test_fuzz_worker_connect_streams(rig: Rig) -> None:
    stub = registry_pb2_grpc.WorkerRegistryStub(rig.gateway)
    fingerprint = list_workers(rig.cluster.address)["oracle-a"].vocab_fingerprint

    @settings(FUZZ, max_examples=80)
    @given(messages=connect_streams(fingerprint))
    def case(messages: list[registry_pb2.ConnectRequest]) -> None:
        CASES["Connect"] += 1
        code = code_of(lambda: list(stub.Connect(iter(messages), timeout=10)))
        OUTCOMES["Connect", code.name] += 1

    case()
    # Every fake worker is gone with its stream; the real ones are untouched.
    wait_until(
        lambda: set(list_workers(rig.cluster.address)) == {"oracle-a", "draft-a"},
        what="only the real workers listed",
    )


def test_fuzz_unary_calls(rig: Rig) -> None:
    gateway = gateway_pb2_grpc.GatewayStub(rig.gateway)
    oracle = oracle_pb2_grpc.OracleStub(rig.oracle)

    @settings(FUZZ, max_examples=80)
    @given(which=st.integers(0, 3), session_id=st.text(max_size=40))
    def case(which: int, session_id: str) -> None:
        CASES["unary"] += 1
        if which == 0:
            request = gateway_pb2.GetSessionRequest(session_id=session_id)
            # Unknown or someone else's: NOT_FOUND either way, so ids cannot be probed.
            assert code_of(lambda: gateway.GetSession(request)) == grpc.StatusCode.NOT_FOUND
        elif which == 1:
            close = gateway_pb2.CloseSessionRequest(session_id=session_id)
            assert code_of(lambda: gateway.CloseSession(close)) == grpc.StatusCode.NOT_FOUND
        elif which == 2:
            release = oracle_pb2.ReleaseSessionRequest(session_id="fuzz-" + session_id)
            assert code_of(lambda: oracle.ReleaseSession(release)) == grpc.StatusCode.OK
        else:
            info = oracle.GetInfo(oracle_pb2.GetInfoRequest())
            assert info.vocab_size == VOCAB and info.active_sessions >= 0
            assert info.kv_cache_bytes >= 0

    case()
    empty = oracle_pb2.ReleaseSessionRequest(session_id="")
    assert code_of(lambda: oracle.ReleaseSession(empty)) == grpc.StatusCode.INVALID_ARGUMENT


def test_after_the_fuzzing_everything_is_up_and_other_sessions_are_untouched(rig: Rig) -> None:
    total = sum(CASES.values())
    print(f"fuzz cases: {dict(CASES)}, total {total}; outcomes {dict(sorted(OUTCOMES.items()))}")
    assert total >= MIN_CASES, CASES
    # The strategies reach both sides: accepted requests and refused ones, in every stream.
    for target in ("Generate", "Verify", "Connect"):
        codes = {code for (t, code), n in OUTCOMES.items() if t == target and n}
        assert "OK" in codes and len(codes) >= 2, (target, codes)
    assert OUTCOMES["Verify", "verdicts"] >= 50  # blocks got past validation to the model
    assert all(service.alive() for service in rig.cluster.services)
    for address in (rig.cluster.address, rig.oracle_address):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    follow_up = [40, 41, 42]
    with Client(rig.cluster.address, timeout=60) as client:
        result = client.generate(
            follow_up, session_id=rig.bystander, max_new_tokens=16, k=4, ignore_eos=True
        )
        assert result.token_ids == reference(rig.oracle_path, rig.bystander_context + follow_up, 16)
        state = client.get_session(rig.bystander)
        assert list(state.token_ids) == rig.bystander_context + follow_up + result.token_ids
