"""Resuming a turn that a gateway's death cut (GenerateRequest.resume_after_tokens).

A turn's prompt, parameters (its resolved seed included) and every token sent to
the client are in the session store before the client sees them. So any gateway
can go on with it: it rebuilds the stop checker and the text decoder from the
turn's durable tokens, sends the client the tokens it has not received, and runs
the remaining rounds from the committed tokens. Greedy output is the one an
uninterrupted turn gives; sampled output too, its draws depending only on the seed
and the position.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.detokenize import IncrementalDecoder
from gateway.sessions import Session
from specdec.core.errors import FailedPrecondition, InvalidArgument
from specdec.core.stopping import FinishReason, StopChecker

MAX_TURN_ID_CHARS = 128


@dataclass(frozen=True)
class Resumed:
    """Where a continued turn stands: ``tokens`` (and their ``text``) are the ones the
    client has not received; ``finish`` is set when the turn had already ended."""

    start: int  # the committed length before the turn's prompt
    produced: int  # tokens the turn generated before it was cut
    tokens: list[int]
    text: str
    finish: FinishReason | None


def check_turn_id(turn_id: str, resume_after: int | None) -> None:
    if len(turn_id) > MAX_TURN_ID_CHARS:
        raise InvalidArgument(f"turn_id is at most {MAX_TURN_ID_CHARS} characters")
    if resume_after is not None and not turn_id:
        raise InvalidArgument("resume_after_tokens needs the turn_id of the turn to resume")
    if resume_after is not None and resume_after < 0:
        raise InvalidArgument(f"resume_after_tokens must be >= 0, got {resume_after}")


def plan(session: Session, turn_id: str, resume_after: int | None) -> int | None:
    """What to do for a request naming ``turn_id``: None = start a new turn; a number =
    continue the session's latest turn after that many generated tokens."""
    latest = session.turn
    is_latest = latest is not None and latest.turn_id == turn_id
    if resume_after is None:
        if is_latest:
            raise FailedPrecondition(
                f"turn {turn_id!r} already ran on this session; resume it with "
                "resume_after_tokens, or start a new turn with a new turn_id"
            )
        return None
    if not is_latest:
        if resume_after == 0:
            return None  # the gateway died before the turn began: begin it now
        raise FailedPrecondition(
            f"cannot resume turn {turn_id!r}: it is not the session's latest turn "
            "(another turn ran since); GetSession has every committed token"
        )
    assert latest is not None
    generated = len(session.tokens) - latest.prompt_end
    if resume_after > generated:
        raise InvalidArgument(
            f"resume_after_tokens is {resume_after}, but turn {turn_id!r} committed "
            f"{generated} tokens"
        )
    return resume_after


def continue_turn(
    session: Session, resume_after: int, stop: StopChecker, decoder: IncrementalDecoder
) -> Resumed:
    """Bring ``stop`` and ``decoder`` to where the session's latest turn was cut."""
    turn = session.turn
    assert turn is not None, "plan() said there is a turn to continue"
    generated = session.tokens[turn.prompt_end :]
    _, finish = stop.feed(generated)
    decoder.feed(generated[:resume_after])  # text the client has (or holds back)
    unsent = generated[resume_after:]
    text = decoder.feed(unsent)
    finish = turn.finish or finish
    if finish is not None:
        text += decoder.flush()
    return Resumed(turn.start, len(generated), unsent, text, finish)
