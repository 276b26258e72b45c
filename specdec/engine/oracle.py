"""The oracle: scores a drafted block in one forward pass and returns the verdict.

Cache invariant of a session: its ``SequenceCache`` holds the KV of
``committed[:-1]``. The last committed token has not been fed yet; it is the
first input of the next verify, so no logits ever need to be stored between
rounds. One verify of a k-token block x_0..x_{k-1}:

    inputs   [committed[-1], x_0, ..., x_{k-1}]        k+1 positions
    logits   [k+1, V]: row i is p_i, the oracle's distribution for block position i
    verdict  n accepted, then one recovered/bonus token y
    cache    rolled back to committed + x_0..x_{n-1}   (= new committed[:-1])

so the KV of accepted draft tokens is kept and never recomputed, and y is the
first input of the next round.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock, Verdict
from specdec.core.verifier import validate_block, verify_block, with_logprobs
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.kv_options import PREFILL_THREADS_FROM
from specdec.engine.lean_forward import LeanCache, LeanModel, lean_unsupported
from specdec.engine.models import LoadedModel
from specdec.engine.paged_kv import PagedCache, PagedPool
from specdec.engine.static_kv import SlotCache, SlotPool


@contextlib.contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads raised to ``count`` for the block, then put back."""
    before = torch.get_num_threads()
    if count <= before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class PrefillResult:
    """reused: cached tokens kept; computed: tokens run through the model now."""

    reused: int
    computed: int
    prefill_ns: int = 0


@dataclass(frozen=True)
class VerifyTiming:
    """Wall time of one verify, in ns.

    prefill_ns: catching the cache up to committed[:-1] (0 when already in sync).
    forward_ns: the forward over the k+1 positions.
    verify_ns: the whole verify (prefill + forward + acceptance test + rollback).
    """

    prefill_ns: int
    forward_ns: int
    verify_ns: int
    prefill_computed: int


class Oracle:
    """Verifies draft blocks for any number of sequences, each with its own ``SequenceCache``."""

    def __init__(
        self,
        model: LoadedModel,
        slots: SlotPool | PagedPool | None = None,
        lean: bool = False,
        prefill_threads: int = 1,
    ) -> None:
        """``slots``: the sessions' KV pool: paged blocks (``specdec.engine.paged_kv``) or
        static slots (``specdec.engine.static_kv``). Sessions outside a pool (no pool, or
        no slot free) get a ``LeanCache`` when ``lean`` and the model qualifies (fewer ops
        per forward: the demo oracle's step on a CPU takes 1.4-1.75x less time), else a
        ``SequenceCache`` on HF's forward.

        ``prefill_threads``: on a CPU, torch's threads for a prefill of at least
        ``PREFILL_THREADS_FROM`` tokens (a verify keeps the process's own: it runs beside
        the draft, a prompt's prefill mostly alone)."""
        self.model = model
        self.prefill_threads = prefill_threads
        self.slots = slots
        self.lean = LeanModel(model) if lean and lean_unsupported(model) is None else None

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def new_cache(self) -> SequenceCache:
        cache = self.slots.new_cache() if self.slots is not None else None
        if cache is not None:
            return cache
        return SequenceCache(self.model) if self.lean is None else LeanCache(self.model, self.lean)

    def prefill(self, cache: SequenceCache, committed: Sequence[int]) -> PrefillResult:
        """Bring ``cache`` to the KV of committed[:-1], reusing its longest common prefix."""
        start = time.perf_counter_ns()
        if len(committed) == 0:
            raise InvalidArgument("committed tokens must not be empty (give at least a prompt)")
        if len(committed) > self.max_context:
            raise InvalidArgument(
                f"{len(committed)} tokens exceed the oracle's context of {self.max_context}"
            )
        target = committed[:-1]
        reused = cache.sync(target)
        computed = len(target) - reused
        many = computed >= PREFILL_THREADS_FROM and self.model.device.type == "cpu"
        with _intra_op_threads(self.prefill_threads if many else 1):
            if computed and isinstance(self.slots, PagedPool) and isinstance(cache, PagedCache):
                self.slots.prefill(cache, target[reused:])  # replayed as CUDA graphs
            elif computed and isinstance(self.slots, SlotPool) and isinstance(cache, SlotCache):
                self.slots.prefill(cache, target[reused:])
            elif computed:
                # Only the KV is wanted; keep one row of logits instead of [n, V].
                cache.extend(target[reused:], logits_to_keep=1)
        return PrefillResult(reused, computed, time.perf_counter_ns() - start)

    def verify(
        self,
        cache: SequenceCache,
        committed: Sequence[int],
        block: DraftBlock,
        params: SamplingParams,
        seed: int,
    ) -> Verdict:
        """Score ``block`` after ``committed`` and leave the cache holding new committed[:-1]."""
        verdict, _ = self.verify_timed(cache, committed, block, params, seed)
        return verdict

    def verify_timed(
        self,
        cache: SequenceCache,
        committed: Sequence[int],
        block: DraftBlock,
        params: SamplingParams,
        seed: int,
    ) -> tuple[Verdict, VerifyTiming]:
        """``verify`` and its timing (the services report ``verify_ns``)."""
        start = time.perf_counter_ns()
        k = len(block.token_ids)
        validate_block(block, self.vocab_size)
        if len(committed) + k > self.max_context:
            raise InvalidArgument(
                f"{len(committed)} committed + {k} draft tokens exceed the oracle's context of "
                f"{self.max_context}; send a shorter block"
            )
        prefill = self.prefill(cache, committed)
        base = len(committed) - 1
        assert len(cache) == base, (len(cache), base)

        forward_start = time.perf_counter_ns()
        try:
            logits = cache.extend([committed[-1], *block.token_ids])  # [k+1, V]
            assert logits.shape == (k + 1, self.vocab_size), tuple(logits.shape)
            if logits.device.type == "cuda":
                torch.cuda.current_stream(logits.device).synchronize()  # this thread's stream
            forward_ns = time.perf_counter_ns() - forward_start
            # Row i predicts block position i, at absolute position len(committed) + i.
            verdict = verify_block(logits, block, params, position=len(committed), seed=seed)
            verdict = with_logprobs(verdict, logits, block, params)
        except BaseException:
            if len(cache) > base:
                cache.rollback(base)
            raise
        # Keep committed[-1] and the accepted draft tokens; drop the rejected tail.
        cache.rollback(base + 1 + verdict.num_accepted)
        timing = VerifyTiming(
            prefill_ns=prefill.prefill_ns,
            forward_ns=forward_ns,
            verify_ns=time.perf_counter_ns() - start,
            prefill_computed=prefill.computed,
        )
        return verdict, timing
