"""Rescue blocks: after a miss, the oracle drafts the session's next block itself.

A draft hides the round trip by drafting ahead, during verification, for the
likely outcomes of the block in flight (its full acceptance, its likeliest
corrections) and sending those blocks before the verdict. When the verdict is
none of them (a miss: about 3 rounds in 10 at k = 4 with the demo pair), the
oracle has nothing of that session to verify until the verdict has reached the
draft, a fresh block has been drafted and it has come back: a round trip plus a
draft, idle. On a 20 ms link that is most of a verification.

An oracle started with a rescue draft (``--rescue-draft``, a copy of a small
draft model) fills that gap: it drafts the block itself, tells the draft
(``RescueDecision``) and verifies it at once. The draft then drafts ahead after
that block as after one of its own, so the next round finds its block ready
again; the oracle sends the rescue block's verdict next on the stream
(``rescued``).

Only for greedy turns whose stream asked for it (``OpenVerify.allow_rescue``),
after a verdict that is not the end of the sequence, when no block of the session
waiting in the queue extends it. The block is as long as the one just verified,
never past the turn's max_new_tokens or the context. Lossless like every other
block: the oracle verifies it. Each stream has its own drafter (its KV cache),
made at the stream's first miss and dropped with the stream.

**A late block is not a miss.** When the round trip plus the draft's drafting
is about as long as a verification, the draft's blocks for a verdict often
arrive after it. Rescuing then would throw them away, and the draft, now
drafting after the oracle's block, would be late again every round: the oracle
would end up drafting everything. So the oracle decides only once the draft's
blocks for the verdict are all here (the last of them is flagged,
``VerifyBlock.last_alternative``): one that extends the verdict means no
rescue, none means a miss. A draft that flags nothing is waited for at most
``2 x late + 1 ms``, ``late`` being the stream's running mean of how late its
matching blocks came (blocks that come after a rescue count too).

The verdict is not held meanwhile: it goes out at once with ``rescue_pending``,
so the draft keeps drafting ahead after the block it has in flight, and the
decision follows it on the stream. The rescue block is drafted while the
decision waits, in a thread of its own (a block that arrives meanwhile is
verified at once; on a CPU, in the model thread): a miss costs the longer of the
wait and the drafting, not both.

**A busy drafter does not hold up misses.** Rescue blocks are drafted one at a
time, in the order of their verdicts. A miss waits only for the first of them: a
miss whose block still waits behind another's is decided "none", and the draft
drafts its own block. A block no longer wanted is dropped, before it starts if it
has not. With many sessions most verdicts are not extended yet when they go out;
drafting a block for each of them in the one drafter thread, and making every
decision wait for its block, would serialise all sessions' misses behind it.

    verdict, nothing extends it --> send it (rescue_pending); draft B' meanwhile
        a block extends it             --> decision: none (B' dropped)
        all blocks here, or wait over  --> decision: B'; queue B', verify it next
            ... while B' waits behind another miss's block --> decision: none

Wiring: the engine makes ``Rescues`` with ``rescues_for``; the scheduler tells it of
every block queued (``arrived``) and settles the misses before each batch
(``settle``); every verdict goes through ``answer`` before it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace

from oracle_service.scheduler import BlockQueue, PendingBlock, known_stale
from oracle_service.sessions import Lease, OracleSession
from specdec.core.prefix import held, is_outcome
from specdec.core.types import DraftBlock, Rescue, Verdict, VerifyResult
from specdec.drafters.model_drafter import ModelDrafter
from specdec.engine.models import LoadedModel

log = logging.getLogger(__name__)

# The longest wait for a draft's late blocks, when it flags none as its last:
# HOLD_FACTOR x the stream's mean lateness + HOLD_MARGIN_NS, at most MAX_HOLD_NS.
# LATE_DECAY: weight of the past in that mean, per matching block.
HOLD_FACTOR = 2.0
HOLD_MARGIN_NS = 1_000_000
MAX_HOLD_NS = 200_000_000
LATE_DECAY = 0.8
MISSES_REMEMBERED = 4  # recent rescues whose late blocks still teach the lateness


class RescueDrafter:
    """Drafts rescue blocks with ``model`` in ``executor``.

    On a GPU, a thread of its own (the default): the oracle's model thread stays free
    for a block that arrives meanwhile. On a CPU the oracle passes its model thread:
    two jobs at once there only slow each other down on the same cores.
    """

    def __init__(self, model: LoadedModel, executor: Executor | None = None) -> None:
        self.model = model
        self._own = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="oracle-rescue")

    @property
    def name(self) -> str:
        return self.model.name

    async def draft(self, lease: Lease, committed: list[int], k: int) -> DraftBlock:
        """Up to k tokens after ``committed`` (the leased session's tokens, copied)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._draft, lease, committed, k)

    def _draft(self, lease: Lease, committed: list[int], k: int) -> DraftBlock:
        if lease.drafter is None:
            lease.drafter = ModelDrafter(self.model)
        return lease.drafter.propose(committed, k, lease.session.params)

    def close(self) -> None:
        if self._own:
            self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class Miss:
    """A verdict no waiting block extends, whose rescue is not decided yet; its
    rescue block is drafted meanwhile (``draft``), in case no block comes."""

    pending: PendingBlock
    committed_length: int
    verdict_ns: int
    deadline_ns: int
    draft: asyncio.Future[DraftBlock | None]
    decision: asyncio.Future[Rescue | None]


def rescues_for(
    draft: LoadedModel | None,
    oracle: LoadedModel,
    lane: Executor,
    queue: BlockQueue,
    wake: Callable[[], None],
) -> Rescues | None:
    """The rescues of an oracle with rescue draft ``draft`` (None: none), drafted in
    ``lane`` (the oracle's one lane) when on the CPU; ``wake`` wakes the batcher."""
    if draft is None:
        return None
    on_cpu = draft.device.type == "cpu"
    if not on_cpu:
        log.warning(
            "rescue blocks on %s: on a GPU oracle they were measured not to pay "
            "(BENCHMARKS.md); consider running without a rescue draft",
            draft.device,
        )
    drafter = RescueDrafter(draft, lane if on_cpu else None)
    return Rescues(drafter, queue, wake, oracle.eos_token_ids, oracle.max_context)


class Rescues:
    """Decides the misses' rescues (event loop). ``wake`` wakes the batcher; the oracle's
    end-of-sequence tokens and context bound the rescue blocks."""

    def __init__(
        self,
        drafter: RescueDrafter,
        queue: BlockQueue,
        wake: Callable[[], None],
        eos_token_ids: tuple[int, ...],
        max_context: int,
    ) -> None:
        self.drafter = drafter
        self.blocks = 0  # rescue blocks queued since start
        self._queue = queue
        self._wake = wake
        self._eos_token_ids = eos_token_ids
        self._max_context = max_context
        self._misses: list[Miss] = []

    def answer(self, pending: PendingBlock, result: VerifyResult) -> VerifyResult:
        """``pending``'s result, with a pending rescue decision if its verdict may get a
        rescue block and no block waiting in the queue extends it."""
        k = self.rescue_k(pending, result.verdict)
        if not k:
            return result
        return self.after_verdict(pending, result, k, self.extends(pending.session))

    def rescue_k(self, pending: PendingBlock, verdict: Verdict | None) -> int:
        """Tokens of a rescue block after ``pending``'s verdict, should no block of the
        draft's extend it (0 = none): as long as the block just verified, within the
        turn's max_new_tokens and the context; none after an end-of-sequence token.
        """
        lease = pending.lease
        if verdict is None or not lease.rescue or verdict.next_token in self._eos_token_ids:
            return 0
        session = lease.session
        have = len(session.committed)
        remaining = session.params.max_new_tokens - (have - lease.opened_length)
        return max(0, min(len(pending.block), remaining - 1, self._max_context - have - 1))

    def extends(self, session: OracleSession) -> bool:
        """A block waiting in the queue extends ``session``'s committed tokens as they are."""
        have = len(session.committed)
        return any(
            waiting.base_length == have and not known_stale(waiting)
            for waiting in self._queue.waiting(session)
        )

    def after_verdict(
        self, pending: PendingBlock, result: VerifyResult, k: int, extended: bool
    ) -> VerifyResult:
        """``pending``'s verdict (``result``), which a rescue block of k tokens could
        follow: unless a waiting block already ``extended`` it, the result with a pending
        rescue decision, its block drafted at once."""
        lease = pending.lease
        if extended:
            _learn(lease, 0)  # on time
            return result
        now = time.perf_counter_ns()
        wait = min(MAX_HOLD_NS, HOLD_FACTOR * lease.late_ns + HOLD_MARGIN_NS)
        if any(_follows(pending, *burst) for burst in lease.bursts):
            wait = 0  # the draft's blocks for this verdict are all here: a miss
        loop = asyncio.get_running_loop()
        committed = list(lease.session.committed)  # (the model thread may extend it later)
        draft = asyncio.ensure_future(self._draft(lease, committed, k))
        draft.add_done_callback(lambda _: self._wake())
        decision: asyncio.Future[Rescue | None] = loop.create_future()
        miss = Miss(pending, result.committed_length, now, now + int(wait), draft, decision)
        self._misses.append(miss)
        return replace(result, decision=decision)

    def next_deadline_s(self) -> float | None:
        """Seconds until a miss is due (None: none will be before a draft is done)."""
        drafting = [m for m in self._misses if not m.draft.done()]
        deadlines = [m.deadline_ns for m in self._misses if m not in drafting[:1]]
        if not deadlines:
            return None
        return max(0.0, (min(deadlines) - time.perf_counter_ns()) / 1e9)

    def arrived(self, pending: PendingBlock) -> None:
        """A block was queued: if it is the last the draft sends for a verdict, a miss
        waiting on that verdict is due now; if it extends a verdict a rescue answered,
        learn how late it came."""
        lease = pending.lease
        if pending.last_alternative and pending.assumed:
            burst = (pending.base_length - len(pending.assumed), pending.assumed)
            lease.bursts.append(burst)
            for miss in self._misses:
                if miss.pending.lease is lease and _follows(miss.pending, *burst):
                    miss.deadline_ns = 0
        committed = pending.session.committed
        for length, verdict_ns in list(lease.missed.items()):
            if pending.base_length == length and held(committed, length, pending.assumed):
                del lease.missed[length]
                _learn(lease, time.perf_counter_ns() - verdict_ns)
                return

    def settle(self) -> None:
        """Decide the misses whose block came (it ``extends`` their session: no rescue),
        and those whose wait is over and whose rescue block is drafted (rescue).
        Call before the next batch is taken: a block that extends a miss's verdict must
        find it decided."""
        now = time.perf_counter_ns()
        undecided: list[Miss] = []
        queued = False  # an earlier miss's block is still being drafted (or waits to be)
        for miss in self._misses:  # in the order their blocks went to the drafter
            lease = miss.pending.lease
            if miss.decision.done():  # its stream is gone
                miss.draft.cancel()
                continue
            due = now >= miss.deadline_ns
            if not lease.rescue:  # its stream sends no more blocks
                _decide(miss, None)
            elif self.extends(lease.session):
                _learn(lease, now - miss.verdict_ns)
                _decide(miss, None)
            elif due and miss.draft.done():
                _decide(miss, self._rescue(miss))
            elif due and queued:
                _decide(miss, None)  # behind other misses' blocks: the draft drafts its own
            else:
                undecided.append(miss)
                queued = queued or not miss.draft.done()
        self._misses = undecided

    def _rescue(self, miss: Miss) -> Rescue | None:
        """Queue the miss's rescue block as its session's next (None: drafting failed)."""
        draft = miss.draft
        block = None if draft.cancelled() or draft.exception() else draft.result()
        if block is None or not len(block):
            return None
        lease = miss.pending.lease
        follow: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
        # Ahead of any block of the session waiting: those assume another verdict than
        # the one decided, and are skipped.
        now = time.perf_counter_ns()
        self._queue.put_next(PendingBlock(lease, miss.committed_length, block, (), follow, now))
        lease.missed[miss.committed_length] = miss.verdict_ns
        while len(lease.missed) > MISSES_REMEMBERED:
            del lease.missed[next(iter(lease.missed))]
        self.blocks += 1
        return Rescue(block, follow)

    async def _draft(self, lease: Lease, committed: list[int], k: int) -> DraftBlock | None:
        """The rescue block; None if drafting failed."""
        try:
            return await self.drafter.draft(lease, committed, k)
        except Exception:  # a failed rescue costs only the wait it would have saved
            log.exception("drafting a rescue block for %s failed", lease.session.session_id)
            return None

    def cancel(self) -> None:
        """Shutting down: nothing will be decided."""
        for miss in self._misses:
            miss.decision.cancel()
        self._misses.clear()
        self.drafter.close()


def _decide(miss: Miss, rescue: Rescue | None) -> None:
    """Settle ``miss``; its rescue block, if still to be drafted, is no longer wanted."""
    miss.draft.cancel()
    miss.decision.set_result(rescue)


def _follows(pending: PendingBlock, start: int, assumed: tuple[int, ...]) -> bool:
    """Blocks drafted ahead after committed[:start] + assumed were drafted for the
    outcomes of ``pending`` (they assume its prefix and then one more token)."""
    return start == pending.base_length and is_outcome(assumed, pending.block.token_ids)


def _learn(lease: Lease, late_ns: int) -> None:
    """Fold how late a matching block came into the stream's mean (early ones count 0)."""
    lease.late_ns = LATE_DECAY * lease.late_ns + (1 - LATE_DECAY) * max(0, late_ns)
