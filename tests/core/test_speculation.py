"""The speculation settings (``Speculation``): ranges, defaults, and "unset = the server's".

Every place that takes these settings (the gateway's request, the draft's flags,
``specdec generate``'s flags, the client) reads its defaults and ranges from here;
these tests hold the places to that.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from draft_service.config import DraftConfig
from gateway.config import GatewayConfig
from specdec.cli import build_parser, speculation_request
from specdec.client import build_request
from specdec.config import load_config
from specdec.core.errors import InvalidArgument
from specdec.core.types import (
    MAX_BRANCHES,
    MAX_PIPELINE_DEPTH,
    MAX_SPECULATIVE_TOKENS,
    SPECULATION_DEFAULTS,
    SPECULATION_RANGES,
    DrafterKind,
    Speculation,
)


def test_the_ranges_are_the_core_limits() -> None:
    assert SPECULATION_RANGES == {
        "k": (0, MAX_SPECULATIVE_TOKENS),
        "pipeline_depth": (1, MAX_PIPELINE_DEPTH),
        "branches": (0, MAX_BRANCHES),
    }


@pytest.mark.parametrize("name", sorted(SPECULATION_RANGES))
def test_each_range_holds_its_bounds_and_refuses_one_past_them(name: str) -> None:
    low, high = SPECULATION_RANGES[name]

    def speculation(value: int) -> Speculation:
        setting: dict[str, Any] = {name: value}
        return Speculation(**setting)

    for value in (low, high):
        speculation(value).validate()
    for value in (low - 1, high + 1):
        with pytest.raises(InvalidArgument, match=rf"^{name} must be in \[{low}, {high}\], got"):
            speculation(value).validate()


def test_a_bool_is_not_a_number_of_tokens() -> None:
    with pytest.raises(InvalidArgument, match="got True"):
        Speculation(k=True).validate()


def test_the_message_names_the_setting_as_the_caller_knows_it() -> None:
    with pytest.raises(InvalidArgument, match=r"^--pipeline-depth must be in \[1, 4\], got 0$"):
        Speculation(pipeline_depth=0).validate(lambda name: "--" + name.replace("_", "-"))


def test_an_unknown_drafter_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="drafter must be one of"):
        Speculation(drafter="bigram").validate()  # type: ignore[arg-type]


def test_unset_settings_are_valid_and_taken_from_the_defaults() -> None:
    request = Speculation(k=7, adaptive=True, branches=0)
    request.validate()
    resolved = request.over(SPECULATION_DEFAULTS)
    assert resolved == dataclasses.replace(SPECULATION_DEFAULTS, k=7, adaptive=True, branches=0)
    # Set values win, even the falsy ones (branches=0 is "none", not "unset").
    assert resolved.branches == 0
    assert Speculation().over(SPECULATION_DEFAULTS) == SPECULATION_DEFAULTS


def test_the_shipped_defaults_are_complete_and_valid() -> None:
    assert all(
        getattr(SPECULATION_DEFAULTS, f.name) is not None for f in dataclasses.fields(Speculation)
    )
    SPECULATION_DEFAULTS.validate()
    # Today's values (to be changed here, and only here).
    assert Speculation(
        k=8, adaptive=True, drafter=DrafterKind.AUTO, draft_ahead=True, pipeline_depth=2,
        branches=3, rescue=True,
    ) == SPECULATION_DEFAULTS  # fmt: skip


def test_a_request_without_k_gets_the_controller_and_one_with_k_exactly_k() -> None:
    assert Speculation().over(SPECULATION_DEFAULTS).adaptive is True
    fixed = Speculation(k=3).over(SPECULATION_DEFAULTS)
    assert (fixed.k, fixed.adaptive) == (3, False)
    capped = Speculation(k=3, adaptive=True).over(SPECULATION_DEFAULTS)
    assert (capped.k, capped.adaptive) == (3, True)
    default_k = Speculation(adaptive=False).over(SPECULATION_DEFAULTS)
    assert (default_k.k, default_k.adaptive) == (SPECULATION_DEFAULTS.k, False)


def test_service_flags_default_to_the_shipped_defaults() -> None:
    gateway = load_config(GatewayConfig, [], env={})
    assert gateway.default_k == SPECULATION_DEFAULTS.k
    assert gateway.default_adaptive is SPECULATION_DEFAULTS.adaptive
    draft = load_config(DraftConfig, [], env={})
    assert draft.speculation() == Speculation(
        draft_ahead=SPECULATION_DEFAULTS.draft_ahead,
        pipeline_depth=SPECULATION_DEFAULTS.pipeline_depth,
        branches=SPECULATION_DEFAULTS.branches,
        rescue=SPECULATION_DEFAULTS.rescue,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pipeline-depth", "0"], r"--pipeline-depth must be in \[1, 4\], got 0"),
        (["--branches", "9"], r"--branches must be in \[0, 8\], got 9"),
    ],
)
def test_draft_flags_out_of_range_are_refused_by_name(argv: list[str], message: str) -> None:
    config = load_config(DraftConfig, argv, env={})
    with pytest.raises(InvalidArgument, match=message):
        config.validate()


def _generate_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["generate", "hello", *argv])


def test_generate_flags_left_out_are_the_servers_defaults() -> None:
    request = speculation_request(_generate_args())
    assert request == {
        "k": None,
        "adaptive": None,
        "drafter": DrafterKind.AUTO,
        "pipeline_depth": None,
        "branches": None,
        "rescue": None,
    }
    pb = build_request("hello", **request).speculation
    assert not pb.HasField("num_speculative_tokens") and not pb.HasField("pipeline_depth")
    assert not pb.HasField("adaptive")
    assert not pb.HasField("branches") and not pb.HasField("rescue")


def test_generate_flags_are_checked_before_anything_is_sent() -> None:
    args = _generate_args("-k", "3", "--drafter", "ngram", "--no-rescue")
    assert speculation_request(args) == {
        "k": 3,
        "adaptive": None,
        "drafter": DrafterKind.NGRAM,
        "pipeline_depth": None,
        "branches": None,
        "rescue": False,
    }
    with pytest.raises(InvalidArgument, match=r"--num-speculative-tokens must be in \[0, 32\]"):
        speculation_request(_generate_args("-k", "33"))
    with pytest.raises(InvalidArgument, match=r"--branches must be in \[0, 8\], got -1"):
        speculation_request(_generate_args("--branches", "-1"))


def test_up_takes_the_same_speculation_flags_for_its_generation() -> None:
    args = build_parser().parse_args(["up", "--generate", "hi", "--pipeline-depth", "1"])
    assert speculation_request(args)["pipeline_depth"] == 1


def test_the_client_refuses_an_unknown_drafter_by_name() -> None:
    with pytest.raises(ValueError, match="drafter must be one of"):
        build_request("hello", drafter="bigram")
