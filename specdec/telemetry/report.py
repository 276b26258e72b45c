"""`specdec traces FILE`: one request round by round, from a ``SPECDEC_TRACE_FILE``, no backend.

    specdec traces spans.jsonl                 the last request
    specdec traces spans.jsonl --last 3        the last three
    specdec traces spans.jsonl --trace-id 4bf9 one trace (an id prefix is enough)

For each trace: a header (root span, duration, model, tokens), a table with
one row per ``specdec.round`` span (k, proposed, accepted, correction or
bonus, committed tokens and length, and the time split: draft, verify,
network, queue) and a summary line: services seen, totals, acceptance.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from specdec.core.errors import InvalidArgument, NotFound
from specdec.telemetry import names
from specdec.telemetry.jsonl import SpanRecord, read_spans


@dataclass(frozen=True)
class RoundRow:
    round: int
    k: int
    proposed: int
    accepted: int
    extra: str  # bonus | correction
    committed: int
    length: int
    draft_ms: float
    verify_ms: float
    network_ms: float
    queue_ms: float
    service: str
    block: str = "fresh"  # RoundReport.block_origin ("-" for a skipped block)
    wall_ms: float = 0.0  # since the previous verdict (round 0: the open); 0 = not recorded


@dataclass
class TraceSummary:
    """Totals of one trace, as the summary line shows them (and ``--json`` prints)."""

    trace_id: str
    root: str
    duration_ms: float
    services: list[str]
    rounds: int = 0
    skipped: int = 0  # pipelined blocks not verified (stale, or unneeded at the end)
    proposed: int = 0
    accepted: int = 0
    committed: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    network_ms: float = 0.0
    queue_ms: float = 0.0
    rolled_back: int = 0
    evictions: int = 0
    re_prefills: int = 0
    prefill_cached: int = 0
    prefill_computed: int = 0
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def group_traces(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return dict(traces)


def root_of(spans: Sequence[SpanRecord]) -> SpanRecord:
    """The span whose parent is not in the trace (a client's remote parent counts as none)."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id not in ids]
    return min(roots or spans, key=lambda s: s.start_ns)


def select(
    traces: dict[str, list[SpanRecord]], trace_id: str | None = None, last: int = 1
) -> list[str]:
    """Trace ids to show: those starting with ``trace_id``, else the ``last`` requests."""
    if trace_id:
        wanted = trace_id.lower()
        found = sorted(t for t in traces if t.startswith(wanted))
        if not found:
            raise NotFound(f"no trace {trace_id!r} in the file ({len(traces)} traces)")
        return found
    if last < 1:
        raise InvalidArgument(f"--last must be >= 1, got {last}")
    requests = [t for t, spans in traces.items() if any(s.name == names.ROUND_SPAN for s in spans)]
    ordered = sorted(requests or traces, key=lambda t: root_of(traces[t]).start_ns)
    return ordered[-last:]


def _ms(ns: Any) -> float:
    return int(ns or 0) / 1e6


def rounds_of(spans: Sequence[SpanRecord]) -> list[RoundRow]:
    rows = []
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.name != names.ROUND_SPAN:
            continue
        a = span.attributes
        rows.append(
            RoundRow(
                round=int(a.get(names.ROUND_INDEX, 0)),
                k=int(a.get(names.ROUND_K, 0)),
                proposed=int(a.get(names.ROUND_PROPOSED, 0)),
                accepted=int(a.get(names.ROUND_ACCEPTED, 0)),
                extra="skipped"
                if a.get(names.ROUND_SKIPPED)
                else str(a.get(names.ROUND_EXTRA_TOKEN, "?")),
                committed=int(a.get(names.ROUND_COMMITTED, 0)),
                length=int(a.get(names.ROUND_COMMITTED_LENGTH, 0)),
                draft_ms=_ms(a.get(names.ROUND_DRAFT_NS)),
                verify_ms=_ms(a.get(names.ROUND_VERIFY_NS)),
                network_ms=_ms(a.get(names.ROUND_NETWORK_NS)),
                queue_ms=_ms(a.get(names.ROUND_QUEUE_NS)),
                service=span.service,
                block="-" if a.get(names.ROUND_SKIPPED) else str(a.get(names.ROUND_BLOCK, "?")),
                wall_ms=_ms(a.get(names.ROUND_WALL_NS)),
            )
        )
    return rows


REQUEST_KEYS = (
    names.GEN_AI_REQUEST_MODEL,
    names.GEN_AI_USAGE_INPUT_TOKENS,
    names.GEN_AI_USAGE_OUTPUT_TOKENS,
    names.GEN_AI_RESPONSE_FINISH_REASONS,
    names.DRAFTER,
    names.REQUEST_K,
)


def summarize(trace_id: str, spans: Sequence[SpanRecord]) -> tuple[TraceSummary, list[RoundRow]]:
    root = root_of(spans)
    rows = rounds_of(spans)
    summary = TraceSummary(
        trace_id=trace_id,
        root=f"{root.name} ({root.service})",
        duration_ms=root.duration_ms,
        services=sorted({s.service for s in spans if s.service}),
        request={k: root.attributes[k] for k in REQUEST_KEYS if k in root.attributes},
    )
    for row in rows:
        if row.extra == "skipped":
            summary.skipped += 1
            continue
        summary.rounds += 1
        summary.proposed += row.proposed
        summary.accepted += row.accepted
        summary.committed += row.committed
        summary.draft_ms += row.draft_ms
        summary.verify_ms += row.verify_ms
        summary.network_ms += row.network_ms
        summary.queue_ms += row.queue_ms
    for span in spans:
        for event in span.events:
            attributes = event.get("attributes") or {}
            if event.get("name") == names.EVENT_ROLLBACK:
                summary.rolled_back += int(attributes.get("tokens", 0))
            elif event.get("name") == names.EVENT_EVICTION:
                summary.evictions += int(attributes.get("sessions", 0))
            elif event.get("name") == names.EVENT_REPREFILL:
                summary.re_prefills += 1
            elif event.get("name") == names.EVENT_PREFILL:
                summary.prefill_cached += int(attributes.get("cached_tokens", 0))
                summary.prefill_computed += int(attributes.get("computed_tokens", 0))
    return summary, rows


COLUMNS = (
    ("round", 5), ("k", 3), ("proposed", 8), ("accepted", 8), ("extra", 10), ("committed", 9),
    ("length", 6), ("draft ms", 9), ("verify ms", 9), ("network ms", 10), ("queue ms", 9),
    ("block", 12),
)  # fmt: skip


def format_trace(summary: TraceSummary, rows: Sequence[RoundRow]) -> str:
    request = " ".join(
        f"{k.split('.')[-1]}={v if not isinstance(v, list) else ','.join(map(str, v))}"
        for k, v in summary.request.items()
    )
    lines = [
        f"trace {summary.trace_id}  {summary.root}  {summary.duration_ms:.1f} ms"
        + (f"  {request}" if request else "")
    ]
    lines.append("  ".join(f"{name:>{width}}" for name, width in COLUMNS))
    for r in rows:
        cells = (
            r.round, r.k, r.proposed, r.accepted, r.extra, r.committed, r.length,
            f"{r.draft_ms:.2f}", f"{r.verify_ms:.2f}", f"{r.network_ms:.2f}", f"{r.queue_ms:.2f}",
            r.block,
        )  # fmt: skip
        lines.append("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    if not rows:
        lines.append("(no specdec.round spans in this trace)")
    s = summary
    lines.append(
        f"services: {', '.join(s.services)} | {s.rounds} rounds"
        + (f" (+{s.skipped} skipped)" if s.skipped else "")
        + f", {s.proposed} proposed, "
        f"{s.accepted} accepted ({100 * s.acceptance_rate:.1f}%), {s.committed} committed, "
        f"{s.tokens_per_round:.2f} tokens/round | draft {s.draft_ms:.1f} ms, verify "
        f"{s.verify_ms:.1f} ms, network {s.network_ms:.1f} ms, queue {s.queue_ms:.1f} ms | "
        f"prefill {s.prefill_cached} cached + {s.prefill_computed} computed, "
        f"{s.rolled_back} rolled back, {s.evictions} evictions, {s.re_prefills} re-prefills"
    )
    return "\n".join(lines)


def show(
    path: str | os.PathLike[str],
    trace_id: str | None = None,
    last: int = 1,
    as_json: bool = False,
    out: TextIO | None = None,
) -> list[TraceSummary]:
    """Print the selected traces of ``path`` (to ``out``, default stdout); returns their
    summaries."""
    out = out or sys.stdout
    if not os.path.exists(path):
        raise NotFound(f"no trace file {str(path)!r}; set SPECDEC_TRACE_FILE on the services")
    traces = group_traces(read_spans(path))
    if not traces:
        raise NotFound(f"{str(path)!r} holds no spans yet (spans are written in batches)")
    summaries = []
    for i, tid in enumerate(select(traces, trace_id, last)):
        summary, rows = summarize(tid, traces[tid])
        summaries.append(summary)
        if as_json:
            record = asdict(summary) | {
                "acceptance_rate": summary.acceptance_rate,
                "rows": [asdict(r) for r in rows],
            }
            out.write(json.dumps(record) + "\n")
        else:
            out.write(("\n" if i else "") + format_trace(summary, rows) + "\n")
    return summaries
