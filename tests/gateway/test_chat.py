"""Chat prompts turn by turn (gateway/chat.py) on a real tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.chat import ChatHistory, ChatTemplate
from specdec.core.errors import InvalidArgument
from specdec.core.types import ChatMessage
from tests.conftest import build_chat_tokenizer, build_tokenizer

# ChatML that trims every message: a reply that begins or ends with white space is
# rendered otherwise than it was generated (Llama 3's and Gemma's templates trim too).
TRIMMING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim "
    "}}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_chat_tokenizer()


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def answer(
    template: ChatTemplate,
    tokenizer: Any,
    history: ChatHistory | None,
    new: list[ChatMessage],
    reply: str,
) -> tuple[list[int], ChatHistory]:
    """Run one turn as the gateway does, the model 'generating' ``reply``: the turn's
    prompt ids and the reply's ids, and the history the next turn continues."""
    turn = template.turn(history, new)
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    content = tokenizer.decode(reply_ids, skip_special_tokens=True)
    after = ChatHistory.of(turn.record(history), content, tokenizer.decode(reply_ids))
    return [*turn.token_ids, *reply_ids], after


def test_first_turn_is_the_template_with_its_generation_prompt(tokenizer: Any) -> None:
    template = ChatTemplate(tokenizer)
    messages = [ChatMessage("system", "be brief"), user("the cat")]
    turn = template.turn(None, messages)
    expected = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert turn.text == expected and turn.text.endswith("<|im_start|>assistant\n")
    # Tokenized without a second BOS: the template writes every special token itself.
    assert turn.token_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert template.end_of_turn_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)


@pytest.mark.parametrize("ended", [True, False], ids=["reply-ended", "reply-cut-short"])
def test_a_session_turn_appends_the_rest_of_the_whole_conversation(
    tokenizer: Any, ended: bool
) -> None:
    # Prefix-stable: the context after two turns is exactly the whole conversation
    # rendered, whether the first reply ended with <|im_end|> or ran out of tokens.
    template = ChatTemplate(tokenizer)
    first = "a cat sat on the mat" + ("<|im_end|>" if ended else "")
    context, history = answer(template, tokenizer, None, [user("the cat")], first)
    more, history = answer(template, tokenizer, history, [user("and the dog")], "sat on the log")
    context += more
    whole = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "a cat sat on the mat"},
            {"role": "user", "content": "and the dog"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tokenizer.decode(context) == whole + "sat on the log"
    assert [m.role for m in history.messages] == ["user", "assistant", "user", "assistant"]
    assert history.messages[1].content == "a cat sat on the mat"


def test_a_template_that_rewrites_replies_continues_after_the_reply_as_generated(
    tokenizer: Any,
) -> None:
    # The trimming template renders the reply " the mat " as "the mat": the committed
    # reply is kept as generated and closed as the template closes a reply, once.
    template = ChatTemplate(tokenizer, TRIMMING)
    context, history = answer(template, tokenizer, None, [user("the cat")], " the mat <|im_end|>")
    more, _ = answer(template, tokenizer, history, [user("the dog")], "the log")
    context += more
    assert tokenizer.decode(context) == (
        "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n the mat <|im_end|>"
        "\n<|im_start|>user\nthe dog<|im_end|>\n<|im_start|>assistant\nthe log"
    )
    # Cut short (no <|im_end|>): the template's closing is added.
    context, history = answer(template, tokenizer, None, [user("the cat")], " the mat ")
    more, _ = answer(template, tokenizer, history, [user("the dog")], "")
    context += more
    assert tokenizer.decode(context).endswith(
        "\n the mat <|im_end|>\n<|im_start|>user\nthe dog<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_conversation_sent_whole_again_adds_only_its_new_messages() -> None:
    history = ChatHistory((user("hi"), ChatMessage("assistant", "hello")), "...")
    again = [user("hi"), ChatMessage("assistant", "hello"), user("more")]
    assert history.new_messages(again) == [user("more")]
    # Not the session's conversation (an edited reply), or nothing new: all of it is new.
    edited = [user("hi"), ChatMessage("assistant", "HELLO"), user("more")]
    assert history.new_messages(edited) == edited
    assert history.new_messages(again[:2]) == again[:2]
    assert ChatHistory().new_messages(again) == again


def test_templates_come_from_the_tokenizer_or_a_file(tokenizer: Any, tmp_path: Path) -> None:
    plain = build_tokenizer()  # no chat template
    assert ChatTemplate.load(plain) is None
    path = tmp_path / "chatml.jinja"
    path.write_text(TRIMMING)
    loaded = ChatTemplate.load(plain, str(path))
    assert loaded is not None
    assert (
        loaded.render([user(" x ")], generation_prompt=False) == "<|im_start|>user\nx<|im_end|>\n"
    )
    assert loaded.end_of_turn_ids == ()  # the plain tokenizer has no <|im_end|> token
    with pytest.raises(InvalidArgument, match="cannot read --chat-template"):
        ChatTemplate.load(plain, str(tmp_path / "missing.jinja"))
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(InvalidArgument, match="is empty"):
        ChatTemplate.load(plain, str(tmp_path / "empty.jinja"))


def test_messages_the_template_refuses_are_invalid_arguments(tokenizer: Any) -> None:
    strict = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    template = ChatTemplate(tokenizer, strict)
    with pytest.raises(InvalidArgument, match="roles must be user or assistant"):
        template.turn(None, [ChatMessage("tool", "x")])
