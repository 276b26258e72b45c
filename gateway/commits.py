"""What the gateway applies of a turn's reports: only what the oracle proved.

The session's committed tokens are the truth, and whoever relays a turn's verdicts (a
draft, possibly on a stolen edge device) must not be able to change them. So a report
changes the session only when it is the oracle's word:

* a commit must extend exactly the session's committed length, and carry the oracle's
  proof of exactly these tokens there and of their logprobs, next in the attempt's
  chain (``specdec.rpc.commit_proof``: the chain also binds the session, the attempt,
  and the context and sampling the oracle verified under); a turn that asks for
  logprobs gets one per token of each commit;
* a turn ends where the gateway's own stop checker ends it; a worker may end it only
  at the context limit, which the gateway checks too.

Anything else is refused before any of it is applied: the turn fails over, and a
draft that sent it is dismissed (``gateway.generation``).
"""

from __future__ import annotations

from specdec.core.messages import (
    Assignment,
    AssignmentCommitted,
    AssignmentFinished,
    CommitKey,
)
from specdec.core.stopping import FinishReason
from specdec.rpc.commit_proof import CommitChain


class CommitRefused(Exception):
    """A report the gateway does not apply; the message says why."""


class CommitGate:
    """Checks the reports of one attempt of a turn (one job on one oracle)."""

    def __init__(self, job: Assignment, key: CommitKey | None) -> None:
        self._chain = None
        if job.commit is not None and key is not None:
            self._chain = CommitChain(
                key.secret,
                job.commit,
                job.session_id,
                job.token_ids,
                temperature=job.params.temperature,
                top_k=job.params.top_k,
                top_p=job.params.top_p,
                seed=job.seed,
            )
        self._max_context = job.max_context
        self._logprobs = job.params.logprobs is not None

    def commit(self, event: AssignmentCommitted, committed_length: int) -> None:
        """Return if ``event`` is the oracle's next commit of this attempt; else refuse."""
        if event.base_length != committed_length:
            raise CommitRefused(
                f"a commit after {event.base_length} tokens, but the session holds "
                f"{committed_length}"
            )
        if self._chain is None:
            raise CommitRefused("the oracle of this attempt has no commit key to prove it with")
        logprobs = event.report.logprobs
        if len(logprobs) != (len(event.token_ids) if self._logprobs else 0):
            raise CommitRefused(
                f"a commit of {len(event.token_ids)} tokens with {len(logprobs)} logprobs, "
                f"where the turn asked for {'one each' if self._logprobs else 'none'}"
            )
        if not self._chain.check(event.base_length, event.token_ids, event.proof, logprobs):
            raise CommitRefused(
                f"a commit of {len(event.token_ids)} tokens after {event.base_length} without "
                "the oracle's proof (forged, replayed, or not the tokens and logprobs the "
                "oracle committed)"
            )

    def finish(self, event: AssignmentFinished, committed_length: int) -> None:
        """Return if the worker may end the turn here (the gateway's stop checker has not):
        only at the context limit."""
        full = self._max_context > 0 and committed_length >= self._max_context
        if event.reason is FinishReason.CONTEXT_LIMIT and full:
            return
        reason = event.reason.value if event.reason is not None else "no reason"
        raise CommitRefused(
            f"the turn was reported finished ({reason}) after {committed_length} tokens, where "
            "the oracle's output goes on"
        )
