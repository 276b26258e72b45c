"""Chat prompts: messages rendered with the oracle's chat template, turn by turn.

A chat request's prompt is ``apply_chat_template(messages, add_generation_prompt=True)``
of the oracle's tokenizer (or of the gateway's ``--chat-template FILE``), tokenized
without adding special tokens again (the template writes them). Generation stops at
the template's end-of-turn token as at EOS.

In a session, a turn appends the new messages only; the committed tokens already hold
the earlier ones. Each chat turn's record in the session store holds the conversation
up to its prompt (``ChatRecord``); with the turn's reply, taken from the committed
tokens, that is the ``ChatHistory`` the next turn continues: the messages, and
``text``, what the session's committed tokens say as text (each turn's rendered
prompt, then its reply decoded with its special tokens). A new turn's prompt is then:

* the template *prefix-stable* for this conversation (the whole conversation rendered
  starts with ``text``): the rest of that rendering. The context is then exactly the
  whole conversation rendered.
* otherwise (a template that rewrites earlier messages: trims replies, drops their
  reasoning; or a reply cut short): what the template writes after the last reply,
  found by rendering the conversation with a marker as that reply's content; the
  committed reply is never rewritten (committed tokens are the truth), so the context
  is the earlier replies as generated, each closed as the template closes a reply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.store.base import ChatRecord
from specdec.core.errors import FailedPrecondition, InvalidArgument
from specdec.core.types import ChatMessage

log = logging.getLogger(__name__)

# Stands for a reply's content while finding what the template writes around it.
_MARK = "\u2063specdec-reply\u2063"

NO_TEMPLATE = (
    "the oracle's tokenizer has no chat template: start the gateway with "
    "--chat-template FILE (SPECDEC_CHAT_TEMPLATE), a Jinja template such as the "
    "model's chat_template, or send a plain prompt"
)


@dataclass(frozen=True)
class ChatHistory:
    """A chat session's conversation so far and the text its committed tokens stand for:
    its latest turn's ``ChatRecord`` (durable in the session store), then that turn's
    reply as the client got it (``reply``) and as generated (``reply_text``, special
    tokens kept)."""

    messages: tuple[ChatMessage, ...] = ()
    text: str = ""

    @classmethod
    def of(cls, record: ChatRecord, reply: str, reply_text: str) -> ChatHistory:
        return cls((*record.messages, ChatMessage("assistant", reply)), record.text + reply_text)

    def new_messages(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """The messages a turn adds: all of them, or what follows the conversation when a
        client sends it whole again (as OpenAI clients do) with the new messages at its end."""
        known = len(self.messages)
        if known and len(messages) > known and tuple(messages[:known]) == self.messages:
            return list(messages[known:])
        return list(messages)


@dataclass(frozen=True)
class ChatTurn:
    """A chat turn's prompt: the new messages, their text and token ids."""

    messages: tuple[ChatMessage, ...]
    text: str
    token_ids: list[int]

    def record(self, history: ChatHistory | None) -> ChatRecord:
        """The turn's ``ChatRecord``: the conversation and its text up to this prompt."""
        before = history or ChatHistory()
        return ChatRecord((*before.messages, *self.messages), before.text + self.text)


class ChatTemplate:
    """The template chat requests are rendered with, and its end-of-turn tokens."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self._tokenizer = tokenizer
        self._template = template  # None: the tokenizer's own
        self.end_of_turn_ids = self._end_of_turn_ids()
        self._end_of_turn_texts = [
            str(t) for t in tokenizer.convert_ids_to_tokens(list(self.end_of_turn_ids))
        ]

    @classmethod
    def load(cls, tokenizer: Any, path: str = "") -> ChatTemplate | None:
        """The template of ``path`` (a Jinja file), else the tokenizer's; None: neither."""
        if path:
            try:
                template = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise InvalidArgument(f"cannot read --chat-template {path!r}: {exc}") from None
            if not template.strip():
                raise InvalidArgument(f"--chat-template {path!r} is empty")
            return cls(tokenizer, template)
        if not getattr(tokenizer, "chat_template", None):
            return None
        return cls(tokenizer)

    def render(self, messages: Sequence[ChatMessage], *, generation_prompt: bool) -> str:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = self._tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                chat_template=self._template,
            )
        except Exception as exc:  # jinja2 TemplateError (raise_exception), TypeError...
            raise InvalidArgument(f"the chat template rejected the messages: {exc}") from None
        return str(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text: the template wrote the special tokens itself."""
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def turn(self, history: ChatHistory | None, messages: Sequence[ChatMessage]) -> ChatTurn:
        """The prompt of a turn adding ``messages`` to ``history`` (None: a new chat)."""
        if not history or not history.messages:
            text = self.render(messages, generation_prompt=True)
            return ChatTurn(tuple(messages), text, self.encode(text))
        whole = self.render([*history.messages, *messages], generation_prompt=True)
        if whole.startswith(history.text):
            text = whole[len(history.text) :]
        else:
            log.debug("chat template not prefix-stable here: continuing after the last reply")
            text = self._after_reply(history, messages)
        return ChatTurn(tuple(messages), text, self.encode(text))

    def _after_reply(self, history: ChatHistory, messages: Sequence[ChatMessage]) -> str:
        """What the template writes after the last reply when ``messages`` follow it, less
        the end-of-turn token the reply already ended with."""
        marked = [*history.messages[:-1], ChatMessage("assistant", _MARK), *messages]
        parts = self.render(marked, generation_prompt=True).split(_MARK)
        if len(parts) != 2:
            raise FailedPrecondition(
                "the chat template rewrites replies, so this session cannot be continued "
                "turn by turn: send the whole conversation without a session_id"
            )
        after = parts[1]
        for closing in self._end_of_turn_texts:
            if history.text.endswith(closing) and after.startswith(closing):
                return after[len(closing) :]
        return after

    def _end_of_turn_ids(self) -> tuple[int, ...]:
        """The special token the template writes right after a reply (ChatML's <|im_end|>,
        Llama 3's <|eot_id|>, Gemma's <end_of_turn>), if any."""
        probe = [
            ChatMessage("user", "a"),
            ChatMessage("assistant", _MARK),
            ChatMessage("user", "b"),
        ]
        try:
            after = self.render(probe, generation_prompt=False).split(_MARK)[1]
        except (InvalidArgument, IndexError):
            log.warning("could not find the chat template's end-of-turn token")
            return ()
        ids = self.encode(after)
        special = set(self._tokenizer.all_special_ids)
        special.update(
            i for i, t in self._tokenizer.added_tokens_decoder.items() if getattr(t, "special", 0)
        )
        return (ids[0],) if ids and ids[0] in special else ()
