"""Recovery blocks: the oracle drafts a session's next block itself after a miss.

Over real gRPC against the oracle servicer (tiny random llama oracle, an unrelated
tiny draft as the recovery draft), and the draft's side of it: drafting ahead after
a block that comes without the draft's own runner-ups.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

import oracle_service.recovery as recovery_module
from oracle_service.recovery import RecoveryDrafter
from specdec.drafters.branches import draft_branches
from specdec.drafters.model_drafter import ModelDrafter
from specdec.models import LoadedModel
from specdec.sampling import SamplingParams
from specdec.v1 import oracle_pb2
from specdec.verifier import DraftBlock
from tests.test_oracle_service import (  # noqa: F401 (fixtures)
    PROMPT,
    Running,
    make_oracle,
    oracle_model,
    reference,
)


@pytest.fixture(scope="module")
def draft_model(loaded: Callable[[str, str], LoadedModel]) -> LoadedModel:
    return loaded("llama", "draft")


async def recovering_oracle(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    draft_model: LoadedModel,
) -> Running:
    return await make_oracle(recovery=RecoveryDrafter(draft_model))


async def test_a_miss_gets_a_recovery_block_verified_next_and_every_token_is_exact(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    draft_model: LoadedModel,
    reference: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recovery_module, "HOLD_MARGIN_NS", 0)
    oracle = await recovering_oracle(make_oracle, draft_model)
    stream = oracle.stream()
    await stream.open("r1", PROMPT, allow_recovery=True)
    base = len(PROMPT)
    wrong = (reference[1] + 1) % 96
    # Rejected at position 1, and no block for that outcome follows: a miss.
    first = await stream.block(0, base, [reference[0], wrong])
    assert (first.num_accepted, first.next_token_id) == (1, reference[1])
    assert len(first.recovery_token_ids) == 2  # as long as the block it follows
    committed = [*PROMPT, *reference[:2]]
    announced = list(first.recovery_token_ids)
    # Each recovery block's verdict comes next; with nothing else sent, the oracle keeps
    # recovering. Every committed token is the oracle's own greedy choice.
    for _ in range(3):
        verdict = await stream.read_verdict()
        assert verdict.recovered and not verdict.skipped and verdict.round == 0
        new = [*announced[: verdict.num_accepted], verdict.next_token_id]
        committed += new
        assert verdict.committed_length == len(committed)
        assert verdict.is_bonus == (verdict.num_accepted == len(announced))
        announced = list(verdict.recovery_token_ids)
        assert len(announced) == 2
    assert committed[base:] == reference[: len(committed) - base]
    # Once the draft closes its side, no further block is drafted for it.
    await stream.call.done_writing()
    while (verdict := await stream.read_verdict()).recovery_token_ids:
        pass
    assert await stream.call.read() is grpc.aio.EOF
    assert await stream.call.code() == grpc.StatusCode.OK
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.recovery_draft == draft_model.name and info.recovery_blocks >= 4


async def test_no_recovery_unless_the_stream_allows_it_or_the_turn_samples(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    draft_model: LoadedModel,
    reference: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recovery_module, "HOLD_MARGIN_NS", 0)
    oracle = await recovering_oracle(make_oracle, draft_model)
    base = len(PROMPT)
    wrong = (reference[0] + 1) % 96
    for session, options in (("n1", {}), ("n2", {"allow_recovery": True, "temperature": 1.0})):
        stream = oracle.stream()
        await stream.open(session, PROMPT, **options)  # type: ignore[arg-type]
        verdict = await stream.block(0, base, [wrong])
        assert not verdict.recovery_token_ids
        await stream.finish()
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.recovery_blocks == 0


async def test_a_verdict_is_held_for_the_drafts_late_block_instead_of_recovering(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    draft_model: LoadedModel,
    reference: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The draft's block for the verdict's outcome comes 0.3 s after the block it follows
    # (well after its verdict), within the hold: it is verified, and nothing recovered.
    monkeypatch.setattr(recovery_module, "HOLD_MARGIN_NS", 5_000_000_000)
    monkeypatch.setattr(recovery_module, "MAX_HOLD_NS", 5_000_000_000)
    oracle = await recovering_oracle(make_oracle, draft_model)
    stream = oracle.stream()
    await stream.open("h1", PROMPT, allow_recovery=True)
    base = len(PROMPT)
    await stream.write_block(0, base, reference[:2])
    await asyncio.sleep(0.3)  # verdict 0 is computed meanwhile, and held
    start = time.perf_counter()
    await stream.write_block(1, base + 3, reference[3:5], assumed=reference[:3])
    v0 = await stream.read_verdict()
    assert time.perf_counter() - start < 4  # released by the block, not the deadline
    assert (v0.num_accepted, v0.is_bonus, v0.next_token_id) == (2, True, reference[2])
    assert not v0.recovery_token_ids
    # Verdict 1 is held in turn (nothing follows it); closing our side releases it.
    await stream.call.done_writing()
    v1 = await stream.read_verdict()
    assert time.perf_counter() - start < 4
    assert not v1.recovered and (v1.num_accepted, v1.next_token_id) == (2, reference[5])
    assert not v1.recovery_token_ids
    assert await stream.call.read() is grpc.aio.EOF
    info = await oracle.stub.GetInfo(oracle_pb2.GetInfoRequest())
    assert info.recovery_blocks == 0


async def test_the_drafts_last_block_for_a_verdict_ends_the_hold_at_once(
    make_oracle: Callable[..., Awaitable[Running]],  # noqa: F811
    draft_model: LoadedModel,
    reference: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The draft's blocks for verdict 0 (here one, for its full acceptance) are all here
    # and none fits the real outcome (a rejection): a miss, recovered without waiting.
    monkeypatch.setattr(recovery_module, "HOLD_MARGIN_NS", 5_000_000_000)
    monkeypatch.setattr(recovery_module, "MAX_HOLD_NS", 5_000_000_000)
    oracle = await recovering_oracle(make_oracle, draft_model)
    stream = oracle.stream()
    await stream.open("h2", PROMPT, allow_recovery=True)
    base = len(PROMPT)
    wrong = (reference[1] + 1) % 96
    await stream.write_block(0, base, [reference[0], wrong])
    await asyncio.sleep(0.3)  # verdict 0 is computed meanwhile, and held
    start = time.perf_counter()
    full = [reference[0], wrong, reference[2]]  # the outcome the draft hoped for
    await stream.write_block(1, base + 3, reference[3:5], assumed=full, last_alternative=True)
    v0 = await stream.read_verdict()
    assert time.perf_counter() - start < 4
    assert (v0.num_accepted, v0.next_token_id) == (1, reference[1])
    assert len(v0.recovery_token_ids) == 2
    await stream.call.done_writing()  # no more recoveries after the next verdict
    recovered, skipped = await stream.read_verdict(), await stream.read_verdict()
    assert recovered.recovered and not recovered.recovery_token_ids
    assert skipped.skipped and skipped.round == 1
    assert await stream.call.read() is grpc.aio.EOF


def test_drafting_ahead_after_a_block_without_runner_ups_reads_them_itself(
    draft_model: LoadedModel,
) -> None:
    # A recovery block arrives as bare tokens; the draft's corrections for it must be
    # the ones it would have drafted for the same block of its own.
    context = list(PROMPT)
    greedy = SamplingParams()
    own = ModelDrafter(draft_model).propose(context, 3, greedy)
    assert own.runner_ups
    bare = DraftBlock(own.token_ids)
    expected = draft_branches(ModelDrafter(draft_model).cache, context, own, 3, 3)
    got = draft_branches(ModelDrafter(draft_model).cache, context, bare, 3, 3)
    assert len(expected) == 4
    assert [b.assumed for b in got] == [b.assumed for b in expected]
    assert [b.block.token_ids for b in got] == [b.block.token_ids for b in expected]
