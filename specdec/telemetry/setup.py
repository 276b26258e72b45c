"""Turn telemetry on for one service process, from the standard ``OTEL_*`` variables.

Tracing is on when an exporter is configured or a trace file is given, and off otherwise:

    OTEL_TRACES_EXPORTER      otlp | console | none | <installed exporter>, comma separated;
                              unset: otlp if an OTLP endpoint is set, else nothing
    OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT   e.g. http://jaeger:4317
    OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL   grpc (default) or http/protobuf
    OTEL_SDK_DISABLED=true    everything off

and the service's ``--trace-file`` (``SPECDEC_TRACE_FILE``, read by ``specdec.config``
like every SPECDEC_* setting) also appends finished spans as JSON lines
(``specdec traces``).

The SDK reads the rest itself: OTEL_SERVICE_NAME (default specdec-<service>),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG], OTEL_BSP_*, the exporter's
headers, timeout and certificates, OTEL_PROPAGATORS. Metrics are independent:
a Prometheus endpoint on ``metrics_port`` (0 = none).

When tracing is off nothing is installed: no provider, no gRPC interceptor, and
``tracer()`` is None, so the services' per-round hooks are None and a request
does no span work at all. Everything here runs once per process; later calls
(in-process tests start several servers) reuse what the first one set up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from specdec.core.errors import InvalidArgument
from specdec.telemetry.names import SERVICE_NAMES

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from specdec.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "specdec"
# RPCs kept out of tracing: probes, reflection, and the workers' lifelong Connect streams
# (one span per worker lifetime would say nothing and never end).
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.", "specdec.v1.WorkerRegistry")


@dataclass
class _State:
    service: str = ""
    tracer: Tracer | None = None
    provider: TracerProvider | None = None
    instrumentor: Any = None
    metrics: Metrics | None = None
    meter_provider: Any = None
    http_server: Any = None
    metrics_port: int = 0
    configured: bool = False
    shutdown_hooks: list[Any] = field(default_factory=list)


_state = _State()


def tracer() -> Tracer | None:
    """The process's tracer, or None when tracing is off (the one check on the hot path)."""
    return _state.tracer


def tracing_enabled() -> bool:
    return _state.tracer is not None


def metrics() -> Metrics | None:
    """The process's instruments, or None when no metrics endpoint was asked for."""
    return _state.metrics


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def exporter_names() -> list[str]:
    """The span exporters the environment asks for ("" entries and "none" dropped)."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return []
    raw = os.environ.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
        raw = "otlp" if endpoint else ""
    names = [n.strip().lower() for n in raw.split(",")]
    return [n for n in names if n and n != "none"]


def _otlp_exporter() -> SpanExporter:
    protocol = (
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )
        except ImportError:
            raise InvalidArgument(
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs the package "
                "opentelemetry-exporter-otlp-proto-http; install it or use grpc"
            ) from None
        return HttpSpanExporter()
    raise InvalidArgument(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use grpc or http/protobuf"
    )


def _exporter(name: str) -> SpanExporter:
    if name == "otlp":
        return _otlp_exporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        raise InvalidArgument(
            f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed; use otlp, console "
            "or none"
        )
    return found[0].load()()  # type: ignore[no-any-return]


def _resource(service: str) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes: dict[str, Any] = {}
    named = _env("OTEL_SERVICE_NAME") or "service.name=" in _env("OTEL_RESOURCE_ATTRIBUTES")
    if not named:
        attributes[SERVICE_NAME] = SERVICE_NAMES.get(service, f"specdec-{service}")
    return Resource.create(attributes)


def _rpc_filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_prefix(s) for s in UNTRACED_SERVICES)))


def _configure_tracing(service: str, trace_file: str) -> None:
    names = exporter_names()
    trace_file = trace_file.strip()
    if not names and not trace_file:
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from specdec.telemetry.jsonl import JsonLinesSpanExporter

    exporters = [_exporter(name) for name in names]
    if trace_file:
        exporters.append(JsonLinesSpanExporter(trace_file))
    provider = TracerProvider(resource=_resource(service))  # sampler: OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    trace.set_tracer_provider(provider)
    # Every grpc.aio channel opened from now on gets the client interceptors.
    instrumentor = GrpcAioInstrumentorClient(filter_=_rpc_filter())
    instrumentor.instrument(tracer_provider=provider)
    _state.provider = provider
    _state.instrumentor = instrumentor
    _state.tracer = provider.get_tracer(INSTRUMENTATION_NAME)
    log.info(
        "tracing on: exporters %s%s",
        ", ".join(names) or "-",
        f", file {trace_file}" if trace_file else "",
    )


def _configure_metrics(service: str, port: int) -> None:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    from specdec.telemetry.metrics import Metrics

    try:
        server, _ = start_http_server(port, addr="0.0.0.0")
    except OSError as exc:
        raise InvalidArgument(
            f"cannot serve metrics on port {port} ({exc}); choose another --metrics-port"
        ) from exc
    reader = PrometheusMetricReader(scope_info_enabled=False)
    provider = MeterProvider(resource=_resource(service), metric_readers=[reader])
    otel_metrics.set_meter_provider(provider)
    _state.meter_provider = provider
    _state.http_server = server
    _state.metrics_port = port
    _state.metrics = Metrics(provider.get_meter(INSTRUMENTATION_NAME))
    log.info("Prometheus metrics on :%d/metrics", port)


@dataclass
class Telemetry:
    """What ``configure`` set up; ``shutdown`` flushes the spans and stops the endpoint."""

    tracing: bool
    metrics_port: int

    async def shutdown(self) -> None:
        await asyncio.to_thread(shutdown)


def configure(service: str, metrics_port: int = 0, trace_file: str = "") -> Telemetry:
    """Set up tracing (from the environment, and ``trace_file`` when not empty) and
    metrics (``metrics_port`` > 0) once.

    service: "gateway", "oracle" or "draft" (names the default OTEL_SERVICE_NAME).
    Raises ``InvalidArgument`` for an exporter or protocol that cannot be used.
    """
    if not _state.configured:
        _state.configured = True
        _state.service = service
        _configure_tracing(service, trace_file)
    if metrics_port and _state.metrics is None:
        _configure_metrics(service, metrics_port)
    return Telemetry(tracing=_state.tracer is not None, metrics_port=_state.metrics_port)


def server_interceptors() -> list[Any]:
    """The OpenTelemetry server interceptor when tracing is on (health etc. excluded), else []."""
    if _state.provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_state.provider, filter_=_rpc_filter())]


def shutdown() -> None:
    """Flush and stop the exporters, stop the metrics endpoint (blocking; idempotent)."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    if provider is not None:
        if _state.instrumentor is not None:
            _state.instrumentor.uninstrument()
            _state.instrumentor = None
        provider.shutdown()
    server, _state.http_server = _state.http_server, None
    if server is not None:
        server.shutdown()
        server.server_close()
    meter_provider, _state.meter_provider, _state.metrics = _state.meter_provider, None, None
    if meter_provider is not None:
        meter_provider.shutdown()


def observe(**values: Callable[[], float]) -> None:
    """Report these values at every scrape (``metrics.OBSERVED`` names); no-op without metrics."""
    if _state.metrics is not None:
        _state.metrics.observe(**values)
