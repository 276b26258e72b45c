"""The gateway's public operations, free of protobuf and JSON.

The gRPC servicer (``gateway/servicer.py``) and the OpenAI-compatible HTTP API
(``gateway/http/``) both convert their requests into these calls and their answers
out of them: one path for a turn, whatever the transport. A ``GenerateCall`` is
checked (``gateway/limits.py``) and its prompt tokenized, off the event loop, before any
worker is asked for anything; then, under
the session's turn lock, the turn is begun (a chat's prompt rendered after the
session's conversation, ``gateway/chat.py``) or resumed (``gateway/resume.py``), and
``TurnRunner.run`` streams its ``Chunk``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gateway.chat import NO_TEMPLATE, ChatHistory, ChatTemplate
from gateway.generation import Chunk, TurnRequest, TurnRunner
from gateway.limits import RequestLimits
from gateway.registry import Worker
from gateway.resume import check_turn_id, plan
from gateway.sessions import Session, SessionTable, ephemeral_session_id
from specdec.core.errors import InvalidArgument, NotFound, Unavailable
from specdec.core.sampling import SamplingParams, resolve_seed
from specdec.core.types import ChatMessage, DrafterKind, Speculation
from specdec.telemetry.gateway import request_observer

log = logging.getLogger(__name__)


# How long a resumed turn waits for the session's turn lock: a dead replica's lock
# expires within its TTL (gateway.store.redis.LOCK_TTL_S), a live gateway lets go as
# soon as it notices that the client of the cut stream is gone.
RESUME_LOCK_WAIT_S = 15.0


@dataclass(frozen=True)
class GenerateCall:
    """One Generate request: exactly one of ``prompt`` (text), ``prompt_token_ids`` and
    ``messages`` (a chat); ``params`` validated, its stop ids without EOS (added here
    unless ``ignore_eos``); ``speculation`` validated, unset fields the defaults.
    ``turn_id`` names the turn (``resume_after``: resume it, ``gateway.resume``)."""

    turn_id: str
    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    messages: tuple[ChatMessage, ...] = ()
    session_id: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False
    speculation: Speculation = field(default_factory=Speculation)
    resume_after: int | None = None
    # The client can name the turn again to resume it: a one-off cut by UNAVAILABLE or
    # by the gateway's stop keeps its session (False: the HTTP API, which cannot).
    resumable: bool = True

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


class GatewayApi:
    """Generate and the session operations, for any transport."""

    def __init__(
        self,
        runner: TurnRunner,
        sessions: SessionTable,
        tokenizer: Any,
        *,
        chat: ChatTemplate | None = None,
        default_k: int,
        default_max_new_tokens: int,
        default_adaptive: bool,
        limits: RequestLimits,
    ) -> None:
        self.runner = runner
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.chat = chat
        # What a request leaves unset: k, and whether the controller chooses it (up to k).
        self.defaults = Speculation(k=default_k, adaptive=default_adaptive)
        self.default_max_new_tokens = default_max_new_tokens
        self.limits = limits
        # Off the event loop, one prompt at a time (a fast tokenizer is not thread-safe).
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        # Set when the gateway stops: the turns it cuts are resumed on another replica.
        self.draining = False

    def drain(self) -> None:
        """The gateway is stopping: the one-off turns it cuts stay resumable elsewhere."""
        self.draining = True

    def close(self) -> None:
        """The gateway has stopped: no more prompts to tokenize."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, work: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work, *args)

    # -- Generate ------------------------------------------------------------

    async def generate(self, call: GenerateCall, owner: str) -> AsyncGenerator[Chunk, None]:
        """The turn's chunks, as the runner commits them. Every check of the request
        happens before the first chunk is asked of a worker."""
        turn = await self._turn_request(call)
        session = await self._session_of(call, turn, owner)
        # A resumed turn waits for the lock of the gateway it was cut on: a dead
        # replica's expires, a live one lets go once it sees its client gone.
        wait_s = RESUME_LOCK_WAIT_S if turn.resume_after is not None else 0.0
        async with self.sessions.turn(session, wait_s) as session:
            resumable = started = False
            try:
                after = plan(session, turn.turn_id, turn.resume_after)
                if after is not None and session.turn is not None:
                    t = session.turn  # its own durable prompt and parameters
                    prompt = session.tokens[t.start : t.prompt_end]
                    turn = TurnRequest(
                        prompt, t.params, t.speculation, turn.turn_id, after, chat=t.chat
                    )
                else:
                    new = dataclasses.replace(turn, resume_after=None)
                    turn = await self._prompt(session, call, new)
                started = True
                # Closed here, under the turn lock: a cancelled turn notes its workers
                # in the session before the lock lets go (not when garbage-collected).
                async with contextlib.aclosing(self._run(session, turn)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            except Unavailable:
                resumable = True  # the client may resume it: a one-off's session stays
                raise
            finally:
                kept = call.resumable and (resumable or self.draining)
                if session.ephemeral and not kept:
                    await self.sessions.discard(session)
                    if started:
                        await self.release_caches(session.session_id)

    async def _turn_request(self, call: GenerateCall) -> TurnRequest:
        """The request checked, its text tokenized; a chat's prompt comes later, from its
        session (``_prompt``)."""
        forms = [n for n in ("prompt", "prompt_token_ids", "messages") if getattr(call, n)]
        if len(forms) > 1:
            raise InvalidArgument(f"set one of prompt, prompt_token_ids and messages, not {forms}")
        check_turn_id(call.turn_id, call.resume_after)
        _check_messages(call.messages)
        contexts = [o.info.max_context for o in self.runner.registry.oracles()]
        # A chat's text is its messages' contents (the template adds a bounded few each).
        text = call.prompt or "".join(m.content for m in call.messages)
        self.limits.check(text, call.params.stop, max(contexts, default=0))
        if call.is_chat and self.chat is None:
            raise InvalidArgument(NO_TEMPLATE)
        speculation = call.speculation.over(self.defaults)
        if speculation.drafter is DrafterKind.NONE:
            speculation = dataclasses.replace(speculation, k=0)
        prompt_ids = list(call.prompt_token_ids)
        if call.prompt:
            prompt_ids = await self._off_loop(self._tokenize, call.prompt)
        if not prompt_ids and not call.is_chat:
            raise InvalidArgument("the prompt is empty: set prompt, prompt_token_ids or messages")
        params = self._with_stops(call)
        params = dataclasses.replace(params, seed=resolve_seed(params.seed))
        return TurnRequest(prompt_ids, params, speculation, call.turn_id, call.resume_after)

    async def _session_of(self, call: GenerateCall, turn: TurnRequest, owner: str) -> Session:
        """The request's session; a one-off request's own (found again by its turn id)."""
        if call.session_id:
            return await self.sessions.get(call.session_id, owner)
        session_id = ephemeral_session_id(owner, turn.turn_id)
        session = await self.sessions.find(session_id, owner)
        if session is not None:
            return session
        if turn.resume_after:
            raise NotFound(
                f"cannot resume turn {turn.turn_id!r}: the one-off request is gone (it "
                "finished, was cancelled, or expired)"
            )
        return await self.sessions.create(owner, ephemeral=True, session_id=session_id)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    async def _prompt(self, session: Session, call: GenerateCall, turn: TurnRequest) -> TurnRequest:
        """A new turn's prompt: a chat's rendered after the session's conversation; a
        plain prompt only where no chat is going on."""
        latest = session.turn
        if not call.is_chat:
            if latest is not None and latest.chat is not None:
                raise InvalidArgument(
                    f"session {call.session_id!r} is a chat: continue it with messages, or "
                    "create another session for plain prompts"
                )
            return turn
        assert self.chat is not None
        history = None
        if latest is not None and latest.chat is not None:
            reply = session.tokens[latest.prompt_end :]
            history = ChatHistory.of(latest.chat, self._decode_text(reply), self._decode_raw(reply))
        elif session.tokens:
            raise InvalidArgument(
                f"session {call.session_id!r} holds plain-prompt turns; messages continue "
                "only a chat session: create another session for the chat"
            )
        new = history.new_messages(call.messages) if history else list(call.messages)
        chat_turn = await self._off_loop(self.chat.turn, history, new)
        return dataclasses.replace(
            turn, prompt_ids=chat_turn.token_ids, chat=chat_turn.record(history)
        )

    def stop_token_ids(self, *, chat: bool) -> tuple[int, ...]:
        """Where a turn stops besides its own stop ids: EOS, and a chat's end of turn."""
        ids = list(self.runner.eos_token_ids())
        if chat and self.chat is not None:
            ids += [i for i in self.chat.end_of_turn_ids if i not in ids]
        return tuple(ids)

    def _with_stops(self, call: GenerateCall) -> SamplingParams:
        params = call.params
        if call.ignore_eos:
            return params
        own = params.stop_token_ids
        extra = tuple(i for i in self.stop_token_ids(chat=call.is_chat) if i not in own)
        return dataclasses.replace(params, stop_token_ids=own + extra)

    async def _run(self, session: Session, turn: TurnRequest) -> AsyncGenerator[Chunk, None]:
        watch = request_observer(  # None when telemetry is off
            session.session_id,
            len(turn.prompt_ids),
            turn.params,
            turn.k,
            not session.ephemeral,
            chat=turn.chat is not None,
        )
        try:
            async with contextlib.aclosing(self.runner.run(session, turn)) as chunks:
                async for chunk in chunks:
                    if watch is not None:
                        watch.chunk(chunk)
                    yield chunk
        finally:
            if watch is not None:
                watch.close()

    def _decode_raw(self, token_ids: list[int]) -> str:
        """Text of token ids as a template writes it: special tokens kept."""
        return str(self.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False))

    def _decode_text(self, token_ids: list[int]) -> str:
        """Text of token ids as the client is sent it."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # -- sessions and workers -------------------------------------------------

    async def create_session(self, owner: str) -> Session:
        for expired in await self.sessions.expire_idle():
            await self.release_caches(expired)
        return await self.sessions.create(owner)

    async def get_session(self, session_id: str, owner: str) -> Session:
        return await self.sessions.get(session_id, owner)

    def session_text(self, session: Session) -> str:
        return self._decode_text(session.tokens)

    async def close_session(self, session_id: str, owner: str) -> Session:
        session = await self.sessions.close(session_id, owner)
        await self.release_caches(session.session_id)
        return session

    def workers(self) -> list[Worker]:
        """Registered workers, oracles and drafts apart, each by id."""
        return sorted(self.runner.registry.workers(), key=lambda w: (w.info.kind, w.worker_id))

    def models(self) -> list[str]:
        """The models the registered oracles serve (what the output is exactly that of)."""
        return sorted({o.info.model for o in self.runner.registry.oracles()})

    async def release_caches(self, session_id: str) -> None:
        """Tell every worker to forget this session's KV cache (best effort: soft state)."""
        # Every worker, not only the session's: a turn cancelled or failed over before
        # it ended left caches on workers the session never recorded.
        for worker in self.runner.registry.workers():
            await worker.release_session(session_id)


def _check_messages(messages: tuple[ChatMessage, ...]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message.role, str) or not message.role:
            raise InvalidArgument(f"messages[{i}].role must be a non-empty string")
        if not isinstance(message.content, str):
            raise InvalidArgument(f"messages[{i}].content must be a string")
