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
"""

from __future__ import annotations

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


def build_request(
    prompt: Prompt,
    *,
    session_id: str = "",
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
    adaptive: bool = Speculation.adaptive,
    drafter: DrafterKind | str | None = Speculation.drafter,
    pipeline_depth: int | None = Speculation.pipeline_depth,
    branches: int | None = Speculation.branches,
    rescue: bool | None = Speculation.rescue,
) -> gateway_pb2.GenerateRequest:
    """A GenerateRequest from keyword arguments.

    ``logprobs``: None = none; n in [0, 20]: each token's log-probability under the
    oracle and the n likeliest tokens' (``Completion.logprobs``).
    The speculation settings are ``specdec.core.types.Speculation``'s: None = the
    server's default (k: the gateway's; the others: the draft's); k=0: the oracle alone.
    They are not checked here: the gateway answers INVALID_ARGUMENT, naming the field.
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
        session_id=session_id, sampling=sampling, speculation=speculation
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


class Client:
    """Blocking client. ``timeout`` (seconds) is each call's deadline."""

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = _metadata(token)
        self._timeout = timeout

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
        self._channel.close()

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[gateway_pb2.GenerateResponse]:
        """Yield GenerateResponse messages as tokens are committed (see ``build_request``)."""
        request = build_request(prompt, **kwargs)
        yield from self._stub.Generate(request, timeout=self._timeout, metadata=self._metadata)

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


class AsyncClient:
    """asyncio client with the same methods as ``Client``, awaitable."""

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = _metadata(token)
        self._timeout = timeout

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
        await self._channel.close()

    async def stream(
        self, prompt: Prompt, **kwargs: Any
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        request = build_request(prompt, **kwargs)
        call = self._stub.Generate(request, timeout=self._timeout, metadata=self._metadata)
        async for response in call:
            yield response

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
