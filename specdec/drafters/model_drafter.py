"""A small causal LM as drafter: k autoregressive steps on its own KV cache.

The drafter's cache follows the committed context round after round. After a
round it holds context + x_0..x_{k-2} (x_{k-1} was sampled but never fed).
The next ``propose`` syncs that cache with the new context, which keeps the
accepted draft tokens and drops the rejected ones, then feeds the uncached
tail in one forward (the recovered/bonus token, plus the last accepted draft
token when all were accepted). That forward's last row gives q_0; each later
step feeds one token. So k forwards per round, the first over a few tokens.

Greedy: x_i = argmax of the draft logits, token-only block (q=None): the oracle
accepts iff it would have chosen x_i itself. The block also records the draft's
next choices at each position (runner-up and third), the likeliest corrections if
x_i is rejected, and ``branch`` drafts ahead for those corrections (see
``specdec.drafters.branches``).
Sampling, coupled (the default): q_i = the draft's distribution under the request's
temperature, top-k and top-p, raced with the oracle's own noise at that position
(``specdec.core.sampling.race_scores``, the turn's seed): x_i is the winner of that
race, the draft's guess of the oracle's own draw there, and the block is token-only
(the oracle accepts x_i iff it is its draw: ``specdec.core.verifier``). Nothing but
the ids crosses the wire, and as when greedy the race's runners-up are the likely
corrections, so ``branch`` drafts ahead for them and for the guessed bonus.
Sampling, not coupled: q_i truncated to its ``max_support`` most likely ids and
renormalised; x_i ~ q_i from the draft's own stream. The truncated q is what the
block carries, so the verifier's min(1, p/q) test uses the very distribution x_i
was drawn from.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import (
    SamplingParams,
    SparseDist,
    logits_to_probs,
    position_generator,
    race_scores,
    race_times,
    resolve_seed,
    sample_sparse,
    truncate_to_sparse,
)
from specdec.core.types import Branch, BranchTicket, DraftBlock, RunnerUps
from specdec.drafters.branches import (
    Ranking,
    draft_branches,
    full_acceptance_branch,
    softmax_ranking,
    top_choices,
)
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.lean_forward import LeanCache, lean_unsupported
from specdec.engine.models import LoadedModel

# Random stream of draft proposals (0 is the oracle's verification stream).
DRAFT_STREAM = 1
RACE_CACHE = 24  # positions whose race noise a drafter keeps (V float32 each)


class ModelDrafter:
    """Drafts with ``model`` (same tokenizer as the oracle: see ``models.check_compatible``)."""

    def __init__(
        self,
        model: LoadedModel,
        max_support: int = 32,
        seed: int | None = None,
        lean: bool = True,
        coupled: bool = True,
    ) -> None:
        """lean: draft on ``specdec.engine.lean_forward`` where the model qualifies (else HF's).
        coupled: sampled blocks race the oracle's noise (token-only); else they carry q.
        ``seed`` must be the turn's for coupled blocks to guess the oracle's draws."""
        if max_support < 1:
            raise InvalidArgument(f"max_support must be >= 1, got {max_support}")
        self.model = model
        self.max_support = max_support
        self.coupled = coupled
        self._races: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.cache = (
            LeanCache(model) if lean and lean_unsupported(model) is None else SequenceCache(model)
        )
        self.seed = resolve_seed(seed)
        # (proposed, accepted) per round, in order.
        self.history: list[tuple[int, int]] = []
        self._last_proposed = 0

    def reset(self, seed: int | None = None) -> None:
        """Start a new sequence: empty cache and history, a new seed (random when None)."""
        self.cache.reset()
        self.history.clear()
        self._last_proposed = 0
        self.seed = resolve_seed(seed)

    def propose(self, context: Sequence[int], k: int, params: SamplingParams) -> DraftBlock:
        """Propose up to k tokens after ``context``; fewer only at the draft's context limit."""
        if len(context) == 0:
            raise InvalidArgument("cannot draft after an empty context")
        # Positions context..context+k-2 are fed; x_{k-1} is never fed.
        k = max(0, min(k, self.model.max_context - len(context) + 1))
        self._last_proposed = k
        if k == 0:
            return DraftBlock(token_ids=())
        logits = self._catch_up(context)  # [V]
        tokens: list[int] = []
        dists: list[SparseDist] = []
        runner_ups: list[RunnerUps] = []
        rank = self.ranking(params)
        for i in range(k):
            if i > 0:
                logits = self.cache.extend([tokens[-1]])[-1]  # [V]
            if rank is not None:
                (token,), (runner_up,) = top_choices(rank(logits[None], [len(context) + i]))
                runner_ups.append(runner_up)
            else:
                token, q = self._sample(logits, params, position=len(context) + i)
                dists.append(q)
            tokens.append(token)
        if rank is not None:
            return DraftBlock(tuple(tokens), None, tuple(runner_ups))
        return DraftBlock(tuple(tokens), tuple(dists))

    def ranking(self, params: SamplingParams) -> Ranking | None:
        """How a token and its runners-up are chosen from the logits: greedy, the draft's
        argmax; sampled and coupled, the winner of the race with the oracle's noise at
        that position; None when sampled blocks carry q (drawn from it instead)."""
        if params.greedy:
            return softmax_ranking
        if not self.coupled:
            return None

        def race(logits: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
            probs = logits_to_probs(logits, params)  # [B, V]
            times = torch.stack([self._race_times(p, probs.shape[-1]) for p in positions])
            return race_scores(probs, times).clamp(min=0)

        return race

    def _race_times(self, position: int, vocab_size: int) -> torch.Tensor:
        """The oracle's race noise at ``position`` for this drafter's seed, kept for the
        ``RACE_CACHE`` newest positions: drafting ahead races the same positions for
        several outcomes, and drafts them again after the verdict."""
        key = (self.seed, position)
        times = self._races.pop(key, None)
        if times is None:  # (float32: a guess of the oracle's draw need not be exact)
            times = race_times(self.seed, position, vocab_size).float()
        self._races[key] = times  # newest last
        while len(self._races) > RACE_CACHE:
            self._races.popitem(last=False)
        return times

    def branch(
        self,
        context: Sequence[int],
        block: DraftBlock,
        k: int,
        params: SamplingParams,
        width: int,
        ticket: BranchTicket | None = None,
    ) -> list[Branch]:
        """Blocks of up to k tokens for the likely outcomes of verifying ``block`` after
        ``context``: full acceptance first, then (greedy, or sampled and coupled) the
        ``width`` likeliest corrections. Empty when not even the bonus guess fits, or
        once ``ticket`` is cancelled."""
        rank = self.ranking(params)
        if rank is not None:
            return draft_branches(self.cache, context, block, k, width, ticket, rank)
        return full_acceptance_branch(self, context, block, k, params, ticket)

    def update(self, num_accepted: int) -> None:
        """Record how many tokens of the last proposal the oracle accepted."""
        self.history.append((self._last_proposed, num_accepted))

    def _catch_up(self, context: Sequence[int]) -> torch.Tensor:
        """Cache context[:-1] (reusing what is cached), feed the rest; logits [V] after context."""
        # Keep at least the last context token uncached: its logits are what we need.
        reused = min(self.cache.sync(context), len(context) - 1)
        self.cache.rollback(reused)
        return self.cache.extend(context[reused:], logits_to_keep=1)[-1]

    def _sample(
        self, logits: torch.Tensor, params: SamplingParams, position: int
    ) -> tuple[int, SparseDist]:
        """logits [V] -> (x, q): x ~ q = the truncated draft distribution."""
        assert logits.dim() == 1, tuple(logits.shape)
        q = truncate_to_sparse(logits_to_probs(logits, params), self.max_support)
        return sample_sparse(q, position_generator(self.seed, position, DRAFT_STREAM)), q
