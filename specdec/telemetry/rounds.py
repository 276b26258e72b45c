"""Round spans, made where the rounds run: in the draft (model drafter) or in the gateway
(oracle alone, n-gram). A ``RoundTracer`` is the ``run_turn`` observer of one turn.

Per round it opens ``specdec.round`` as a child of the turn's context (the
gateway's Generate span), hands the oracle link that round's context for the
VerifyRequest (the oracle hangs ``specdec.verify`` under it), and on the verdict
adds ``specdec.draft`` (the proposal, from the measured draft time) and the
round's attributes in one call. Nothing is serialised per round beyond the
W3C ``traceparent`` string.

         Generate (gateway)
         ├── specdec.prefill (oracle)       context of the OpenVerify
         ├── specdec.round 0  (draft | gateway)
         │   ├── specdec.draft  (same service)
         │   └── specdec.verify (oracle)
         └── specdec.round 1 ...
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from specdec.core.types import RoundReport
from specdec.telemetry import names
from specdec.telemetry.metrics import Metrics
from specdec.telemetry.setup import metrics, tracer


def inject(context: otel_context.Context | None = None) -> dict[str, str]:
    """W3C trace context (traceparent, tracestate) of ``context`` (default: the current one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def current_trace_context() -> dict[str, str]:
    """The current context as a message's ``trace_context`` map; {} when tracing is off."""
    return inject() if tracer() is not None else {}


def round_attributes(report: RoundReport) -> dict[str, int | str]:
    return {
        names.ROUND_K: report.k,
        names.ROUND_PROPOSED: report.proposed,
        names.ROUND_ACCEPTED: report.accepted,
        names.ROUND_EXTRA_TOKEN: names.BONUS if report.is_bonus else names.CORRECTION,
        names.ROUND_COMMITTED: report.committed,
        names.ROUND_COMMITTED_LENGTH: report.committed_length,
        names.ROUND_DRAFT_NS: report.draft_ns,
        names.ROUND_VERIFY_NS: report.verify_ns,
        names.ROUND_NETWORK_NS: report.network_ns,
        names.ROUND_QUEUE_NS: report.queue_ns,
        names.ROUND_WALL_NS: report.wall_ns,
        names.ROUND_PIPELINED: report.pipelined,
        names.ROUND_BLOCK: report.block_origin,
    }


class RoundTracer:
    """Spans (and, in the draft, draft-time metrics) of one turn's rounds."""

    def __init__(
        self,
        tracer: Tracer | None,
        session_id: str,
        parent: otel_context.Context,
        metrics: Metrics | None = None,
    ) -> None:
        self._tracer = tracer
        self._session_id = session_id
        self._metrics = metrics
        self._turn_span: Span | None = None
        if tracer is not None and not trace.get_current_span(parent).get_span_context().is_valid:
            # No request to hang the rounds under: one trace per turn, not one per round.
            self._turn_span = tracer.start_span(
                names.TURN_SPAN, context=parent, attributes={names.SESSION_ID: session_id}
            )
            parent = trace.set_span_in_context(self._turn_span, parent)
        self._parent = parent
        self._turn_carrier = inject(parent) if tracer is not None else {}
        # Open rounds by index: with pipelining a round starts before the last one ends.
        self._rounds: dict[int, tuple[Span, dict[str, str], int]] = {}

    def trace_context(self, round_index: int | None = None) -> dict[str, str]:
        """For the oracle link: the context of an open round, else the turn's (OpenVerify)."""
        open_round = self._rounds.get(round_index) if round_index is not None else None
        return open_round[1] if open_round is not None else self._turn_carrier

    def round_started(self, round_index: int, k: int, draft_ns: int) -> None:
        if self._tracer is None:
            return
        # The round began when its drafting did (the loop waited draft_ns for it).
        start_ns = time.time_ns() - draft_ns
        span = self._tracer.start_span(
            names.ROUND_SPAN,
            context=self._parent,
            start_time=start_ns,
            attributes={
                names.SESSION_ID: self._session_id,
                names.ROUND_INDEX: round_index,
                names.ROUND_K: k,
            },
        )
        self._rounds[round_index] = (span, inject(trace.set_span_in_context(span)), start_ns)

    def round_finished(self, report: RoundReport) -> None:
        if self._metrics is not None and report.k > 0:
            self._metrics.draft_propose.record(report.draft_ns / 1e9)
        open_round = self._rounds.pop(report.round, None)
        if open_round is None or self._tracer is None:
            return
        span, _, start_ns = open_round
        if report.k > 0:  # the drafter ran (k = 0: oracle alone, nothing drafted)
            draft = self._tracer.start_span(
                names.DRAFT_SPAN,
                context=trace.set_span_in_context(span),
                start_time=start_ns,
                attributes={names.ROUND_K: report.k, names.ROUND_PROPOSED: report.proposed},
            )
            draft.end(end_time=start_ns + report.draft_ns)
        span.set_attributes(round_attributes(report))
        span.end()

    def round_skipped(self, round_index: int) -> None:
        """A pipelined block proved stale, or the turn ended before its verdict."""
        open_round = self._rounds.pop(round_index, None)
        if open_round is not None:
            open_round[0].set_attribute(names.ROUND_SKIPPED, True)
            open_round[0].end()

    def close(self, error: BaseException | None = None) -> None:
        """End what is still open: a round cut short by ``error``, the fallback turn span."""
        spans = [span for span, _, _ in self._rounds.values()]
        self._rounds.clear()
        for span in (*spans, self._turn_span):
            if span is None:
                continue
            if isinstance(error, Exception):
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            elif error is not None:  # cancelled: the gateway ended the turn, not a failure
                span.set_attribute("specdec.cancelled", True)
            span.end()
        self._turn_span = None


def round_tracer(
    session_id: str, carrier: Mapping[str, str] | None = None, *, draft_metrics: bool = False
) -> RoundTracer | None:
    """The observer of one turn's rounds, or None when there is nothing to record.

    carrier: the trace context the turn belongs to (``Assignment.trace_context``); it
    also becomes the calling task's current context, so that the Verify RPC's own
    spans nest under the request. None: the current context (the gateway's Generate).
    draft_metrics: also record the draft service's draft-time histogram.
    """
    active = tracer()
    recorder = metrics() if draft_metrics else None
    if active is None and recorder is None:
        return None
    parent = otel_context.get_current()
    if active is not None and carrier:
        parent = propagate.extract(dict(carrier))
        otel_context.attach(parent)  # task-local: the turn runs in its own task
    return RoundTracer(active, session_id, parent, recorder)
