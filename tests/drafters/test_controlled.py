"""The benchmark drafter: the oracle's greedy output at a chosen per-token acceptance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draft_service.config import DraftConfig
from specdec.config import load_config
from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.drafters.controlled import ControlledDrafter, Reference, References

GREEDY = SamplingParams()
VOCAB = 50
PROMPTS = [(1, 5, 6), (1, 5, 6, 7, 8), (2, 9)]
OUTPUTS = [tuple(range(10, 40)), tuple(range(20, 50)), tuple(range(11, 41))]


def references() -> References:
    return References([Reference(p, o) for p, o in zip(PROMPTS, OUTPUTS, strict=True)])


def test_a_context_continues_the_longest_prompt_it_starts_with() -> None:
    refs = references()
    assert refs.continuation([1, 5, 6]) == OUTPUTS[0]
    assert refs.continuation([1, 5, 6, 10, 11]) == OUTPUTS[0][2:]
    # (1, 5, 6, 7, 8) is the longer prompt: its own output continues it.
    assert refs.continuation([1, 5, 6, 7, 8, 20]) == OUTPUTS[1][1:]
    assert refs.continuation([1, 5, 6, 10, 12]) is None  # off the oracle's path
    assert refs.continuation([3, 3]) is None


def acceptance_of(drafter: ControlledDrafter, rounds: int = 400, k: int = 6) -> tuple[float, int]:
    """Per-token acceptance over many blocks (accepted / (accepted + rejections)), and how
    many proposed tokens were the oracle's but came after a wrong one."""
    accepted = rejected = 0
    for start in range(rounds):
        drafter.seed = start
        context = [2, 9, *OUTPUTS[2][: start % 20]]
        truth = OUTPUTS[2][start % 20 :]
        block = drafter.propose(context, k, GREEDY).token_ids
        assert len(block) == k and all(0 <= t < VOCAB for t in block)
        n = next((i for i, (x, y) in enumerate(zip(block, truth, strict=False)) if x != y), k)
        n = min(n, len(truth))
        accepted += n
        rejected += n < min(k, len(truth))
    return accepted / (accepted + rejected), rejected


@pytest.mark.parametrize("acceptance", [0.0, 0.6, 0.9, 1.0])
def test_each_token_is_the_oracles_with_the_chosen_probability(acceptance: float) -> None:
    drafter = ControlledDrafter(references(), acceptance, VOCAB)
    measured, rejected = acceptance_of(drafter)
    assert abs(measured - acceptance) < 0.06
    assert (rejected == 0) == (acceptance == 1.0)


def test_draws_are_seeded_by_position_and_unknown_contexts_get_wrong_tokens() -> None:
    one, two = (ControlledDrafter(references(), 0.5, VOCAB, seed=7) for _ in range(2))
    context = [1, 5, 6, *OUTPUTS[0][:3]]
    assert one.propose(context, 8, GREEDY) == two.propose(context, 8, GREEDY)
    assert one.propose(context, 0, GREEDY).token_ids == ()
    lost = [1, 5, 6, 99 % VOCAB]
    block = one.propose(lost, 5, GREEDY).token_ids
    assert len(block) == 5 and one.unknown_contexts == 1
    past_the_end = [2, 9, *OUTPUTS[2]]
    assert ControlledDrafter(references(), 1.0, VOCAB).propose(past_the_end, 3, GREEDY)
    with pytest.raises(InvalidArgument, match="acceptance must be in"):
        ControlledDrafter(references(), 1.5, VOCAB)


def test_references_round_trip_through_json_and_bad_files_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "refs.json"
    References.dump(path, [Reference(p, o) for p, o in zip(PROMPTS, OUTPUTS, strict=True)])
    assert References.load(path).continuation([2, 9, 11]) == OUTPUTS[2][1:]
    path.write_text(json.dumps({"refs": []}))
    with pytest.raises(InvalidArgument, match="cannot read bench references"):
        References.load(path)
    with pytest.raises(InvalidArgument, match="cannot read bench references"):
        References.load(tmp_path / "missing.json")


def test_the_draft_service_flags_are_checked() -> None:
    assert load_config(DraftConfig, [], env={}).bench_acceptance == -1.0  # off
    argv = ["--bench-acceptance", "0.8", "--bench-reference", "r.json", "--bench-step-ms", "2"]
    config = load_config(DraftConfig, argv, env={})
    config.validate()
    assert (config.bench_acceptance, config.bench_step_ms) == (0.8, 2.0)
    for bad, message in [
        (["--bench-acceptance", "0.8"], "needs --bench-reference"),
        (["--bench-acceptance", "2", "--bench-reference", "r"], "must be in"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            load_config(DraftConfig, bad, env={}).validate()
