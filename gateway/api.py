"""The gateway's public operations, free of protobuf and JSON.

The gRPC servicer (``gateway/servicer.py``) and the OpenAI-compatible HTTP API
(``gateway/http/``) both convert their requests into these calls and their answers
out of them: one path for a turn, whatever the transport. A ``GenerateCall`` is
checked and its prompt tokenized (or its chat rendered, ``gateway/chat.py``) before
any worker is asked for anything; then the session's lock, ``TurnRunner.run`` and
the turn's ``Chunk``s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gateway.chat import NO_TEMPLATE, ChatHistory, ChatTemplate, ChatTurn
from gateway.generation import Chunk, TurnRequest, TurnRunner
from gateway.registry import Worker
from gateway.sessions import Session, SessionTable
from specdec.core.errors import FailedPrecondition, InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import ChatMessage, DrafterKind, Speculation
from specdec.telemetry.gateway import request_observer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateCall:
    """One Generate request: exactly one of ``prompt`` (text), ``prompt_token_ids`` and
    ``messages`` (a chat); ``params`` validated, its stop ids without EOS (added here
    unless ``ignore_eos``); ``speculation`` validated, unset fields the defaults."""

    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    messages: tuple[ChatMessage, ...] = ()
    session_id: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False
    speculation: Speculation = field(default_factory=Speculation)

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
    ) -> None:
        self.runner = runner
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.chat = chat
        self.default_k = default_k
        self.default_max_new_tokens = default_max_new_tokens

    # -- Generate ------------------------------------------------------------

    async def generate(self, call: GenerateCall, owner: str) -> AsyncGenerator[Chunk, None]:
        """The turn's chunks, as the runner commits them. Every check of the request
        happens before the first chunk is asked of a worker."""
        forms = [n for n in ("prompt", "prompt_token_ids", "messages") if getattr(call, n)]
        if len(forms) > 1:
            raise InvalidArgument(f"set one of prompt, prompt_token_ids and messages, not {forms}")
        if call.is_chat:
            _check_messages(call.messages)
            if self.chat is None:
                raise InvalidArgument(NO_TEMPLATE)
        speculation = call.speculation.over(Speculation(k=self.default_k))
        if speculation.drafter is DrafterKind.NONE:
            speculation = dataclasses.replace(speculation, k=0)
        prompt_ids = list(call.prompt_token_ids)
        if call.prompt:
            prompt_ids = list(self.tokenizer(call.prompt)["input_ids"])
        if call.session_id:
            session = self.sessions.get(call.session_id, owner)
        else:
            session = self.sessions.create(owner, ephemeral=True)
        started = False  # workers asked for something: caches to release after a one-off
        try:
            if session.lock.locked():
                raise FailedPrecondition(
                    f"session {call.session_id!r} is already generating; one turn at a time"
                )
            chat_turn = self._chat_turn(session, call) if call.is_chat else None
            if chat_turn is not None:
                prompt_ids = chat_turn.token_ids
            elif session.chat is not None:
                raise InvalidArgument(
                    f"session {call.session_id!r} is a chat: continue it with messages, or "
                    "create another session for plain prompts"
                )
            if not prompt_ids:
                raise InvalidArgument(
                    "the prompt is empty: set prompt, prompt_token_ids or messages"
                )
            turn = TurnRequest(prompt_ids, self._with_stops(call), speculation)
            started = True
            async for chunk in self._run(session, turn, chat_turn):
                yield chunk
        finally:
            if session.ephemeral:
                self.sessions.discard(session)
                if started:
                    await self.release_caches(session)

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

    def _chat_turn(self, session: Session, call: GenerateCall) -> ChatTurn:
        assert self.chat is not None
        if session.tokens and session.chat is None:
            raise InvalidArgument(
                f"session {call.session_id!r} holds plain-prompt turns; messages continue "
                "only a chat session: create another session for the chat"
            )
        history = session.chat
        new = history.new_messages(call.messages) if history else list(call.messages)
        return self.chat.turn(history, new)

    async def _run(
        self, session: Session, turn: TurnRequest, chat_turn: ChatTurn | None
    ) -> AsyncIterator[Chunk]:
        watch = request_observer(  # None when telemetry is off
            session.session_id,
            len(turn.prompt_ids),
            turn.params,
            turn.k,
            not session.ephemeral,
            chat=chat_turn is not None,
        )
        reply: list[str] = []
        try:
            async with session.lock:
                session.touch()
                before = len(session.tokens)
                try:
                    async for chunk in self.runner.run(session, turn):
                        if watch is not None:
                            watch.chunk(chunk)
                        reply.append(chunk.text)
                        yield chunk
                    session.turns += 1
                    session.touch()
                finally:
                    # A reply cut short (cancelled, failed) is committed as far as it got.
                    if chat_turn is not None and len(session.tokens) > before:
                        generated = session.tokens[before + len(turn.prompt_ids) :]
                        history = session.chat = session.chat or ChatHistory()
                        chat_turn.commit(history, "".join(reply), self._decode_raw(generated))
        finally:
            if watch is not None:
                watch.close()

    def _decode_raw(self, token_ids: list[int]) -> str:
        """Text of token ids as the template writes it: special tokens kept."""
        return str(self.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False))

    # -- sessions and workers -------------------------------------------------

    async def create_session(self, owner: str) -> Session:
        for expired in self.sessions.expire_idle():
            await self.release_caches(expired)
        return self.sessions.create(owner)

    def get_session(self, session_id: str, owner: str) -> Session:
        return self.sessions.get(session_id, owner)

    def session_text(self, session: Session) -> str:
        return str(self.tokenizer.decode(session.tokens, skip_special_tokens=True))

    async def close_session(self, session_id: str, owner: str) -> Session:
        session = self.sessions.close(session_id, owner)
        await self.release_caches(session)
        return session

    def workers(self) -> list[Worker]:
        """Registered workers, oracles and drafts apart, each by id."""
        return sorted(self.runner.registry.workers(), key=lambda w: (w.info.kind, w.worker_id))

    def models(self) -> list[str]:
        """The models the registered oracles serve (what the output is exactly that of)."""
        return sorted({o.info.model for o in self.runner.registry.oracles()})

    async def release_caches(self, session: Session) -> None:
        """Tell every worker to forget this session's KV cache (best effort: soft state)."""
        # Every worker, not only the session's: a turn cancelled or failed over before
        # it ended left caches on workers the session never recorded.
        for worker in self.runner.registry.workers():
            await worker.release_session(session.session_id)


def _check_messages(messages: tuple[ChatMessage, ...]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message.role, str) or not message.role:
            raise InvalidArgument(f"messages[{i}].role must be a non-empty string")
        if not isinstance(message.content, str):
            raise InvalidArgument(f"messages[{i}].content must be a string")
