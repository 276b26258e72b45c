"""OpenAI request bodies -> the gateway's ``GenerateCall``, checked field by field.

``POST /v1/completions`` and ``POST /v1/chat/completions`` take OpenAI's fields:
``prompt`` or ``messages``, ``max_tokens`` (chat: ``max_completion_tokens`` too),
``temperature`` (default 1, as OpenAI's), ``top_p``, ``seed``, ``stop``, ``stream``
(+ ``stream_options.include_usage``), ``logprobs`` / ``top_logprobs``, ``n`` = 1;
vLLM's ``top_k``, ``ignore_eos`` and ``stop_token_ids``; and ours in ``specdec``:
``{k, adaptive, drafter, pipeline_depth, branches, rescue, session_id}``. Fields
OpenAI clients send with their neutral value (``frequency_penalty: 0``...) are
accepted; any other value of a feature the gateway does not have is a 400 naming
it, never silently ignored. Unknown fields are ignored, as OpenAI clients add some.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.api import GenerateCall
from specdec.core.errors import InvalidArgument
from specdec.core.sampling import MAX_LOGPROBS, SamplingParams
from specdec.core.types import ChatMessage, DrafterKind, Speculation

# Fields of features the gateway does not have, with the values that mean "not used".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}

_SPECDEC_FIELDS = ("k", "adaptive", "drafter", "pipeline_depth", "branches", "rescue", "session_id")


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed request: the turn to run and how to answer."""

    call: GenerateCall
    model: str  # as asked ("" = whichever the gateway serves)
    stream: bool
    include_usage: bool  # streamed: a last chunk with the usage, as OpenAI's


def completion_request(body: Any, *, default_max_new_tokens: int) -> OpenAIRequest:
    """A ``/v1/completions`` body."""
    body = _object(body, "the request body")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    text, ids = "", ()
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise InvalidArgument("prompt: one prompt per request (a batch is not supported)")
    else:
        raise InvalidArgument("prompt must be a string or a list of token ids")
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    return _request(
        body,
        GenerateCall(_turn_id(), prompt=text, prompt_token_ids=ids),
        max_tokens=_integer(body, "max_tokens", None, 1),
        default_max_new_tokens=default_max_new_tokens,
        top_logprobs=logprobs,
    )


def chat_request(body: Any, *, default_max_new_tokens: int) -> OpenAIRequest:
    """A ``/v1/chat/completions`` body."""
    body = _object(body, "the request body")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("messages must be a non-empty list of {role, content} objects")
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    wants = _boolean(body, "logprobs", False)
    if top is not None and not wants:
        raise InvalidArgument("top_logprobs needs logprobs: true")
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1)
    return _request(
        body,
        GenerateCall(_turn_id(), messages=messages),
        max_tokens=max_tokens,
        default_max_new_tokens=default_max_new_tokens,
        top_logprobs=(top or 0) if wants else None,
    )


def _request(
    body: Mapping[str, Any],
    call: GenerateCall,
    *,
    max_tokens: int | None,
    default_max_new_tokens: int,
    top_logprobs: int | None,
) -> OpenAIRequest:
    for name, neutral in _NEUTRAL.items():
        if name in body and not any(body[name] == v for v in neutral):
            raise InvalidArgument(f"{name}={body[name]!r} is not supported by this server")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidArgument("stop must be a non-empty string or a list of them")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
        raise InvalidArgument("stop_token_ids must be a list of token ids")
    top_k = _integer(body, "top_k", 0, -1) or 0
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0),
        top_k=0 if top_k == -1 else top_k,  # vLLM's -1: no limit
        top_p=_number(body, "top_p", 1.0),
        seed=_integer(body, "seed", None, 0),
        max_new_tokens=max_tokens or default_max_new_tokens,
        stop_token_ids=tuple(stop_ids),
        stop=tuple(stops),
        logprobs=top_logprobs,
    )
    params.validate()
    extra = _object(body.get("specdec") or {}, "specdec")
    unknown = sorted(set(extra) - set(_SPECDEC_FIELDS))
    if unknown:
        raise InvalidArgument(f"specdec: unknown fields {unknown}; known: {list(_SPECDEC_FIELDS)}")
    session_id = extra.get("session_id") or ""
    if not isinstance(session_id, str):
        raise InvalidArgument("specdec.session_id must be a string (from POST /v1/sessions)")
    options = _object(body.get("stream_options") or {}, "stream_options")
    call = GenerateCall(
        call.turn_id,
        prompt=call.prompt,
        prompt_token_ids=call.prompt_token_ids,
        messages=call.messages,
        session_id=session_id,
        params=params,
        ignore_eos=_boolean(body, "ignore_eos", False),
        speculation=_speculation(extra),
        resumable=False,  # an OpenAI client cannot name the turn again
    )
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string (GET /v1/models lists them)")
    return OpenAIRequest(
        call=call,
        model=model,
        stream=_boolean(body, "stream", False),
        include_usage=_boolean(options, "include_usage", False),
    )


def _turn_id() -> str:
    return uuid.uuid4().hex


def _speculation(extra: Mapping[str, Any]) -> Speculation:
    drafter = extra.get("drafter")
    try:
        kind = DrafterKind(drafter) if drafter is not None else Speculation.drafter
    except ValueError:
        raise InvalidArgument(
            f"specdec.drafter must be one of {[d.value for d in DrafterKind]}, got {drafter!r}"
        ) from None
    speculation = Speculation(
        k=extra.get("k"),
        adaptive=_boolean(extra, "adaptive", None),
        drafter=kind,
        pipeline_depth=extra.get("pipeline_depth"),
        branches=extra.get("branches"),
        rescue=_boolean(extra, "rescue", None),
    )
    speculation.validate(lambda name: f"specdec.{name}")
    return speculation


def _message(raw: Any, i: int) -> ChatMessage:
    message = _object(raw, f"messages[{i}]")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidArgument(f"messages[{i}].role must be a non-empty string")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidArgument(f"messages[{i}].content: a text part needs a string text")
            texts.append(text)
        content = "".join(texts)
    if not isinstance(content, str):
        raise InvalidArgument(f"messages[{i}].content must be a string or a list of text parts")
    return ChatMessage(role, content)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(
    body: Mapping[str, Any], name: str, default: int | None, low: int, high: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be an integer {bounds}, got {value!r}")
    return int(value)


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a number, got {value!r}")
    return float(value)


def _boolean(body: Mapping[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r}")
    return value
