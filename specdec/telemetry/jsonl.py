"""Finished spans as JSON lines in a local file (``SPECDEC_TRACE_FILE``), and reading them back.

One line per span, written by the batch span processor's thread (never on the
request path). Several services may share one file: each batch is appended
with a single ``write`` on an ``O_APPEND`` descriptor under an exclusive
``flock``, so lines of different processes never interleave.

A line: {"trace_id", "span_id", "parent_span_id" (null for a root), "name",
"kind", "service", "start_ns", "end_ns", "status", "attributes", "events":
[{"name", "time_ns", "attributes"}]}; ids are lowercase hex, as in W3C traceparent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def _value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: _value(value) for key, value in (attributes or {}).items()}


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    assert context is not None
    parent = span.parent
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": str(span.resource.attributes.get("service.name", "")),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": _attributes(span.attributes),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": _attributes(e.attributes)}
            for e in span.events
        ],
    }


class JsonLinesSpanExporter(SpanExporter):  # type: ignore[misc]
    """Appends each exported span to ``path`` as one JSON line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_to_dict(s), separators=(",", ":")) + "\n" for s in spans)
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                payload = data.encode()
                while payload:
                    written = os.write(self._fd, payload)
                    payload = payload[written:]
            except OSError:
                return SpanExportResult.FAILURE
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@dataclass
class SpanRecord:
    """A span read back from a trace file."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    kind: str = ""
    status: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def read_spans(path: str | os.PathLike[str]) -> Iterator[SpanRecord]:
    """Every well-formed span line of ``path`` (a line cut short by a crash is skipped)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                raw = json.loads(line)
                yield SpanRecord(
                    trace_id=str(raw["trace_id"]),
                    span_id=str(raw["span_id"]),
                    parent_span_id=raw.get("parent_span_id"),
                    name=str(raw["name"]),
                    service=str(raw.get("service", "")),
                    start_ns=int(raw["start_ns"]),
                    end_ns=int(raw["end_ns"]),
                    kind=str(raw.get("kind", "")),
                    status=str(raw.get("status", "")),
                    attributes=dict(raw.get("attributes") or {}),
                    events=list(raw.get("events") or []),
                )
            except (ValueError, KeyError, TypeError):
                continue
