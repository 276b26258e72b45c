"""OpenTelemetry for specdec: one trace per request across the three services, Prometheus
metrics on each, and a local span file that ``specdec traces`` reads without a backend.

    configure_telemetry(service, metrics_port, trace_file)   once per process, at start
    server_interceptors()                        the gRPC server's tracing interceptor, or []
    round_tracer(session_id, carrier)            run_turn observer: specdec.round / .draft
    request_observer(...)                        gateway: GenAI attributes, request metrics
    record_round(report, drafter)                gateway: round metrics
    verify_observer(store, session_id)           oracle: specdec.prefill / .verify, KV events

Every hook is None (or returns at once) when telemetry is off, so an untraced
request does no span work. See ``setup`` for the environment variables.
"""

from __future__ import annotations

from specdec.telemetry.setup import (
    Telemetry,
    metrics,
    observe,
    server_interceptors,
    shutdown,
    tracer,
    tracing_enabled,
)
from specdec.telemetry.setup import configure as configure_telemetry

__all__ = [
    "Telemetry",
    "configure_telemetry",
    "metrics",
    "observe",
    "server_interceptors",
    "shutdown",
    "tracer",
    "tracing_enabled",
]
