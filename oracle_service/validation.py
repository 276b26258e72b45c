"""Request validation: what the oracle checks of a request before it takes a place in the queue.

What needs no session state is checked on the event loop, before any work, and
refused with ``InvalidArgument``:

* an open: a session id, token ids in the vocabulary, room left in the context,
  sampling parameters, a 64-bit seed (``check_open``);
* a block: well formed (``specdec.core.verifier.validate_block``), and the tokens it
  assumes (pipelining): in the vocabulary, no more than it extends, a few blocks'
  worth at most (``check_block``).

What depends on the session (the committed length a block extends, whether it still
fits the context) is checked in the lane, where the session's state is serialised
with every other change to it (``oracle_service.execution``).
"""

from __future__ import annotations

from collections.abc import Sequence

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams, validate_token_ids
from specdec.core.types import MAX_SPECULATIVE_TOKENS, DraftBlock
from specdec.core.verifier import validate_block

MAX_SEED = (1 << 64) - 1
# A pipelined block assumes at most a few blocks' worth of tokens.
MAX_ASSUMED_TOKENS = 4 * (MAX_SPECULATIVE_TOKENS + 1)


def check_open(
    session_id: str,
    tokens: Sequence[int],
    sampling: SamplingParams,
    seed: int,
    *,
    vocab_size: int,
    max_context: int,
    model_name: str,
) -> list[int]:
    """The committed tokens of an OpenVerify, as ints; ``InvalidArgument`` if it is malformed."""
    if not session_id:
        raise InvalidArgument("OpenVerify.session_id must not be empty")
    checked = [int(t) for t in tokens]
    validate_token_ids(checked, vocab_size, "OpenVerify.token_ids")
    if len(checked) >= max_context:
        raise InvalidArgument(
            f"{len(checked)} committed tokens leave no room in the oracle's context of "
            f"{max_context} tokens ({model_name!r}); shorten the conversation"
        )
    sampling.validate()
    if not 0 <= seed <= MAX_SEED:
        raise InvalidArgument(f"seed must be in [0, 2^64), got {seed}")
    return checked


def check_block(
    block: DraftBlock, base_length: int, assumed: Sequence[int], vocab_size: int
) -> tuple[int, ...]:
    """The tokens a VerifyBlock assumes, as a tuple; ``InvalidArgument`` if it is malformed."""
    validate_block(block, vocab_size)
    checked = tuple(int(t) for t in assumed)
    if len(checked) > MAX_ASSUMED_TOKENS:
        raise InvalidArgument(
            f"a block may assume at most {MAX_ASSUMED_TOKENS} tokens, got {len(checked)}"
        )
    if len(checked) > base_length:
        raise InvalidArgument(
            f"a block extending length {base_length} cannot assume {len(checked)} tokens"
        )
    if checked:
        validate_token_ids(checked, vocab_size, "VerifyBlock.assumed_token_ids")
    return checked
