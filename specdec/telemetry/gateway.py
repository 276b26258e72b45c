"""The gateway's view of a request: GenAI attributes on its Generate span, request metrics.

``request_observer`` is created for each Generate turn (None when tracing and
metrics are both off); it annotates the request's server span (the gRPC call's, or
the HTTP request's), which is the root of the request's trace, and times the stream
of chunks (first token, inter-token gaps). ``record_round`` counts one verified
round, wherever it ran.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Span

from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason
from specdec.core.types import DrafterKind, RoundReport, TurnStats
from specdec.telemetry import names
from specdec.telemetry.metrics import Metrics
from specdec.telemetry.setup import metrics, tracer

_LABELS: dict[DrafterKind, dict[str, str]] = {}
_POSITION_LABELS: dict[tuple[DrafterKind, int], dict[str, str]] = {}
_BLOCK_LABELS: dict[tuple[DrafterKind, str], dict[str, str]] = {}


def _labels(drafter: DrafterKind) -> dict[str, str]:
    labels = _LABELS.get(drafter)
    if labels is None:
        labels = _LABELS[drafter] = {"drafter": drafter.value}
    return labels


def _block_labels(drafter: DrafterKind, origin: str) -> dict[str, str]:
    labels = _BLOCK_LABELS.get((drafter, origin))
    if labels is None:
        labels = _BLOCK_LABELS[drafter, origin] = {**_labels(drafter), "block": origin}
    return labels


def _position_labels(drafter: DrafterKind, i: int) -> dict[str, str]:
    labels = _POSITION_LABELS.get((drafter, i))
    if labels is None:
        labels = _POSITION_LABELS[drafter, i] = {**_labels(drafter), "position": str(i)}
    return labels


def record_round(report: RoundReport, drafter: DrafterKind) -> None:
    """Count one verified round (the gateway sees every round of every request)."""
    recorder = metrics()
    if recorder is None:
        return
    labels = _labels(drafter)
    recorder.rounds.add(1, _block_labels(drafter, report.block_origin))
    if report.proposed:
        recorder.draft_tokens.add(report.proposed, labels)
        recorder.accepted_tokens.add(report.accepted, labels)
        recorder.accepted_length.record(report.accepted, labels)
        # Position i was drafted in this round; accepted iff i < accepted (prefix acceptance).
        for i in range(report.proposed):
            position = _position_labels(drafter, i)
            recorder.drafted_per_position.add(1, position)
            if i < report.accepted:
                recorder.accepted_per_position.add(1, position)
        recorder.round_draft.record(report.draft_ns / 1e9, labels)
    recorder.round_verify.record(report.verify_ns / 1e9, labels)
    recorder.round_network.record(report.network_ns / 1e9, labels)
    recorder.round_queue.record(report.queue_ns / 1e9, labels)
    round_trip = report.verify_ns + report.network_ns + report.queue_ns
    recorder.round_trip.record(round_trip / 1e9, labels)


class TurnSummaryLike(Protocol):
    stats: TurnStats
    oracle_id: str
    draft_id: str
    drafter: DrafterKind
    failovers: int
    model: str


class ChunkLike(Protocol):
    @property
    def token_ids(self) -> list[int]: ...

    @property
    def finish_reason(self) -> FinishReason | None: ...

    @property
    def summary(self) -> Any: ...  # TurnSummaryLike | None


class RequestObserver:
    """One Generate call, from the handler's point of view."""

    def __init__(self, span: Span | None, recorder: Metrics | None, prompt_tokens: int) -> None:
        self._span = span
        self._metrics = recorder
        self._last_ns = self._start_ns = time.perf_counter_ns()
        self._first = True
        if recorder is not None:
            recorder.active.add(1)
            recorder.prompt_tokens.add(prompt_tokens)

    def chunk(self, chunk: ChunkLike) -> None:
        """A chunk is about to be streamed to the client."""
        n = len(chunk.token_ids)
        if self._metrics is not None and n:
            now = time.perf_counter_ns()
            self._metrics.output_tokens.add(n)
            if not self._first:
                # Tokens of a round arrive together: each gets the round's gap / n.
                self._metrics.itl.record((now - self._last_ns) / n / 1e9)
            self._first = False
            self._last_ns = now
        if chunk.summary is not None and chunk.finish_reason is not None:
            self._finished(chunk.summary, chunk.finish_reason)

    def _finished(self, summary: TurnSummaryLike, finish: FinishReason) -> None:
        s = summary.stats
        drafter = summary.drafter.value
        if self._metrics is not None:
            m = self._metrics
            m.requests.add(1, {"finish_reason": finish.value, "drafter": drafter})
            if s.time_to_first_token_ns:
                m.ttft.record(s.time_to_first_token_ns / 1e9)
            m.request_duration.record((time.perf_counter_ns() - self._start_ns) / 1e9)
            if summary.failovers:
                m.failovers.add(summary.failovers)
        if self._span is None:
            return
        model = getattr(summary, "model", "")
        self._span.set_attributes(
            {
                names.GEN_AI_REQUEST_MODEL: model,
                names.GEN_AI_RESPONSE_MODEL: model,
                names.GEN_AI_USAGE_INPUT_TOKENS: s.prompt_tokens,
                names.GEN_AI_USAGE_OUTPUT_TOKENS: s.output_tokens,
                names.GEN_AI_RESPONSE_FINISH_REASONS: [finish.value],
                names.DRAFTER: drafter,
                names.ORACLE_ID: summary.oracle_id,
                names.DRAFT_ID: summary.draft_id,
                names.ROUNDS: s.rounds,
                names.PROPOSED_TOKENS: s.proposed,
                names.ACCEPTED_TOKENS: s.accepted,
                names.ACCEPTANCE_RATE: s.acceptance_rate,
                names.MEAN_ACCEPTED_LENGTH: s.accepted / s.rounds if s.rounds else 0.0,
                names.MEAN_TOKENS_PER_ROUND: s.mean_tokens_per_round,
                names.CACHED_TOKENS: s.cached_tokens,
                names.COMPUTED_TOKENS: s.prefilled_tokens,
                names.TIME_TO_FIRST_TOKEN_NS: s.time_to_first_token_ns,
                names.FAILOVERS: summary.failovers,
            }
        )

    def close(self) -> None:
        """The call ended (finished, failed or cancelled)."""
        if self._metrics is not None:
            self._metrics.active.add(-1)
            self._metrics = None


def request_observer(
    session_id: str,
    prompt_tokens: int,
    params: SamplingParams,
    k: int,
    persistent: bool,
    *,
    chat: bool = False,
) -> RequestObserver | None:
    """Observer of the Generate call running now; None when tracing and metrics are off.

    persistent: the session outlives the call (its id is the GenAI conversation id).
    chat: the prompt is a conversation (GenAI operation "chat", else "text_completion").
    """
    active, recorder = tracer(), metrics()
    if active is None and recorder is None:
        return None
    span: Span | None = None
    if active is not None:
        span = trace.get_current_span()  # the RPC's or HTTP request's span: the trace's root
        attributes: dict[str, Any] = {
            names.GEN_AI_OPERATION_NAME: (
                names.OPERATION_CHAT if chat else names.OPERATION_TEXT_COMPLETION
            ),
            names.GEN_AI_PROVIDER_NAME: names.PROVIDER,
            names.GEN_AI_REQUEST_MAX_TOKENS: params.max_new_tokens,
            names.GEN_AI_REQUEST_TEMPERATURE: params.temperature,
            names.GEN_AI_REQUEST_TOP_P: params.top_p,
            names.GEN_AI_REQUEST_TOP_K: params.top_k,
            names.SESSION_ID: session_id,
            names.REQUEST_K: k,
        }
        if params.seed is not None:
            attributes[names.GEN_AI_REQUEST_SEED] = params.seed
        if params.stop:
            attributes[names.GEN_AI_REQUEST_STOP_SEQUENCES] = list(params.stop)
        if persistent:
            attributes[names.GEN_AI_CONVERSATION_ID] = session_id
        span.set_attributes(attributes)
    return RequestObserver(span, recorder, prompt_tokens)
