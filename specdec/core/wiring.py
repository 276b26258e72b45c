"""One turn wired to its reports: what a draft service and the gateway (the oracle alone,
n-gram) both do around ``run_turn`` for an ``Assignment``.

The wiring is the same wherever the turn runs: the turn's stop checker (EOS counts
only when it is among the stop ids), every commit and the open reported as
``AssignmentCommitted`` / ``AssignmentOpened`` (each commit after the length the
previous one reached, with the whole verdict and the oracle's proof of it), and
adaptive k learnt per (drafter, oracle, pipeline depth): the costs a policy learns
differ per oracle and with pipelining. The runner only says where the reports go and
what its own defaults are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from specdec.core.adaptive import AdaptiveMemory
from specdec.core.loop import run_turn
from specdec.core.messages import (
    Assignment,
    AssignmentCommitted,
    AssignmentOpened,
    AssignmentReport,
)
from specdec.core.protocols import OracleLink, Proposer, RoundObserver
from specdec.core.stopping import FinishReason, turn_stop_checker
from specdec.core.types import OpenResult, RoundReport, Speculation, Turn, TurnStats

Report = Callable[[AssignmentReport], Awaitable[None]]


def adaptive_key(speculation: Speculation, oracle_id: str) -> str:
    """Under which key turns share what adaptive k learnt: one drafter, oracle and depth."""
    return f"{speculation.drafter.value}:{oracle_id}:{speculation.pipeline_depth}"


async def run_assignment(
    link: OracleLink,
    proposer: Proposer | None,
    job: Assignment,
    report: Report,
    *,
    defaults: Speculation,
    eos_token_ids: Sequence[int],
    decode: Callable[[list[int]], str] | None,
    max_context: int,
    memory: AdaptiveMemory,
    observer: RoundObserver | None = None,
) -> tuple[FinishReason, TurnStats]:
    """Run ``job``'s turn over ``link``, sending its open and commits to ``report``.

    defaults: the runner's settings for what the job leaves unset (None).
    max_context: the context window when the job gives none.
    memory: what earlier turns of adaptive k learnt; this turn learns into it too.
    """
    speculation = job.speculation.over(defaults)
    turn = Turn(
        context=list(job.token_ids),
        prompt_tokens=job.prompt_tokens,
        params=job.params,
        seed=job.seed,
        k=(speculation.k or 0) if proposer is not None else 0,
        stop=turn_stop_checker(job.params, eos_token_ids, decode),
        max_context=job.max_context or max_context,
        draft_ahead=bool(speculation.draft_ahead),
        pipeline_depth=speculation.pipeline_depth or 1,
        branches=speculation.branches or 0,
    )
    base = len(job.token_ids)

    async def on_commit(tokens: list[int], round_report: RoundReport) -> None:
        nonlocal base
        # The whole verdict, as the oracle's proof covers it: the gateway cuts at its stop.
        verdict = (*tokens, *round_report.cut)
        await report(
            AssignmentCommitted(job.assignment_id, base, verdict, round_report, round_report.proof)
        )
        base += len(tokens)

    async def on_open(opened: OpenResult) -> None:
        await report(AssignmentOpened(job.assignment_id, opened))

    key = adaptive_key(speculation, job.oracle_id)
    policy = memory.policy(key, turn.k) if speculation.adaptive and turn.k else None
    try:
        return await run_turn(
            link, proposer, turn, on_commit, policy=policy, on_open=on_open, observer=observer
        )
    finally:
        if policy is not None:
            memory.remember(key, policy)
