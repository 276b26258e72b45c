"""The application client of the gateway, sync (``Client``) and asyncio (``AsyncClient``).

    from specdec.client import Client

    with Client("localhost:50051") as client:
        for piece in client.stream("def fib(n):", max_new_tokens=64):
            print(piece.text, end="", flush=True)
        result = client.generate("import os", temperature=0.8, seed=1)
        print(result.text, result.stats.acceptance_rate)
        reply = client.chat([{"role": "user", "content": "Hi!"}])  # the chat template

A prompt is text, token ids, or messages (``{"role", "content"}`` mappings), which the
gateway renders with the oracle's chat template; in a session, a chat turn sends its
new messages only.

Errors arrive as ``grpc.RpcError`` with the gateway's status code and message.
Over TLS, with a token: ``Client.tls("gw:50051", ca="ca.crt", token=...)``
(``cert=``/``key=`` too when the gateway requires client certificates).

A stream that ends UNAVAILABLE (its gateway died, or a replica went away) is
resumed by itself: the client names every turn (``turn_id``), reconnects to the
same gateway or the next of several (``Client("gw-a:50051,gw-b:50051")``) and
asks for the turn's tokens after those it has. The output is the one an
uninterrupted stream gives. After ``resume_attempts`` failed tries, or
``resume_within_s`` seconds, the last error is raised; a session that is gone
raises NOT_FOUND at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from specdec.core.types import ChatMessage, DrafterKind, Speculation, TokenLogprob
from specdec.rpc import convert
from specdec.rpc.channels import CHANNEL_OPTIONS
from specdec.rpc.security import tls_credentials
from specdec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# Text, token ids, or a conversation of {"role", "content"} messages.
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def chat_messages(messages: Sequence[Mapping[str, str]]) -> list[ChatMessage]:
    """``[{"role": ..., "content": ...}, ...]`` -> ChatMessages (ValueError when malformed)."""
    out = []
    for i, message in enumerate(messages):
        try:
            out.append(ChatMessage(str(message["role"]), str(message["content"])))
        except (KeyError, TypeError):
            raise ValueError(f"messages[{i}] must be a {{'role', 'content'}} mapping") from None
    return out


def drafter_kind(drafter: DrafterKind | str | None) -> DrafterKind:
    """ "model", "ngram", "none", "auto" (or None: auto) -> DrafterKind."""
    if drafter is None:
        return Speculation.drafter
    try:
        return DrafterKind(drafter)
    except ValueError:
        raise ValueError(
            f"drafter must be one of {[d.value for d in DrafterKind]}, got {drafter!r}"
        ) from None


@dataclass
class Completion:
    """A whole generation: its text, token ids, why it stopped and what it cost."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stats: common_pb2.GenerationStats = field(default_factory=common_pb2.GenerationStats)
    session_id: str = ""
    # One per token id when the request set ``logprobs``: the oracle's log-probability.
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, response: gateway_pb2.GenerateResponse) -> None:
        self.text += response.text
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(convert.logprobs_from_pb(response.logprobs))
        self.session_id = response.session_id or self.session_id
        if response.finish_reason:
            name = common_pb2.FinishReason.Name(response.finish_reason)
            self.finish_reason = name.removeprefix("FINISH_REASON_").lower()
            self.stats = response.stats


# Resuming a cut stream: tries, and the time they may take in all (a gateway restart
# takes seconds: the process starts, loads its tokenizer and opens its store).
RESUME_ATTEMPTS = 8
RESUME_WITHIN_S = 60.0
# Reconnect quickly to a gateway that comes back (gRPC's default backoff grows to 120 s).
CLIENT_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def gateway_addresses(address: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> the addresses, in order."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    addresses = [a.strip() for a in parts if a.strip()]
    if not addresses:
        raise ValueError("give at least one gateway address (host:port)")
    return addresses


def build_request(
    prompt: Prompt,
    *,
    session_id: str = "",
    turn_id: str | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    max_new_tokens: int = 0,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    k: int | None = Speculation.k,
    adaptive: bool | None = Speculation.adaptive,
    drafter: DrafterKind | str | None = Speculation.drafter,
    pipeline_depth: int | None = Speculation.pipeline_depth,
    branches: int | None = Speculation.branches,
    rescue: bool | None = Speculation.rescue,
) -> gateway_pb2.GenerateRequest:
    """A GenerateRequest from keyword arguments.

    ``logprobs``: None = none; n in [0, 20]: each token's log-probability under the
    oracle and the n likeliest tokens' (``Completion.logprobs``).
    The speculation settings are ``specdec.core.types.Speculation``'s: None = the
    server's default (k and adaptive: the gateway's, the controller with k up to 8 unless
    it was started otherwise; the others: the draft's); k=0: the oracle alone; k set
    without adaptive: exactly k.
    They are not checked here: the gateway answers INVALID_ARGUMENT, naming the field.
    ``turn_id``: what the turn is resumed by (None: a fresh UUID).
    """
    sampling = common_pb2.SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        sampling.seed = seed
    if logprobs is not None:
        sampling.logprobs = logprobs
    speculation = convert.speculation_to_pb(
        Speculation(
            k=k,
            adaptive=adaptive,
            drafter=drafter_kind(drafter),
            pipeline_depth=pipeline_depth,
            branches=branches,
            rescue=rescue,
        )
    )
    request = gateway_pb2.GenerateRequest(
        session_id=session_id,
        sampling=sampling,
        speculation=speculation,
        turn_id=uuid.uuid4().hex if turn_id is None else turn_id,
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt and all(isinstance(m, Mapping) for m in prompt):
        request.messages.extend(convert.messages_to_pb(chat_messages(prompt)))  # type: ignore[arg-type]
    else:
        request.prompt_token_ids.extend(prompt)  # type: ignore[arg-type]
    return request


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _resumable(exc: grpc.RpcError) -> bool:
    """Whether the stream broke in a way a resume can mend (sync and aio errors)."""
    code = getattr(exc, "code", None)
    return callable(code) and code() == grpc.StatusCode.UNAVAILABLE


@dataclass
class _Resumer:
    """The bookkeeping of one stream's resumption: tries left, time left, the backoff."""

    attempts: int
    within_s: float
    tries: int = 0
    backoff_s: float = 0.1
    deadline: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.within_s

    received: int = 0  # tokens of the turn the client has

    def seen(self, response: gateway_pb2.GenerateResponse) -> gateway_pb2.GenerateResponse:
        self.received += len(response.token_ids)
        return response

    def retry_after(self, exc: grpc.RpcError, request: gateway_pb2.GenerateRequest) -> float:
        """Seconds to wait before sending ``request`` again to resume its turn; raises
        ``exc`` when the stream cannot be resumed (another error, no tries left)."""
        self.tries += 1
        resumable = _resumable(exc) and self.tries <= self.attempts
        if not resumable or time.monotonic() >= self.deadline:
            raise exc
        request.resume_after_tokens = self.received
        wait, self.backoff_s = self.backoff_s, min(self.backoff_s * 2, 2.0)
        return wait

    @property
    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class _Gateways:
    """The channels to the gateways a client knows; calls go to the current one."""

    _channels: list[Any]
    _current: int = 0

    def _order(self, resumer: _Resumer) -> tuple[list[int], float]:
        """The gateways to try, from the current one on, and how long to wait for each."""
        count = len(self._channels)
        per_try = max(0.2, min(2.0, resumer.time_left / count))
        return [(self._current + step) % count for step in range(count)], per_try

    def _use(self, index: int | None) -> None:
        """Call gateway ``index`` from now on (None: none was ready, the next one)."""
        self._current = (self._current + 1) % len(self._channels) if index is None else index
        self._channel = self._channels[self._current]
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)


class Client(_Gateways):
    """Blocking client. ``timeout`` (seconds) is each call's deadline."""

    def __init__(
        self,
        address: str | Sequence[str] = "localhost:50051",
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        resume_attempts: int = RESUME_ATTEMPTS,
        resume_within_s: float = RESUME_WITHIN_S,
    ) -> None:
        self._channels = [
            grpc.insecure_channel(a, options=CLIENT_CHANNEL_OPTIONS)
            if credentials is None
            else grpc.secure_channel(a, credentials, options=CLIENT_CHANNEL_OPTIONS)
            for a in gateway_addresses(address)
        ]
        self._use(0)
        self._metadata = _metadata(token)
        self._timeout = timeout
        self._resume_attempts = resume_attempts
        self._resume_within_s = resume_within_s

    def _reconnect(self, resumer: _Resumer, wait_s: float) -> None:
        """Wait, then use the first gateway (from the current one on) that is ready."""
        time.sleep(wait_s)
        order, per_try = self._order(resumer)
        for index in order:
            try:
                grpc.channel_ready_future(self._channels[index]).result(timeout=per_try)
            except grpc.FutureTimeoutError:
                continue
            return self._use(index)
        self._use(None)

    @classmethod
    def tls(
        cls,
        address: str,
        *,
        ca: str | Path | bytes | None = None,
        cert: str | Path | bytes | None = None,
        key: str | Path | bytes | None = None,
        **kwargs: Any,
    ) -> Client:
        """A client over TLS: ``ca`` (path or PEM) verifies the gateway (None: the system's
        roots); ``cert`` + ``key`` are a client certificate, for a gateway requiring mTLS."""
        return cls(address, credentials=tls_credentials(ca, cert, key), **kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[gateway_pb2.GenerateResponse]:
        """Yield GenerateResponse messages as tokens are committed (see ``build_request``);
        a stream cut by a gateway's death is resumed (see the module docstring)."""
        request = build_request(prompt, **kwargs)
        resumer = _Resumer(self._resume_attempts, self._resume_within_s)
        while True:
            try:
                call = self._stub.Generate(request, timeout=self._timeout, metadata=self._metadata)
                yield from map(resumer.seen, call)
                return
            except grpc.RpcError as exc:
                self._reconnect(resumer, resumer.retry_after(exc, request))

    def generate(self, prompt: Prompt, **kwargs: Any) -> Completion:
        completion = Completion()
        for response in self.stream(prompt, **kwargs):
            completion.add(response)
        return completion

    def chat(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> Completion:
        """The assistant's reply to ``messages`` (the chat template's rendering)."""
        if not messages:
            raise ValueError("chat needs at least one message")
        return self.generate(messages, **kwargs)

    def create_session(self) -> str:
        reply = self._stub.CreateSession(
            gateway_pb2.CreateSessionRequest(), timeout=self._timeout, metadata=self._metadata
        )
        return str(reply.session_id)

    def get_session(self, session_id: str) -> gateway_pb2.GetSessionResponse:
        return self._stub.GetSession(
            gateway_pb2.GetSessionRequest(session_id=session_id),
            timeout=self._timeout,
            metadata=self._metadata,
        )

    def close_session(self, session_id: str) -> int:
        reply = self._stub.CloseSession(
            gateway_pb2.CloseSessionRequest(session_id=session_id),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        return int(reply.token_count)

    def list_workers(self) -> list[gateway_pb2.WorkerInfo]:
        reply = self._stub.ListWorkers(
            gateway_pb2.ListWorkersRequest(), timeout=self._timeout, metadata=self._metadata
        )
        return list(reply.workers)


class AsyncClient(_Gateways):
    """asyncio client with the same methods as ``Client``, awaitable."""

    def __init__(
        self,
        address: str | Sequence[str] = "localhost:50051",
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        resume_attempts: int = RESUME_ATTEMPTS,
        resume_within_s: float = RESUME_WITHIN_S,
    ) -> None:
        self._channels = [
            grpc.aio.insecure_channel(a, options=CLIENT_CHANNEL_OPTIONS)
            if credentials is None
            else grpc.aio.secure_channel(a, credentials, options=CLIENT_CHANNEL_OPTIONS)
            for a in gateway_addresses(address)
        ]
        self._use(0)
        self._metadata = _metadata(token)
        self._timeout = timeout
        self._resume_attempts = resume_attempts
        self._resume_within_s = resume_within_s

    async def _reconnect(self, resumer: _Resumer, wait_s: float) -> None:
        """Wait, then use the first gateway (from the current one on) that is ready."""
        await asyncio.sleep(wait_s)
        order, per_try = self._order(resumer)
        for index in order:
            try:
                await asyncio.wait_for(self._channels[index].channel_ready(), per_try)
            except TimeoutError:
                continue
            return self._use(index)
        self._use(None)

    @classmethod
    def tls(
        cls,
        address: str,
        *,
        ca: str | Path | bytes | None = None,
        cert: str | Path | bytes | None = None,
        key: str | Path | bytes | None = None,
        **kwargs: Any,
    ) -> AsyncClient:
        """A client over TLS: ``ca`` (path or PEM) verifies the gateway (None: the system's
        roots); ``cert`` + ``key`` are a client certificate, for a gateway requiring mTLS."""
        return cls(address, credentials=tls_credentials(ca, cert, key), **kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def stream(
        self, prompt: Prompt, **kwargs: Any
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """As ``Client.stream``: a stream cut by a gateway's death is resumed."""
        request = build_request(prompt, **kwargs)
        resumer = _Resumer(self._resume_attempts, self._resume_within_s)
        while True:
            try:
                call = self._stub.Generate(request, timeout=self._timeout, metadata=self._metadata)
                async for response in call:
                    yield resumer.seen(response)
                return
            except grpc.RpcError as exc:
                await self._reconnect(resumer, resumer.retry_after(exc, request))

    async def generate(self, prompt: Prompt, **kwargs: Any) -> Completion:
        completion = Completion()
        async for response in self.stream(prompt, **kwargs):
            completion.add(response)
        return completion

    async def chat(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> Completion:
        """The assistant's reply to ``messages`` (the chat template's rendering)."""
        if not messages:
            raise ValueError("chat needs at least one message")
        return await self.generate(messages, **kwargs)

    async def create_session(self) -> str:
        reply = await self._stub.CreateSession(
            gateway_pb2.CreateSessionRequest(), timeout=self._timeout, metadata=self._metadata
        )
        return str(reply.session_id)

    async def get_session(self, session_id: str) -> gateway_pb2.GetSessionResponse:
        return await self._stub.GetSession(
            gateway_pb2.GetSessionRequest(session_id=session_id),
            timeout=self._timeout,
            metadata=self._metadata,
        )

    async def close_session(self, session_id: str) -> int:
        reply = await self._stub.CloseSession(
            gateway_pb2.CloseSessionRequest(session_id=session_id),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        return int(reply.token_count)

    async def list_workers(self) -> list[gateway_pb2.WorkerInfo]:
        reply = await self._stub.ListWorkers(
            gateway_pb2.ListWorkersRequest(), timeout=self._timeout, metadata=self._metadata
        )
        return list(reply.workers)
