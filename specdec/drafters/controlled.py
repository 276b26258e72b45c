"""A drafter with a chosen acceptance, for benchmarks only (never a default).

An oracle with random weights (a real model's shape, ``specdec.bench.shapes``) makes
every real draft useless: nothing it proposes is accepted. To measure the system at a
given acceptance anyway, this drafter knows the oracle's greedy output for each prompt
(from a first pass with k = 0, ``References``) and proposes it, each token right with
probability ``acceptance`` given the ones before it:

    token i = the oracle's token        with probability a (drawn per position)
            = another token             otherwise (so the verdict stops there)

so a k-token block has 1 + a + ... + a^k expected committed tokens, Leviathan's
E(a, k). Draws are seeded by (seed, position): a rerun proposes the same blocks. Its
cost is chosen, not computed: ``step_s`` seconds of sleep per proposed token (e.g. a
measured Llama-3.2-1B step on a GPU, or the demo draft's on a CPU), off the event loop
and not holding any other session's drafting. A context that is not a prompt followed
by the oracle's own output (a guessed premise drafted ahead, or a prompt it was not
given) gets tokens that are all wrong.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock


@dataclass(frozen=True)
class Reference:
    """One prompt and the oracle's greedy output after it."""

    prompt: tuple[int, ...]
    output: tuple[int, ...]


class References:
    """The oracle's greedy outputs, looked up by the context a block continues."""

    def __init__(self, references: Sequence[Reference]) -> None:
        self._by_prompt = {ref.prompt: ref for ref in references}
        self._lengths = sorted({len(ref.prompt) for ref in references}, reverse=True)

    @classmethod
    def load(cls, path: str | Path) -> References:
        """From JSON ``{"references": [{"prompt": [...], "output": [...]}, ...]}``."""
        try:
            data = json.loads(Path(path).read_text())
            refs = [
                Reference(tuple(int(t) for t in r["prompt"]), tuple(int(t) for t in r["output"]))
                for r in data["references"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"cannot read bench references from {path!r}: {exc}") from exc
        return cls(refs)

    @staticmethod
    def dump(path: str | Path, references: Sequence[Reference]) -> None:
        payload = [{"prompt": list(r.prompt), "output": list(r.output)} for r in references]
        Path(path).write_text(json.dumps({"references": payload}))

    def continuation(self, context: Sequence[int]) -> tuple[int, ...] | None:
        """The oracle's greedy tokens after ``context``, when ``context`` is a known prompt
        followed by the start of its output; else None."""
        for length in self._lengths:
            ref = self._by_prompt.get(tuple(context[:length]))
            if ref is None:
                continue
            done = len(context) - length
            if tuple(context[length:]) == ref.output[:done]:
                return ref.output[done:]
        return None


class ControlledDrafter:
    """Proposes the oracle's greedy output at a chosen per-token acceptance (module doc)."""

    def __init__(
        self,
        references: References,
        acceptance: float,
        vocab_size: int,
        *,
        step_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise InvalidArgument(f"acceptance must be in [0, 1], got {acceptance}")
        if step_s < 0:
            raise InvalidArgument(f"the step time must be >= 0, got {step_s}")
        self.references = references
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self.step_s = step_s
        self.seed = seed
        self.unknown_contexts = 0  # proposals for a context no reference continues

    def propose(self, context: Sequence[int], k: int, params: SamplingParams) -> DraftBlock:
        if k <= 0:
            return DraftBlock(())
        began = time.perf_counter()
        truth = self.references.continuation(context)
        if truth is None:
            self.unknown_contexts += 1
            truth = ()
        tokens = []
        for i in range(k):
            position = len(context) + i
            draw = random.Random(f"{self.seed}:{position}")
            right = truth[i] if i < len(truth) else None
            if right is not None and draw.random() < self.acceptance:
                tokens.append(right)
            else:  # any other token: the oracle's greedy verdict rejects it
                wrong = draw.randrange(self.vocab_size - 1)
                tokens.append(wrong + (right is not None and wrong >= right))
        left = self.step_s * k - (time.perf_counter() - began)
        if left > 0:
            time.sleep(left)
        return DraftBlock(tuple(tokens))

    def update(self, num_accepted: int) -> None:
        pass
