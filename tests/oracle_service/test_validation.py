"""What the oracle refuses before any work: engine settings, and requests before the queue.

``oracle_service.validation`` (requests) and ``oracle_service.config.check_settings``
(settings, whether they come from flags or from the engine's constructor). Over
gRPC the same errors become INVALID_ARGUMENT (``test_oracle_service.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from oracle_service.config import OracleConfig
from oracle_service.engine import OracleEngine
from oracle_service.validation import MAX_ASSUMED_TOKENS, check_block, check_open
from specdec.config import load_config
from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock
from specdec.engine.models import LoadedModel

VOCAB = 100
GREEDY = SamplingParams()


def open_args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "session_id": "s",
        "tokens": [1, 2, 3],
        "sampling": GREEDY,
        "seed": 7,
        "vocab_size": VOCAB,
        "max_context": 8,
        "model_name": "tiny",
    }
    return {**args, **overrides}


def test_a_well_formed_open_gives_its_tokens_as_ints() -> None:
    checked = check_open(**open_args(tokens=(1, 2, 99), seed=(1 << 64) - 1))
    assert checked == [1, 2, 99]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"session_id": ""}, "session_id must not be empty"),
        ({"tokens": [1, 100]}, "OpenVerify.token_ids"),
        ({"tokens": [1, -1]}, "OpenVerify.token_ids"),
        ({"tokens": list(range(8))}, "no room in the oracle's context of 8 tokens"),
        ({"sampling": SamplingParams(temperature=-1.0)}, "temperature"),
        ({"seed": -1}, r"seed must be in \[0, 2\^64\)"),
        ({"seed": 1 << 64}, r"seed must be in \[0, 2\^64\)"),
    ],
)
def test_a_malformed_open_is_invalid(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_open(**open_args(**overrides))


def test_a_blocks_assumed_tokens_come_back_as_a_tuple() -> None:
    assert check_block(DraftBlock((4, 5)), 6, [7, 8], VOCAB) == (7, 8)
    assert check_block(DraftBlock(()), 0, (), VOCAB) == ()


@pytest.mark.parametrize(
    ("block", "base_length", "assumed", "message"),
    [
        (DraftBlock((4, 100)), 6, (), r"token_ids\[1\] = 100 is not a token id"),
        (DraftBlock(()), 3, (1, 2, 3, 4), "extending length 3 cannot assume 4 tokens"),
        (DraftBlock(()), 500, (1,) * (MAX_ASSUMED_TOKENS + 1), "at most"),
        (DraftBlock(()), 6, (1, 100), "VerifyBlock.assumed_token_ids"),
    ],
)
def test_a_malformed_block_is_invalid(
    block: DraftBlock, base_length: int, assumed: tuple[int, ...], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_block(block, base_length, assumed, VOCAB)


SETTINGS = [
    (["--max-sessions", "0"], {"max_sessions": 0}, "--max-sessions must be >= 1"),
    (
        ["--max-cached-sessions", "-1"],
        {"max_cached_sessions": -1},
        "--max-cached-sessions must be >= 0",
    ),
    (["--kv-budget-mb", "-1"], {"kv_budget_bytes": -(1 << 20)}, "--kv-budget-mb must be >= 0"),
    (["--max-batch", "0"], {"max_batch": 0}, "--max-batch must be >= 1, got 0"),
    (["--batch-wait-ms", "1001"], {"batch_wait_s": 1.001}, r"--batch-wait-ms must be in \[0, 1000"),
    (["--verify-lanes", "9"], {"lanes": 9}, r"--verify-lanes must be in \[0, 8\]"),
]


@pytest.mark.parametrize(("argv", "engine_args", "message"), SETTINGS)
def test_settings_are_refused_alike_from_flags_and_by_the_engine(
    loaded: Callable[[str, str], LoadedModel],
    argv: list[str],
    engine_args: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_config(OracleConfig, argv, {}).validate()
    args: dict[str, Any] = {
        "oracle_id": "x",
        "kv_budget_bytes": 1 << 20,
        "max_sessions": 1,
        "max_cached_sessions": 1,
        **engine_args,
    }
    with pytest.raises(InvalidArgument, match=message):
        OracleEngine(loaded("llama", "oracle"), **args)


def test_the_default_settings_are_valid() -> None:
    load_config(OracleConfig, [], {}).validate()
    load_config(OracleConfig, ["--batch-wait-ms", "1000", "--verify-lanes", "8"], {}).validate()
