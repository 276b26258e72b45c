"""The OpenAI-compatible HTTP API: its routes, as a Starlette app over ``GatewayApi``.

    POST /v1/completions, POST /v1/chat/completions   (``stream: true``: server-sent events)
    GET  /v1/models                                   the oracles' models
    POST /v1/sessions, GET|DELETE /v1/sessions/{id}   specdec sessions (``specdec.session_id``)
    GET  /health                                      200 while the gateway serves

A request runs the same turn as gRPC Generate (``GatewayApi.generate``): the same
checks, sessions (bound to the principal of the same bearer tokens), admission limits
and traces. Errors are OpenAI-shaped with the HTTP status of their gRPC status
(``gateway/http/errors.py``); a turn is started only once the request is known good,
and nothing is sent before its first chunk, so an error before it still gets its
status. A client that disconnects cancels its turn as a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.api import GatewayApi
from gateway.generation import Chunk
from gateway.http.errors import HttpError, http_error
from gateway.http.requests import OpenAIRequest, chat_request, completion_request
from gateway.http.responses import Answer
from specdec.rpc.security import TokenTable, authenticate, bearer_token
from specdec.rpc.server import MAX_MESSAGE_BYTES

T = TypeVar("T")

HOW_TO_AUTHENTICATE = (
    "send the header `Authorization: Bearer <application token>` (OpenAI(api_key=...))"
)


class ClientGone(Exception):
    """The client closed the connection before the answer was complete."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result; ``ClientGone`` (``work`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
    if task.cancelled():
        raise ClientGone()
    return task.result()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class EventStream(Response):
    """A turn streamed as server-sent events; the turn is cancelled (its session's KV
    released like a cancelled gRPC call's) when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        # No super().__init__: it would render an empty body and its content-length.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._events = events

    async def _produce(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._events.aclose()  # ends the turn now, not when collected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(ClientGone, OSError):
            await until_disconnect(receive, self._produce(send))


class HttpApi:
    """The routes' handlers over one ``GatewayApi``."""

    def __init__(self, api: GatewayApi, tokens: TokenTable | None) -> None:
        self._api = api
        self._tokens = tokens if tokens else None
        self.serving = True  # False while the gateway shuts down: /health says 503
        self._token_texts: dict[int, str] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self._handler(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._handler(self.chat), methods=["POST"]),
            Route("/v1/models", self._handler(self.models), methods=["GET"]),
            Route("/v1/sessions", self._handler(self.create_session), methods=["POST"]),
            Route(
                "/v1/sessions/{session_id}",
                self._handler(self.session),
                methods=["GET", "DELETE"],
            ),
            Route("/health", self.health, methods=["GET"]),
        ]

    @staticmethod
    def _handler(
        handle: Callable[[Request, str], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handle`` after authentication, its failures as OpenAI-shaped errors."""

        async def endpoint(request: Request) -> Response:
            api: HttpApi = request.app.state.http_api
            try:
                return await handle(request, api._principal(request))
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            except Exception as exc:
                return error_response(exc)

        return endpoint

    def _token_text(self, token_id: int) -> str:
        """A token's own text, as the logprobs show it (decoded once per id)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = str(self._api.tokenizer.decode([token_id]))
        return text

    def _principal(self, request: Request) -> str:
        if self._tokens is None:
            return ""
        token = bearer_token(request.headers.get("authorization"))
        return authenticate(self._tokens, token, "the HTTP API", HOW_TO_AUTHENTICATE)

    # -- generation ----------------------------------------------------------

    async def completions(self, request: Request, owner: str) -> Response:
        body = await read_json(request, self._api.limits.max_request_bytes)
        parsed = completion_request(body, default_max_new_tokens=self._api.default_max_new_tokens)
        return await self._generate(request, owner, parsed, chat=False)

    async def chat(self, request: Request, owner: str) -> Response:
        body = await read_json(request, self._api.limits.max_request_bytes)
        parsed = chat_request(body, default_max_new_tokens=self._api.default_max_new_tokens)
        return await self._generate(request, owner, parsed, chat=True)

    async def _generate(
        self, request: Request, owner: str, parsed: OpenAIRequest, *, chat: bool
    ) -> Response:
        served = self._api.models()
        if parsed.model and served and parsed.model not in served:
            raise HttpError(
                404,
                f"the model {parsed.model!r} does not exist here; this gateway serves "
                f"{served} (GET /v1/models)",
                code="model_not_found",
                param="model",
            )
        model = parsed.model or (served[0] if served else "")
        answer = Answer(chat, model, parsed.call.session_id, self._token_text)
        turn = self._api.generate(parsed.call, owner)
        streaming = False
        try:
            # The first chunk before any byte is sent: an error until then gets its status.
            first = await until_disconnect(request.receive, _first(turn))
            answer.add(first)
            if parsed.stream:
                streaming = True  # the stream closes the turn
                return EventStream(_events(answer, first, turn, parsed.include_usage))
            return JSONResponse(await until_disconnect(request.receive, _collect(turn, answer)))
        finally:
            if not streaming:
                await turn.aclose()

    # -- models, sessions, health ---------------------------------------------

    async def models(self, request: Request, owner: str) -> Response:
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "specdec"}
            for model in self._api.models()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def create_session(self, request: Request, owner: str) -> Response:
        session = await self._api.create_session(owner)
        return JSONResponse({"id": session.session_id, "object": "session"})

    async def session(self, request: Request, owner: str) -> Response:
        session_id = request.path_params["session_id"]
        if request.method == "DELETE":
            closed = await self._api.close_session(session_id, owner)
            return JSONResponse(
                {"id": session_id, "object": "session", "deleted": True,
                 "token_count": len(closed.tokens)}
            )  # fmt: skip
        session = await self._api.get_session(session_id, owner)
        return JSONResponse(
            {
                "id": session.session_id,
                "object": "session",
                "token_count": len(session.tokens),
                "turns": session.turns,
                "chat": session.turn is not None and session.turn.chat is not None,
                "created": session.created_unix_ms // 1000,
                "oracle_id": session.oracle_id,
                "draft_id": session.draft_id,
            }
        )

    async def health(self, request: Request) -> Response:
        workers = self._api.workers()
        oracles = sum(w.is_oracle for w in workers)
        return JSONResponse(
            {
                "status": "ok" if self.serving else "shutting down",
                "oracles": oracles,
                "drafts": len(workers) - oracles,
            },
            status_code=200 if self.serving else 503,
        )


async def _first(turn: AsyncIterator[Chunk]) -> Chunk:
    async for chunk in turn:
        return chunk
    raise RuntimeError("the turn ended without a chunk")


async def _collect(turn: AsyncIterator[Chunk], answer: Answer) -> dict[str, Any]:
    async for chunk in turn:
        answer.add(chunk)
    return answer.whole()


async def _events(
    answer: Answer, first: Chunk, turn: AsyncGenerator[Chunk, None], include_usage: bool
) -> AsyncGenerator[bytes, None]:
    try:
        head = answer.stream_chunk(first, first=True)
        if head is not None:
            yield _sse(head)
        async for chunk in turn:
            answer.add(chunk)
            event = answer.stream_chunk(chunk, first=False)
            if event is not None:
                yield _sse(event)
        if include_usage:
            yield _sse(answer.usage_chunk())
    except Exception as exc:  # after the status went out: an error event, as vLLM sends
        _, body = http_error(exc)
        yield _sse(body)
    finally:
        await turn.aclose()
    yield b"data: [DONE]\n\n"


async def read_json(request: Request, limit: int = MAX_MESSAGE_BYTES) -> Any:
    """The request's JSON body; 413 past ``limit`` bytes (``--max-request-bytes``, read
    no further), 400 when it is not JSON."""
    too_large = f"the request body is over the limit of {limit} bytes (--max-request-bytes)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HttpError(413, too_large)
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise HttpError(413, too_large)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise HttpError(400, f"the request body is not valid JSON: {exc}") from None


def error_response(exc: BaseException) -> Response:
    status, body = http_error(exc)
    headers = {"retry-after": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    message = f"{request.method} {request.url.path} is not a route of this server"
    if status == 405:
        message = f"{request.url.path} does not take {request.method}"
    return error_response(HttpError(status, message))


def build_app(api: GatewayApi, tokens: TokenTable | None) -> Starlette:
    """The Starlette app of the HTTP API (``app.state.http_api``: its ``HttpApi``)."""
    http_api = HttpApi(api, tokens)
    app = Starlette(routes=http_api.routes(), exception_handlers={404: _not_found, 405: _not_found})
    app.state.http_api = http_api
    return app
