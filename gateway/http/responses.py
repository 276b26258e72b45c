"""The gateway's ``Chunk``s -> OpenAI's response objects, whole or as stream chunks.

A completion's extra field ``specdec`` holds the turn's speculation statistics (the
names of ``GenerationStats`` in ``protos/specdec/v1/common.proto``) and its session.
Streamed, it rides on the chunk that carries the ``finish_reason``; ``usage`` comes as
OpenAI sends it, in a last chunk with no choices when ``stream_options.include_usage``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.generation import Chunk, TurnSummary
from specdec.core.stopping import FinishReason
from specdec.core.types import TokenLogprob
from specdec.rpc.convert import stats_fields

# Our finish reasons -> OpenAI's ("stop": the model's end or a stop sequence).
_FINISH: dict[FinishReason, str] = {
    FinishReason.LENGTH: "length",
    FinishReason.CONTEXT_LIMIT: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_TOKEN: "stop",
    FinishReason.STOP_STRING: "stop",
}


def finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else _FINISH[reason]


TokenText = Callable[[int], str]


def _top(logprob: TokenLogprob, token_text: TokenText) -> list[tuple[str, float]]:
    return [
        (token_text(i), v) for i, v in zip(logprob.top_token_ids, logprob.top_logprobs, strict=True)
    ]


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], token_text: TokenText
) -> list[dict[str, Any]]:
    """The entries of a chat choice's ``logprobs.content``, one per token."""
    out = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text = token_text(token_id)
        out.append(
            {
                "token": text,
                "logprob": lp.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())}
                    for t, v in _top(lp, token_text)
                ],
            }
        )
    return out


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob],
    token_text: TokenText,
    offset: int = 0,
) -> dict[str, Any]:
    """A completion choice's ``logprobs`` (the legacy format); ``offset``: the text before."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [dict(_top(lp, token_text)) for lp in logprobs],
        "text_offset": offsets,
    }


def speculation_stats(summary: TurnSummary, session_id: str) -> dict[str, Any]:
    """The ``specdec`` field: the session and the turn's statistics."""
    return {
        "session_id": session_id,
        **stats_fields(summary.stats),
        "oracle_id": summary.oracle_id,
        "draft_id": summary.draft_id,
        "drafter": summary.drafter.value,
        "failovers": summary.failovers,
    }


def usage(summary: TurnSummary) -> dict[str, int]:
    prompt, completion = summary.stats.prompt_tokens, summary.stats.output_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclass
class Answer:
    """One request's answer as it is built: its id, model, and what came so far."""

    chat: bool
    model: str
    session_id: str
    token_text: TokenText  # a token id's text (for logprobs)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
    summary: TurnSummary | None = None

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        if chunk.logprobs:
            self.token_ids.extend(chunk.token_ids)
            self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason
            self.summary = chunk.summary
            if chunk.summary is not None and chunk.summary.model:
                self.model = chunk.summary.model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self) -> dict[str, Any]:
        """The non-streamed response, once every chunk was added."""
        assert self.summary is not None
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(self.finish)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice["text"] = text
            obj = "text_completion"
        choice["logprobs"] = self._logprobs(self.token_ids, self.logprobs)
        return {
            **self._head(obj),
            "choices": [choice],
            "usage": usage(self.summary),
            "specdec": speculation_stats(self.summary, self.session_id),
        }

    def stream_chunk(self, chunk: Chunk, first: bool) -> dict[str, Any] | None:
        """The stream chunk of ``chunk`` (added already); None: nothing to send."""
        finish = finish_reason(chunk.finish_reason)
        if not chunk.text and finish is None and not first and not chunk.logprobs:
            return None
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text or first else {}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
            obj = "chat.completion.chunk"
        else:
            choice["text"] = chunk.text
            obj = "text_completion"
        choice["logprobs"] = None
        if chunk.logprobs:
            before = sum(len(t) for t in self.text) - len(chunk.text)  # ``chunk`` is added
            choice["logprobs"] = self._logprobs(chunk.token_ids, chunk.logprobs, before)
        choice["finish_reason"] = finish
        out = {**self._head(obj), "choices": [choice]}
        if chunk.summary is not None:
            out["specdec"] = speculation_stats(chunk.summary, self.session_id)
        return out

    def _logprobs(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], offset: int = 0
    ) -> Any:
        """A choice's ``logprobs`` (None when not asked for); ``offset``: the length of the
        text before these tokens (a completion's text offsets)."""
        if not logprobs:
            return None
        if self.chat:
            return {"content": chat_logprobs(token_ids, logprobs, self.token_text)}
        return completion_logprobs(token_ids, logprobs, self.token_text, offset)

    def usage_chunk(self) -> dict[str, Any]:
        """The last stream chunk of ``stream_options.include_usage``."""
        assert self.summary is not None
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(self.summary)}
