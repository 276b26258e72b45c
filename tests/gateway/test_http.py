"""The OpenAI-compatible HTTP API, end to end: the official ``openai`` client and plain
``curl`` against a gateway, an oracle and a draft as real processes, on a tiny model
with a chat template (ChatML, tests/conftest.py).

Greedy outputs are compared with HF ``generate`` of the oracle alone; sessions, errors,
authentication and a client that disconnects are checked against the services' own
counters (the oracle's GetInfo, the gateway's sessions).
"""

from __future__ import annotations

import functools
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch

from specdec.client import Client
from specdec.launch import Cluster, cluster, free_port
from tests.cluster_tools import oracle_info, reference, wait_until
from tests.conftest import EOS_ID, build_chat_tokenizer
from tests.fault_proxy import FaultProxy

PROMPT = "the quick brown fox"
LONG = 100  # tokens: a disconnect after the first chunks lands mid-generation


@dataclass
class Rig:
    cluster: Cluster
    url: str  # http://127.0.0.1:PORT
    oracle_path: Path
    oracle_port: int
    proxy: FaultProxy  # between the gateway (and the draft) and the oracle
    tokenizer: Any

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    @property
    def model(self) -> str:
        return str(self.oracle_path)


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, chat_model_dir: Callable[[str], Path]
) -> Iterator[Rig]:
    oracle_path = chat_model_dir("oracle")
    with cluster(tmp_path_factory.mktemp("http")) as c:
        http_port, oracle_port = free_port(), free_port()
        c.start_gateway("--tokenizer", str(oracle_path), "--http-port", str(http_port))
        proxy = FaultProxy("127.0.0.1", oracle_port)
        c.start_oracle(
            oracle_path,
            "--advertise-address",
            proxy.address,
            oracle_id="oracle-a",
            port=oracle_port,
        )
        c.start_draft(chat_model_dir("close_draft"), draft_id="draft-a")
        try:
            c.wait_workers(oracles=1, drafts=1)
            yield Rig(
                c, f"http://127.0.0.1:{http_port}", oracle_path, oracle_port, proxy,
                build_chat_tokenizer(),
            )  # fmt: skip
        finally:
            proxy.close()


def http(
    method: str, url: str, body: Any = None, token: str | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of a plain HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def _chat_reference(model_path: str, prompt: tuple[int, ...], max_new_tokens: int) -> list[int]:
    """HF greedy generate of the oracle alone, stopping at EOS or ChatML's <|im_end|>."""
    stops = [EOS_ID, build_chat_tokenizer().convert_tokens_to_ids("<|im_end|>")]
    return reference(Path(model_path), prompt, max_new_tokens, stops)


def chat_ids(rig: Rig, messages: list[dict[str, str]]) -> list[int]:
    text = rig.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(rig.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_equal_the_oracle_alone(rig: Rig, k: int, stream: bool) -> None:
    client = rig.openai()
    prompt_ids = rig.tokenizer(PROMPT)["input_ids"]
    expected = rig.tokenizer.decode(
        reference(rig.oracle_path, prompt_ids, 24), skip_special_tokens=True
    )
    request: dict[str, Any] = {
        "model": rig.model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
        "extra_body": {"ignore_eos": True, "specdec": {"k": k}},
    }  # fmt: skip
    if not stream:
        completion = client.completions.create(**request)
        text, finish, usage = (
            completion.choices[0].text,
            completion.choices[0].finish_reason,
            completion.usage,
        )
        stats = completion.model_extra["specdec"]
    else:
        chunks = list(
            client.completions.create(
                **request, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = next(
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        )
        usage = chunks[-1].usage  # the last chunk: no choices, the usage
        assert not chunks[-1].choices
        (stats,) = [
            c.model_extra["specdec"] for c in chunks if (c.model_extra or {}).get("specdec")
        ]
    assert text == expected
    assert finish == "length"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), 24)
    assert stats["drafter"] == ("model" if k else "none") and stats["output_tokens"] == 24
    assert stats["oracle_id"] == "oracle-a" and stats["rounds"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_completions_equal_the_oracle_alone_on_the_chat_template(
    rig: Rig, stream: bool
) -> None:
    client = rig.openai()
    messages = [
        {"role": "system", "content": "you are a tiny model"},
        {"role": "user", "content": "the cat sat on the mat"},
    ]
    expected_ids = _chat_reference(str(rig.oracle_path), tuple(chat_ids(rig, messages)), 20)
    expected = rig.tokenizer.decode(expected_ids, skip_special_tokens=True)
    request = {"model": rig.model, "messages": messages, "max_tokens": 20, "temperature": 0}
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True))  # type: ignore[call-overload]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        completion = client.chat.completions.create(**request)  # type: ignore[call-overload]
        message = completion.choices[0].message
        assert message.role == "assistant"
        text, finish = message.content, completion.choices[0].finish_reason
        assert completion.usage.prompt_tokens == len(chat_ids(rig, messages))
    assert text == expected
    assert finish == ("stop" if len(expected_ids) < 20 else "length")


def test_a_chat_turn_stops_at_the_templates_end_of_turn(rig: Rig) -> None:
    """The ChatML model ends this reply with <|im_end|> (not EOS) well before max_tokens:
    the turn stops there, over both APIs; without the stop rules it runs on past it."""
    messages: list[Any] = [{"role": "user", "content": "the dog sat on the log"}]
    im_end = rig.tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = _chat_reference(str(rig.oracle_path), tuple(chat_ids(rig, messages)), 40)
    assert expected[-1] == im_end and len(expected) < 40  # the premise of the test
    with Client(rig.cluster.address, timeout=60) as grpc_client:
        stopped = grpc_client.chat(messages, max_new_tokens=40)
        ignored = grpc_client.chat(messages, max_new_tokens=40, ignore_eos=True)
    assert stopped.finish_reason == "stop_token" and stopped.token_ids == expected
    assert len(ignored.token_ids) == 40 and ignored.token_ids[: len(expected)] == expected
    completion = rig.openai().chat.completions.create(
        model=rig.model, messages=messages, max_tokens=40, temperature=0
    )
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(expected)


def test_a_chat_session_goes_on_over_http_and_grpc(rig: Rig) -> None:
    client = rig.openai()
    status, _, created = http("POST", rig.url + "/v1/sessions")
    assert status == 200
    session = created["id"]
    first: list[Any] = [{"role": "user", "content": "the cat"}]
    reply = client.chat.completions.create(
        model=rig.model, messages=first, max_tokens=8, temperature=0,
        extra_body={"specdec": {"session_id": session}},
    ).choices[0].message.content  # fmt: skip
    # The next turn over gRPC, with the new message only.
    second: Any = {"role": "user", "content": "and the dog"}
    with Client(rig.cluster.address, timeout=60) as grpc_client:
        before = grpc_client.get_session(session)
        result = grpc_client.chat([second], session_id=session, max_new_tokens=8)
        after = grpc_client.get_session(session)
    context = list(after.token_ids[: len(after.token_ids) - len(result.token_ids)])
    whole: list[Any] = [*first, {"role": "assistant", "content": reply}, second]
    assert result.token_ids == _chat_reference(str(rig.oracle_path), tuple(context), 8)
    if rig.tokenizer.decode(before.token_ids) == rig.tokenizer.decode(chat_ids(rig, first)) + reply:
        # The first reply is plain text (no special token): the template is prefix-stable
        # here, and the context is exactly the whole conversation rendered.
        assert context == chat_ids(rig, whole)
    # A client that sends the whole conversation again (as OpenAI clients do) adds only
    # the new message: the same tokens as a session told the new message alone.
    third: Any = {"role": "user", "content": "a log"}
    whole.append({"role": "assistant", "content": result.text})
    client.chat.completions.create(
        model=rig.model, messages=[*whole, third], max_tokens=4, temperature=0,
        extra_body={"specdec": {"session_id": session}},
    )  # fmt: skip
    with Client(rig.cluster.address, timeout=60) as grpc_client:
        resent = grpc_client.get_session(session).token_ids
        other = grpc_client.create_session()
        grpc_client.chat(first, session_id=other, max_new_tokens=8)
        grpc_client.chat([second], session_id=other, max_new_tokens=8)
        grpc_client.chat([third], session_id=other, max_new_tokens=4)
        assert list(grpc_client.get_session(other).token_ids) == list(resent)
        grpc_client.close_session(other)
    status, _, info = http("GET", f"{rig.url}/v1/sessions/{session}")
    assert status == 200 and info["turns"] == 3 and info["chat"] is True
    assert info["token_count"] == len(resent)
    # A plain prompt cannot continue a chat.
    with pytest.raises(openai.BadRequestError, match="is a chat"):
        client.completions.create(
            model=rig.model, prompt="x", extra_body={"specdec": {"session_id": session}}
        )
    status, _, closed = http("DELETE", f"{rig.url}/v1/sessions/{session}")
    assert status == 200 and closed["token_count"] == len(resent)
    with pytest.raises(openai.NotFoundError, match="no session"):
        client.completions.create(
            model=rig.model, prompt="x", extra_body={"specdec": {"session_id": session}}
        )


def _curl(*args: str) -> str:
    done = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_curl_streams_server_sent_events(rig: Rig) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = json.loads(_curl(rig.url + "/v1/completions", "-d", json.dumps(body)))
    events = _curl(
        "-N", rig.url + "/v1/completions",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({**body, "stream": True}),
    ).split("\n\n")  # fmt: skip
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 12


def test_errors_are_openai_shaped_with_their_http_status(rig: Rig) -> None:
    client = rig.openai()
    with pytest.raises(openai.BadRequestError, match="temperature") as bad:
        client.completions.create(model=rig.model, prompt="x", temperature=-1)
    assert bad.value.status_code == 400
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert bad.value.body["code"] == "invalid_argument"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.completions.create(model=rig.model, prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match=r"specdec\.k must be in"):
        client.completions.create(model=rig.model, prompt="x", extra_body={"specdec": {"k": 99}})
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(
            model=rig.model, messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be"):
        client.chat.completions.create(
            model=rig.model, messages=[{"role": "user", "content": "x"}], logprobs=True,
            top_logprobs=21,
        )  # fmt: skip
    # The same bound over gRPC.
    with Client(rig.cluster.address, timeout=60) as c, pytest.raises(grpc.RpcError) as refused:
        c.generate(PROMPT, logprobs=21)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprobs must be None or an integer in [0, 20]" in str(refused.value.details())
    with pytest.raises(openai.NotFoundError, match="does not exist here") as missing:
        client.completions.create(model="gpt-4o", prompt="x")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert [m.id for m in client.models.list()] == [rig.model]
    status, _, body = http("POST", rig.url + "/v1/nothing", {})
    assert status == 404 and "not a route" in body["error"]["message"]
    not_json = _curl("-w", "\n%{http_code}", rig.url + "/v1/completions", "-d", "{nope")
    assert not_json.endswith("\n400") and "not valid JSON" in not_json
    status, _, body = http("GET", rig.url + "/health")
    assert (status, body) == (200, {"status": "ok", "oracles": 1, "drafts": 1})


@pytest.mark.parametrize("k", [0, 4])
def test_a_client_that_disconnects_mid_stream_cancels_the_turn(rig: Rig, k: int) -> None:
    client = rig.openai()
    rig.proxy.delay_s = 0.02  # every round crosses the slow link: 100 rounds outlast the test
    try:
        for persistent in (False, True):
            wait_until(lambda: oracle_info(rig.oracle_port).active_sessions == 0)
            kv: int = oracle_info(rig.oracle_port).kv_cache_bytes
            session = http("POST", rig.url + "/v1/sessions")[2]["id"] if persistent else ""
            received = 0
            with client.completions.create(
                model=rig.model, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "specdec": {"k": k, "session_id": session}},
            ) as stream:  # fmt: skip
                for chunk in stream:
                    received += len(rig.tokenizer(chunk.choices[0].text)["input_ids"])
                    if received >= 6:
                        assert oracle_info(rig.oracle_port).active_sessions == 1
                        break  # leaving the block closes the connection
            # The turn stops: its Verify stream closes; a one-off request's KV is freed.
            wait_until(lambda: oracle_info(rig.oracle_port).active_sessions == 0, timeout=5)
            if not persistent:
                freed = functools.partial(_kv_is, rig.oracle_port, kv)
                wait_until(freed, what="the one-off request's KV freed")
                continue
            # The session kept what was committed, far less than the turn asked for, and
            # is free for its next turn.
            status, _, info = http("GET", f"{rig.url}/v1/sessions/{session}")
            prompt_tokens = len(rig.tokenizer(PROMPT)["input_ids"])
            assert status == 200 and prompt_tokens < info["token_count"] < prompt_tokens + LONG
            rig.proxy.delay_s = 0.0
            more = client.completions.create(
                model=rig.model, prompt=" more", max_tokens=2, temperature=0,
                extra_body={"specdec": {"session_id": session}},
            )  # fmt: skip
            assert (more.model_extra or {})["specdec"]["session_id"] == session
            http("DELETE", f"{rig.url}/v1/sessions/{session}")
    finally:
        rig.proxy.delay_s = 0.0


def _kv_is(port: int, kv_bytes: int) -> bool:
    return bool(oracle_info(port).kv_cache_bytes == kv_bytes)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    """A gateway with application tokens for alice and bob, at most 3 sessions, small
    input limits, the demo tokenizer (no chat template) and no worker at all."""
    with cluster(tmp_path_factory.mktemp("http-auth")) as c:
        http_port = free_port()
        c.start_gateway(
            "--http-port", str(http_port), "--auth-tokens", "alice:tok-a,bob:tok-b",
            "--worker-token", "tok-w", "--max-sessions", "3", "--worker-wait-s", "0.2",
            "--max-prompt-chars", "64", "--max-request-bytes", "4096",
        )  # fmt: skip
        url = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: _reachable(url + "/health"), timeout=120, what="HTTP API up")
        yield c, url


def _reachable(url: str) -> bool:
    try:
        return http("GET", url)[0] == 200
    except OSError:
        return False


def test_bearer_tokens_principals_and_limits_apply_over_http(locked: tuple[Cluster, str]) -> None:
    c, url = locked

    def as_(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0)

    status, _, body = http("GET", url + "/v1/models")
    assert status == 401 and "needs a bearer token" in body["error"]["message"]
    assert body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError, match="not a valid application token"):
        as_("tok-w").models.list()  # the worker token is no application token
    assert http("GET", url + "/health")[0] == 200  # probes need no token
    # A session is its creator's, over either API: alice's gRPC session is hers over
    # HTTP, and does not exist for bob.
    with Client(c.address, token="tok-a", timeout=10) as alice:
        session = alice.create_session()
    assert http("GET", f"{url}/v1/sessions/{session}", token="tok-a")[0] == 200
    assert http("GET", f"{url}/v1/sessions/{session}", token="tok-b")[0] == 404
    # The gateway's input limits, before any work: the prompt's characters (a chat's
    # too), and the body's bytes, unread past the limit.
    for route, body in (
        ("completions", {"prompt": "x" * 65}),
        ("chat/completions", {"messages": [{"role": "user", "content": "x" * 65}]}),
    ):
        status, _, refused = http("POST", f"{url}/v1/{route}", body, token="tok-a")
        assert status == 400 and "--max-prompt-chars" in refused["error"]["message"]
    status, _, refused = http("POST", url + "/v1/completions", {"prompt": "x" * 5000}, "tok-a")
    assert status == 413 and "--max-request-bytes" in refused["error"]["message"]
    # No oracle registered: 503, with a Retry-After.
    status, headers, body = http(
        "POST", url + "/v1/completions", {"prompt": "hello", "max_tokens": 2}, token="tok-a"
    )
    assert status == 503 and headers["retry-after"] == "1"
    assert "no oracle is registered" in body["error"]["message"]
    # The demo tokenizer has no chat template: the flag that supplies one is named.
    with pytest.raises(openai.BadRequestError, match="--chat-template"):
        as_("tok-a").chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hi"}]
        )
    with Client(c.address, token="tok-a", timeout=10) as alice, pytest.raises(grpc.RpcError) as no:
        alice.chat([{"role": "user", "content": "hi"}])
    assert no.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--chat-template" in str(no.value.details())
    # The session limit (3): alice's, two more, then 429. The one-off that got 503 holds
    # no place: an HTTP client cannot resume it, so its session is gone with it.
    created = [http("POST", url + "/v1/sessions", token="tok-b") for _ in range(3)]
    assert [status for status, _, _ in created] == [200, 200, 429]
    assert created[2][2]["error"]["type"] == "rate_limit_error"


@functools.cache
def _oracle_logprobs(model_path: str, tokens: tuple[int, ...], start: int, t: float) -> list[Any]:
    """log_softmax of the oracle's logits (/ T when T > 0) predicting tokens[start:], in
    float32 from one forward of the whole sequence: (per token its own, the full row)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(tokens)])).logits[0].float()
    z = logits[start - 1 : len(tokens) - 1]
    rows = torch.log_softmax(z / t if t > 0 else z, dim=-1)
    return [(float(row[token]), row) for row, token in zip(rows, tokens[start:], strict=True)]


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_oracles_own_and_change_no_token(
    rig: Rig, k: int, temperature: float
) -> None:
    messages: list[Any] = [{"role": "user", "content": "the dog sat on the log"}]
    sampling = {"max_new_tokens": 16, "temperature": temperature, "seed": 5, "ignore_eos": True}
    with Client(rig.cluster.address, timeout=60) as grpc_client:
        plain = grpc_client.chat(messages, k=k, **sampling)
        asked = grpc_client.chat(messages, k=k, logprobs=3, **sampling)
    assert asked.token_ids == plain.token_ids and not plain.logprobs  # no token changes
    assert len(asked.logprobs) == len(asked.token_ids) == 16
    prompt = chat_ids(rig, messages)
    expected = _oracle_logprobs(
        str(rig.oracle_path), (*prompt, *asked.token_ids), len(prompt), temperature
    )
    for got, (logprob, row) in zip(asked.logprobs, expected, strict=True):
        assert got.logprob == pytest.approx(logprob, abs=1e-4)
        top = torch.topk(row, 3)
        assert list(got.top_token_ids) == top.indices.tolist()
        assert list(got.top_logprobs) == pytest.approx(top.values.tolist(), abs=1e-4)
    # The same numbers over HTTP, whole and streamed, with each token's text.
    client = rig.openai()
    request: dict[str, Any] = {
        "model": rig.model, "messages": messages, "max_tokens": 16, "temperature": temperature,
        "seed": 5, "logprobs": True, "top_logprobs": 3,
        "extra_body": {"ignore_eos": True, "specdec": {"k": k}},
    }  # fmt: skip
    whole = client.chat.completions.create(**request)
    assert whole.choices[0].message.content == asked.text
    assert whole.choices[0].logprobs is not None
    content = whole.choices[0].logprobs.content or []
    streamed = [
        entry
        for chunk in client.chat.completions.create(**request, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    for entries in (content, streamed):
        assert [e.token for e in entries] == [rig.tokenizer.decode([t]) for t in asked.token_ids]
        assert [e.logprob for e in entries] == pytest.approx(
            [lp.logprob for lp in asked.logprobs], abs=1e-6
        )
        assert [len(e.top_logprobs) for e in entries] == [3] * 16
    # The legacy completions format, one alternative.
    completion = client.completions.create(
        model=rig.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
        extra_body={"ignore_eos": True, "specdec": {"k": k}},
    )  # fmt: skip
    legacy = completion.choices[0].logprobs
    assert legacy is not None and legacy.token_logprobs and legacy.top_logprobs
    assert len(legacy.token_logprobs) == 6 and all(len(t) == 1 for t in legacy.top_logprobs)
    assert "".join(legacy.tokens or []) == completion.choices[0].text
