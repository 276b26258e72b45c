"""Recovery blocks: after a miss, the oracle drafts the session's next block itself.

A draft hides the round trip by drafting ahead, during verification, for the
likely outcomes of the block in flight (its full acceptance, its likeliest
corrections) and sending those blocks before the verdict. When the verdict is
none of them (a miss: about 3 rounds in 10 at k = 4 with the demo pair), the
oracle has nothing of that session to verify until the verdict has reached the
draft, a fresh block has been drafted and it has come back: a round trip plus a
draft, idle. On a 20 ms link that is most of a verification.

An oracle started with a recovery draft (``--recovery-draft``, a copy of a small
draft model) fills that gap: it drafts the block itself, right after the verdict,
queues it for verification and tells the draft (``VerifyVerdict.recovery_token_ids``)
before verifying it. The draft then drafts ahead after that block as after one of
its own, so the next round finds its block ready again; the oracle sends the
recovery block's verdict next on the stream (``recovered``).

Only for greedy turns whose stream asked for it (``OpenVerify.allow_recovery``),
after a verdict that is not the end of the sequence, when no block of the session
waiting in the queue extends it. The block is as long as the one just verified,
never past the turn's max_new_tokens or the context. Lossless like every other
block: the oracle verifies it. Each stream has its own drafter (its KV cache),
made at the stream's first miss and dropped with the stream.

**A late block is not a miss.** When the round trip plus the draft's drafting
is about as long as a verification, the draft's blocks for a verdict often
arrive a few ms after it. Recovering then would throw them away, and the draft,
now drafting after the oracle's block, would be late again every round: the
oracle would end up drafting everything. So a verdict that nothing extends yet
is held (not sent) until the draft's blocks for it are all here: the last of
them is flagged (``VerifyBlock.last_alternative``). One that extends the verdict
ends the hold (the verdict goes out as usual); if none does, the oracle recovers.
A draft that sends no such blocks is waited for at most ``2 x late + 1 ms``,
``late`` being the stream's running mean of how late its matching blocks came
(blocks that come after a recovery count too). The recovery block is drafted
during the hold, while the model would idle anyway: a miss costs the longer of
the wait and the drafting, not both.

    verdict --(no block extends it)--> hold, draft B' --+-- a block extends it: send
                                                         |   the verdict, drop B'
                                                         +-- all blocks here / wait over:
                                                             send the verdict + B', queue B'
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from oracle_service.scheduler import BlockQueue, PendingBlock
from oracle_service.sessions import Lease, OracleSession
from specdec.drafters.model_drafter import ModelDrafter
from specdec.models import LoadedModel
from specdec.turn import Recovery, VerifyResult
from specdec.verifier import DraftBlock

log = logging.getLogger(__name__)

# The wait for a late block: HOLD_FACTOR x the stream's mean lateness + HOLD_MARGIN_NS,
# at most MAX_HOLD_NS. LATE_DECAY: weight of the past in that mean, per matching block.
HOLD_FACTOR = 2.0
HOLD_MARGIN_NS = 1_000_000
MAX_HOLD_NS = 200_000_000
LATE_DECAY = 0.8
MISSES_REMEMBERED = 4  # recent recoveries whose late blocks still teach the lateness

ModelThread = Callable[[Callable[[], Any]], Awaitable[Any]]


class RecoveryDrafter:
    """Drafts recovery blocks with ``model`` (model thread only)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    @property
    def name(self) -> str:
        return self.model.name

    def draft(self, lease: Lease, k: int) -> DraftBlock:
        """Up to k tokens after the leased session's committed tokens."""
        session = lease.session
        if lease.drafter is None:
            lease.drafter = ModelDrafter(self.model)
        return lease.drafter.propose(session.committed, k, session.params)


@dataclass(eq=False)
class Miss:
    """A verdict no waiting block extends, held back from its stream for a while; its
    recovery block is drafted meanwhile (``draft``), in case no block comes."""

    pending: PendingBlock
    result: VerifyResult
    verdict_ns: int
    deadline_ns: int
    draft: asyncio.Future[DraftBlock | None]


class Recoveries:
    """Holds misses and recovers them (event loop; the drafting runs in the model thread
    through ``model_thread``, between batches). ``wake`` wakes the batcher."""

    def __init__(
        self,
        drafter: RecoveryDrafter,
        queue: BlockQueue,
        model_thread: ModelThread,
        wake: Callable[[], None],
    ) -> None:
        self.drafter = drafter
        self.blocks = 0  # recovery blocks announced since start
        self._queue = queue
        self._model_thread = model_thread
        self._wake = wake
        self._held: list[Miss] = []

    def hold(self, pending: PendingBlock, result: VerifyResult, k: int, extended: bool) -> bool:
        """After a verdict (``result``) that a recovery block of k tokens could follow: hold
        it while the stream's blocks for it may still come, unless one already
        ``extended`` it (then only learn that it was on time). True: held.

        The recovery block is drafted at once: the model would wait for the late block
        anyway, and a miss then costs max(wait, drafting), not their sum.
        """
        lease = pending.lease
        if extended:
            _learn(lease, 0)
            return False
        now = time.perf_counter_ns()
        wait = min(MAX_HOLD_NS, HOLD_FACTOR * lease.late_ns + HOLD_MARGIN_NS)
        if any(_follows(pending, *burst) for burst in lease.bursts):
            wait = 0  # the draft's blocks for this verdict are all here: a miss
        draft = asyncio.ensure_future(self._model_thread(lambda: self._draft(lease, k)))
        draft.add_done_callback(lambda _: self._wake())
        self._held.append(Miss(pending, result, now, now + int(wait), draft))
        return True

    def next_deadline_s(self) -> float | None:
        """Seconds until a held miss is due (None: none will be before a draft is done)."""
        deadlines = [m.deadline_ns for m in self._held if m.draft.done()]
        if not deadlines:
            return None
        return max(0.0, (min(deadlines) - time.perf_counter_ns()) / 1e9)

    def arrived(self, pending: PendingBlock) -> None:
        """A block was queued: if it is the last the draft sends for a verdict, a miss held
        for that verdict is due now; if it extends a verdict a recovery answered, learn
        how late it came."""
        lease = pending.lease
        if pending.last_alternative and pending.assumed:
            burst = (pending.base_length - len(pending.assumed), pending.assumed)
            lease.bursts.append(burst)
            for miss in self._held:
                if miss.pending.lease is lease and _follows(miss.pending, *burst):
                    miss.deadline_ns = 0
        committed = pending.session.committed
        for length, verdict_ns in list(lease.missed.items()):
            if pending.base_length != length or len(committed) < length:
                continue
            if list(committed[length - len(pending.assumed) : length]) == list(pending.assumed):
                del lease.missed[length]
                _learn(lease, time.perf_counter_ns() - verdict_ns)
                return

    def settle(self, extends: Callable[[OracleSession], bool]) -> None:
        """Answer the held misses whose block came (``extends`` their session); recover
        those whose wait is over and whose recovery block is drafted."""
        now = time.perf_counter_ns()
        held: list[Miss] = []
        for miss in self._held:
            pending = miss.pending
            if pending.future.done():
                continue  # its stream is gone
            if not pending.lease.recovery:  # its stream sends no more blocks
                pending.future.set_result(miss.result)
            elif extends(pending.session):
                _learn(pending.lease, now - miss.verdict_ns)
                pending.future.set_result(miss.result)
            elif now >= miss.deadline_ns and miss.draft.done():
                self._recover(miss)
            else:
                held.append(miss)
        self._held = held

    def _recover(self, miss: Miss) -> None:
        """Queue the miss's recovery block as its session's next and answer the miss with
        it announced (without one if drafting failed)."""
        pending, result = miss.pending, miss.result
        block = None if miss.draft.cancelled() or miss.draft.exception() else miss.draft.result()
        if block is None or not len(block):
            pending.future.set_result(result)
            return
        follow: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
        # Ahead of any block of the session that arrived meanwhile: those assume another
        # verdict than the one announced, and are skipped.
        self._queue.put_next(
            PendingBlock(
                pending.lease, result.committed_length, block, (), follow, time.perf_counter_ns()
            )
        )
        missed = pending.lease.missed
        missed[result.committed_length] = miss.verdict_ns
        while len(missed) > MISSES_REMEMBERED:
            del missed[next(iter(missed))]
        self.blocks += 1
        pending.future.set_result(replace(result, recovery=Recovery(block, follow)))

    def _draft(self, lease: Lease, k: int) -> DraftBlock | None:
        """Model thread: the recovery block; None if drafting failed."""
        try:
            return self.drafter.draft(lease, k)
        except Exception:  # a failed recovery costs only the wait it would have saved
            log.exception("drafting a recovery block for %s failed", lease.session.session_id)
            return None

    def cancel(self) -> None:
        """Shutting down: the held verdicts will not be sent."""
        for miss in self._held:
            miss.pending.future.cancel()
        self._held.clear()


def _follows(pending: PendingBlock, start: int, assumed: tuple[int, ...]) -> bool:
    """Blocks drafted ahead after committed[:start] + assumed were drafted for the
    outcomes of ``pending`` (they assume its prefix and then one more token)."""
    tokens = pending.block.token_ids
    return (
        start == pending.base_length
        and len(assumed) <= len(tokens) + 1
        and assumed[:-1] == tuple(tokens[: len(assumed) - 1])
    )


def _learn(lease: Lease, late_ns: int) -> None:
    """Fold how late a matching block came into the stream's mean (early ones count 0)."""
    lease.late_ns = LATE_DECAY * lease.late_ns + (1 - LATE_DECAY) * max(0, late_ns)
