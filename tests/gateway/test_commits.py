"""The commit gate (``gateway.commits``): a commit is applied only where the session is,
with the oracle's proof; a worker ends a turn only at the context limit."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.commits import CommitGate, CommitRefused
from specdec.core.messages import (
    Assignment,
    AssignmentCommitted,
    AssignmentFinished,
    CommitKey,
    CommitTicket,
)
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason
from specdec.core.types import RoundReport, Speculation, TokenLogprob
from specdec.rpc.commit_proof import CommitChain

KEY = CommitKey("k1", b"s" * 32)
JOB = Assignment(
    assignment_id="a1", session_id="s1", oracle_id="o1", oracle_address="", token_ids=(1, 5, 9),
    prompt_tokens=3, params=SamplingParams(temperature=0.5, seed=1), seed=7,
    speculation=Speculation(), max_context=6, commit=CommitTicket("k1", b"n" * 16),
)  # fmt: skip
REPORT = RoundReport(0, 0, 0, 0, False, 1, 4, 0, 0, 0, 0)


def _oracle() -> CommitChain:
    """The oracle's side of the chain, as it opens with the job's terms."""
    assert JOB.commit is not None
    p = JOB.params
    return CommitChain(
        KEY.secret, JOB.commit, JOB.session_id, JOB.token_ids,
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=JOB.seed,
    )  # fmt: skip


def _commit(base: int, tokens: tuple[int, ...], proof: bytes) -> AssignmentCommitted:
    return AssignmentCommitted("a1", base, tokens, REPORT, proof)


def test_commits_with_the_oracles_proofs_pass_in_order() -> None:
    oracle, gate = _oracle(), CommitGate(JOB, KEY)
    gate.commit(_commit(3, (20, 21), oracle.seal(3, (20, 21))), committed_length=3)
    gate.commit(_commit(5, (22,), oracle.seal(5, (22,))), committed_length=5)


def test_a_turn_that_asks_for_logprobs_gets_the_oracles_one_per_token() -> None:
    job = dataclasses.replace(JOB, params=dataclasses.replace(JOB.params, logprobs=1))
    logprobs = (TokenLogprob(-0.5, (20,), (-0.5,)), TokenLogprob(-1.5, (4,), (-1.0,)))
    oracle, gate = _oracle(), CommitGate(job, KEY)
    proof = oracle.seal(3, (20, 21), logprobs)

    def commit(lps: tuple[TokenLogprob, ...]) -> AssignmentCommitted:
        report = dataclasses.replace(REPORT, logprobs=lps)
        return AssignmentCommitted("a1", 3, (20, 21), report, proof)

    with pytest.raises(CommitRefused, match="2 tokens with 1 logprobs, where the turn asked"):
        gate.commit(commit(logprobs[:1]), committed_length=3)
    forged = (logprobs[0], dataclasses.replace(logprobs[1], logprob=-0.25))
    with pytest.raises(CommitRefused, match="not the tokens and logprobs the oracle"):
        gate.commit(commit(forged), committed_length=3)
    gate.commit(commit(logprobs), committed_length=3)
    # A turn that did not ask takes none (a draft cannot slip any in).
    with pytest.raises(CommitRefused, match="with 2 logprobs, where the turn asked for none"):
        CommitGate(JOB, KEY).commit(commit(logprobs), committed_length=3)


def test_a_commit_off_the_sessions_length_is_refused() -> None:
    proof = _oracle().seal(3, (20,))
    with pytest.raises(CommitRefused, match="after 3 tokens, but the session holds 4"):
        CommitGate(JOB, KEY).commit(_commit(3, (20,), proof), committed_length=4)


def test_without_a_key_nothing_is_applied() -> None:
    proof = _oracle().seal(3, (20,))
    with pytest.raises(CommitRefused, match="no commit key"):
        CommitGate(JOB, None).commit(_commit(3, (20,), proof), committed_length=3)


@pytest.mark.parametrize(
    ("reason", "length", "allowed"),
    [
        (FinishReason.CONTEXT_LIMIT, 6, True),
        (FinishReason.CONTEXT_LIMIT, 5, False),
        (FinishReason.EOS, 6, False),
        (FinishReason.LENGTH, 4, False),
        (None, 4, False),
    ],
)
def test_a_worker_ends_a_turn_only_at_the_context_limit(
    reason: FinishReason | None, length: int, allowed: bool
) -> None:
    gate = CommitGate(JOB, KEY)
    finished = AssignmentFinished("a1", reason)
    if allowed:
        gate.finish(finished, length)
    else:
        with pytest.raises(CommitRefused, match="where the oracle's output goes on"):
            gate.finish(finished, length)
