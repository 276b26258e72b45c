"""``run_assignment``: the one wiring of a turn that a draft service and the gateway share.

Run here with the oracle in process and a real model drafter: the reports it sends
are the turn's open and then commits that each start where the previous one ended,
EOS ends the turn only when it is among the stop ids, the runner's defaults fill what
the assignment leaves unset, and adaptive k learns under (drafter, oracle, depth).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from specdec.core.adaptive import AdaptiveMemory
from specdec.core.messages import (
    Assignment,
    AssignmentCommitted,
    AssignmentOpened,
    AssignmentReport,
)
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason
from specdec.core.types import SPECULATION_DEFAULTS, DrafterKind, Speculation, TurnStats
from specdec.core.wiring import adaptive_key, run_assignment
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.proposers import InlineProposer
from specdec.engine.oracle import Oracle
from specdec.generate import LocalOracleLink, speculative_generate
from tests.conftest import EOS_ID

PROMPT = (1, 5, 9, 12, 7)


def _job(params: SamplingParams, **speculation: Any) -> Assignment:
    return Assignment(
        assignment_id="a1",
        session_id="s1",
        oracle_id="o1",
        oracle_address="",
        token_ids=PROMPT,
        prompt_tokens=len(PROMPT),
        params=params,
        seed=3,
        speculation=Speculation(drafter=DrafterKind.MODEL, **speculation),
    )


def _run(
    loaded: Callable[[str, str], Any],
    job: Assignment,
    memory: AdaptiveMemory | None = None,
    defaults: Speculation = SPECULATION_DEFAULTS,
    eos: tuple[int, ...] = (EOS_ID,),
) -> tuple[FinishReason, TurnStats, list[AssignmentReport]]:
    oracle = Oracle(loaded("llama", "oracle"))
    proposer = InlineProposer(ModelDrafter(loaded("llama", "close_draft")))
    reports: list[AssignmentReport] = []

    async def report(message: AssignmentReport) -> None:
        reports.append(message)

    reason, stats = asyncio.run(
        run_assignment(
            LocalOracleLink(oracle),
            proposer,
            job,
            report,
            defaults=defaults,
            eos_token_ids=eos,
            decode=None,
            max_context=oracle.max_context,
            memory=memory or AdaptiveMemory(),
        )
    )
    return reason, stats, reports


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_reports_chain_and_eos_ends_the_turn_only_among_the_stop_ids(
    loaded: Callable[[str, str], Any], ignore_eos: bool
) -> None:
    oracle = Oracle(loaded("llama", "oracle"))
    free = speculative_generate(list(PROMPT), oracle, None, SamplingParams(max_new_tokens=40), 0)
    eos = free.tokens[len(free.tokens) // 2]  # a token the oracle generates, as its EOS
    # As sampling_from_pb gives them: EOS among the stop ids unless ignore_eos.
    params = SamplingParams(max_new_tokens=40, stop_token_ids=() if ignore_eos else (eos,))
    reason, stats, reports = _run(loaded, _job(params, k=4), eos=(eos,))
    assert isinstance(reports[0], AssignmentOpened)
    assert reports[0].assignment_id == "a1"
    commits = [r for r in reports[1:] if isinstance(r, AssignmentCommitted)]
    assert len(commits) == len(reports) - 1 == stats.rounds
    base = len(PROMPT)
    for commit in commits:
        assert commit.base_length == base
        base += len(commit.token_ids)
    tokens = [t for c in commits for t in c.token_ids]
    if ignore_eos:
        assert (tokens, reason) == (free.tokens, FinishReason.LENGTH)
    else:
        assert (tokens, reason) == (free.tokens[: free.tokens.index(eos) + 1], FinishReason.EOS)


def test_the_runners_defaults_fill_what_the_assignment_leaves_unset(
    loaded: Callable[[str, str], Any],
) -> None:
    params = SamplingParams(max_new_tokens=24)
    drafts_ahead = Speculation(draft_ahead=True, pipeline_depth=2, branches=0, rescue=False)
    _, stats, _ = _run(loaded, _job(params, k=3), defaults=drafts_ahead)
    assert stats.ahead_hits > 0  # drafting ahead came from the defaults
    _, stats, _ = _run(loaded, _job(params, k=3, pipeline_depth=1), defaults=drafts_ahead)
    assert stats.pipelined_rounds == 0  # the assignment's depth won over the default
    no_ahead = dataclasses.replace(drafts_ahead, draft_ahead=False)
    _, stats, _ = _run(loaded, _job(params, k=3), defaults=no_ahead)
    assert stats.ahead_hits == 0


def test_adaptive_k_learns_per_drafter_oracle_and_depth(loaded: Callable[[str, str], Any]) -> None:
    memory = AdaptiveMemory()
    job = _job(SamplingParams(max_new_tokens=16), k=5, adaptive=True, pipeline_depth=1)
    _run(loaded, job, memory)
    resolved = job.speculation.over(SPECULATION_DEFAULTS)
    assert adaptive_key(resolved, "o1") == "model:o1:1"
    learnt = memory.policy("model:o1:1", 5)
    assert learnt.rounds > 0  # a fork of what the turn learnt
    assert memory.policy("model:o1:2", 5).rounds == 0  # another depth learns apart
    fixed = AdaptiveMemory()
    speculation = dataclasses.replace(job.speculation, adaptive=False)
    _run(loaded, dataclasses.replace(job, speculation=speculation), fixed)
    assert fixed.policy("model:o1:1", 5).rounds == 0  # fixed k learns nothing
