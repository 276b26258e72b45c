"""`specdec traces FILE --tail [P]`: where the slowest inter-token gaps of a span file come from.

A round's tokens arrive together: a round that commits n tokens w after the previous
verdict gives n inter-token gaps of w / n, as ``specdec bench`` counts them. Over every
round of every request in the file (the first round of a request excluded: its wall time
is the time to first token), the rounds whose gap is at or above the P-th percentile of
all tokens' gaps are the tail. Their mean time split against all rounds' says what the
tail is made of:

    wall = draft (the loop waiting for the block) + network + queue + verify + other

``other`` is what the four leave out (commit and bookkeeping; negative where a block
drafted ahead overlapped the previous verification). To read a benchmark's tail, run it
with ``SPECDEC_TRACE_FILE`` and ``OTEL_TRACES_SAMPLER=always_on`` set: its services
inherit them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TextIO

from specdec.core.errors import InvalidArgument, NotFound
from specdec.telemetry.jsonl import read_spans
from specdec.telemetry.report import RoundRow, group_traces, rounds_of


@dataclass
class Split:
    """Mean time split of a set of rounds (ms per round)."""

    rounds: int = 0
    tokens_per_round: float = 0.0
    wall_ms: float = 0.0
    draft_ms: float = 0.0
    network_ms: float = 0.0
    queue_ms: float = 0.0
    verify_ms: float = 0.0
    other_ms: float = 0.0
    blocks: dict[str, int] = field(default_factory=dict)  # block origin -> rounds


@dataclass
class Tail:
    percentile: float
    requests: int
    tokens: int
    gap_ms: float  # the P-th percentile of the tokens' gaps
    all: Split
    tail: Split


def split(rows: Sequence[RoundRow]) -> Split:
    n = len(rows)
    if not n:
        return Split()

    def mean(values: Sequence[float]) -> float:
        return sum(values) / n

    parts = [(r.draft_ms, r.network_ms, r.queue_ms, r.verify_ms) for r in rows]
    return Split(
        rounds=n,
        tokens_per_round=mean([r.committed for r in rows]),
        wall_ms=mean([r.wall_ms for r in rows]),
        draft_ms=mean([p[0] for p in parts]),
        network_ms=mean([p[1] for p in parts]),
        queue_ms=mean([p[2] for p in parts]),
        verify_ms=mean([p[3] for p in parts]),
        other_ms=mean([r.wall_ms - sum(p) for r, p in zip(rows, parts, strict=True)]),
        blocks=dict(Counter(r.block for r in rows).most_common()),
    )


def tail_of(requests: Sequence[Sequence[RoundRow]], percentile: float) -> Tail:
    """The tail of ``requests`` (each one's rounds, in order) at ``percentile``."""
    if not 0 < percentile < 100:
        raise InvalidArgument(f"--tail takes a percentile in (0, 100), got {percentile}")
    rows = [
        r
        for rounds in requests
        for r in rounds
        if r.round > 0 and r.extra != "skipped" and r.committed > 0
    ]
    if not rows:
        raise NotFound("no verified rounds after a request's first in this file")
    if not any(r.wall_ms for r in rows):
        raise InvalidArgument(
            "the rounds in this file carry no wall time (specdec.round.wall_ns): it was "
            "written by an older specdec"
        )
    gaps = sorted(r.wall_ms / r.committed for r in rows for _ in range(r.committed))
    gap = gaps[min(len(gaps) - 1, round(percentile / 100 * (len(gaps) - 1)))]
    tail = [r for r in rows if r.wall_ms / r.committed >= gap]
    return Tail(percentile, len(requests), len(gaps), gap, split(rows), split(tail))


def format_tail(t: Tail) -> str:
    header = (
        f"{t.requests} requests, {t.tokens} tokens after the first round: inter-token gap "
        f"p{t.percentile:g} = {t.gap_ms:.1f} ms (a round of n tokens after w ms: n gaps of w/n)"
    )
    columns = ("rounds", "tokens/round", "wall", "draft", "network", "queue", "verify", "other")
    lines = [header, f"{'':>8}  " + "  ".join(f"{c:>12}" for c in columns) + "  blocks"]
    for name, s in (("all", t.all), (f">= p{t.percentile:g}", t.tail)):
        cells = [f"{s.rounds}", f"{s.tokens_per_round:.2f}"] + [
            f"{v:.1f} ms"
            for v in (s.wall_ms, s.draft_ms, s.network_ms, s.queue_ms, s.verify_ms, s.other_ms)
        ]
        blocks = ", ".join(f"{k} {v}" for k, v in s.blocks.items())
        lines.append(f"{name:>8}  " + "  ".join(f"{c:>12}" for c in cells) + f"  {blocks}")
    return "\n".join(lines)


def show_tail(path: str | os.PathLike[str], percentile: float, as_json: bool, out: TextIO) -> Tail:
    """Print the tail of every request in ``path``; returns it."""
    if not os.path.exists(path):
        raise NotFound(f"no trace file {str(path)!r}; set SPECDEC_TRACE_FILE on the services")
    traces = group_traces(read_spans(path))
    requests = [rounds for rounds in map(rounds_of, traces.values()) if rounds]
    t = tail_of(requests, percentile)
    out.write((json.dumps(asdict(t)) if as_json else format_tail(t)) + "\n")
    return t
