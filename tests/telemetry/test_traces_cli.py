"""The span file (``SPECDEC_TRACE_FILE``) and ``specdec traces``, without services.

Spans are made by the real SDK through specdec's own hooks (``RoundTracer``,
``VerifyObserver``) with a local tracer provider, written by the real JSON-lines
exporter, and read back by the command. The end-to-end version, on a file
written by running services, is in test_telemetry.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from specdec.cli import main
from specdec.core.errors import InvalidArgument, NotFound
from specdec.core.types import OpenResult, RoundReport, Verdict, VerifyResult
from specdec.telemetry import names
from specdec.telemetry.jsonl import JsonLinesSpanExporter, read_spans
from specdec.telemetry.oracle import VerifyObserver
from specdec.telemetry.report import RoundRow, group_traces, select, show
from specdec.telemetry.rounds import RoundTracer
from specdec.telemetry.tail import tail_of

ROOT = Path(__file__).resolve().parents[2]

# (k, proposed, accepted, committed): a correction, a bonus, a full rejection, a k=0 round.
ROUNDS = [(4, 4, 2, 3), (4, 4, 4, 5), (3, 3, 0, 1), (0, 0, 0, 1)]
# How each round's block was drafted: (drafted ahead, pipelined, for a guessed correction).
ORIGINS = [(False, False, False), (True, True, False), (True, False, True), (False, False, False)]
# Each round's wall time since the previous verdict (round 0: since the open), ns.
WALLS = [8_000_000, 10_000_000, 9_000_000, 4_000_000]


class FakeCounters:
    evictions = 0
    prefill_computed = 0
    prefill_reused = 0


class Store:
    """The store's read-only view the observer needs (no model here: nothing is cached)."""

    counters = FakeCounters()
    active_streams = cached_sessions = kv_cache_bytes = budget_bytes = 0


def provider_for(service: str, path: Path) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    return provider


def write_request(path: Path, session: str = "s1", length: int = 10) -> str:
    """One request as three services would trace it; returns its trace id."""
    gateway, draft, oracle = (
        provider_for(f"specdec-{name}", path) for name in ("gateway", "draft", "oracle")
    )
    root = gateway.get_tracer("t").start_span("/specdec.v1.Gateway/Generate")
    root.set_attribute(names.GEN_AI_USAGE_OUTPUT_TOKENS, sum(r[3] for r in ROUNDS))
    rounds = RoundTracer(draft.get_tracer("t"), session, trace.set_span_in_context(root))
    verifier = VerifyObserver(oracle.get_tracer("t"), None, Store(), session)
    verifier.opened(rounds.trace_context(), OpenResult(2, length - 3, 1000), reprefill=False)
    for i, (k, proposed, accepted, committed) in enumerate(ROUNDS):
        rounds.round_started(i, k, 1_500_000 * (k > 0))
        arrived_ns = time.time_ns()
        verdict = Verdict(num_accepted=accepted, next_token=7, is_bonus=accepted == proposed)
        length += committed
        result = VerifyResult(verdict, length, verify_ns=2_000_000, queue_ns=100_000)
        verifier.verified(rounds.trace_context(i), arrived_ns, i, proposed, result)
        rounds.round_finished(
            RoundReport(
                round=i, k=k, proposed=proposed, accepted=accepted,
                is_bonus=accepted == proposed, committed=committed, committed_length=length,
                draft_ns=1_500_000 * (k > 0), verify_ns=2_000_000, network_ns=500_000,
                queue_ns=100_000, drafted_ahead=ORIGINS[i][0], pipelined=ORIGINS[i][1],
                branch=ORIGINS[i][2], wall_ns=WALLS[i],
            )
        )  # fmt: skip
    rounds.close()
    root.end()
    for provider in (gateway, draft, oracle):
        provider.shutdown()
    return f"{root.get_span_context().trace_id:032x}"


def test_the_table_adds_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spans.jsonl"
    trace_id = write_request(path)
    main(["traces", str(path), "--trace-id", trace_id[:8]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"trace {trace_id}  /specdec.v1.Gateway/Generate (specdec-gateway)")
    assert "output_tokens=10" in lines[0]
    rows = [line.split() for line in lines[2:-1]]
    assert [r[:7] for r in rows] == [
        ["0", "4", "4", "2", "correction", "3", "13"],
        ["1", "4", "4", "4", "bonus", "5", "18"],
        ["2", "3", "3", "0", "correction", "1", "19"],
        ["3", "0", "0", "0", "bonus", "1", "20"],
    ]
    assert rows[0][7:] == ["1.50", "2.00", "0.50", "0.10", "fresh"]
    assert [r[-1] for r in rows] == ["fresh", "piped", "branch", "alone"]  # k = 0: nothing drafted
    assert lines[-1] == (
        "services: specdec-draft, specdec-gateway, specdec-oracle | 4 rounds, 11 proposed, "
        "6 accepted (54.5%), 10 committed, 2.50 tokens/round | draft 4.5 ms, verify 8.0 ms, "
        "network 2.0 ms, queue 0.4 ms | prefill 2 cached + 7 computed, 5 rolled back, "
        "0 evictions, 0 re-prefills"
    )


def test_the_tail_is_the_rounds_of_the_slowest_gaps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two requests of the same rounds. After each request's first round the gaps are
    # 10/5 = 2 ms (x5 tokens), 9/1 = 9 ms and 4/1 = 4 ms: sorted 2,2,2,2,2,4,9 per request.
    path = tmp_path / "spans.jsonl"
    write_request(path, "s1")
    write_request(path, "s2")
    main(["traces", str(path), "--tail", "80", "--json"])
    tail = json.loads(capsys.readouterr().out)
    assert (tail["requests"], tail["tokens"], tail["gap_ms"]) == (2, 14, 4.0)
    assert tail["all"]["rounds"] == 6 and tail["all"]["blocks"] == {
        "piped": 2, "branch": 2, "alone": 2
    }  # fmt: skip
    worst = tail["tail"]  # the 9 ms and 4 ms rounds of both requests
    assert worst["rounds"] == 4 and worst["tokens_per_round"] == 1.0
    assert worst["wall_ms"] == pytest.approx(6.5)
    assert worst["blocks"] == {"branch": 2, "alone": 2}
    # draft 1.5 ms in the k=3 round, 0 in the k=0 one; network, queue, verify as written.
    assert worst["draft_ms"] == pytest.approx(0.75)
    parts = worst["draft_ms"] + worst["network_ms"] + worst["queue_ms"] + worst["verify_ms"]
    assert worst["other_ms"] == pytest.approx(6.5 - parts)
    main(["traces", str(path), "--tail"])  # p99: the 9 ms rounds alone
    lines = capsys.readouterr().out.strip().splitlines()
    assert "p99 = 9.0 ms" in lines[0] and lines[-1].split()[:3] == [">=", "p99", "2"]


def test_a_tail_it_cannot_read_is_a_clear_error() -> None:
    row = RoundRow(1, 4, 4, 2, "correction", 3, 13, 1.0, 2.0, 0.5, 0.1, "specdec-draft")
    with pytest.raises(InvalidArgument, match="older specdec"):
        tail_of([[row]], 99)  # no wall time recorded
    with pytest.raises(InvalidArgument, match="percentile"):
        tail_of([[row]], 100)
    with pytest.raises(NotFound, match="no verified rounds"):
        tail_of([[replace(row, round=0, wall_ms=5.0)]], 99)  # a first round only


def test_span_tree_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    write_request(path)
    spans = {s.span_id: s for s in read_spans(path)}
    by_name: dict[str, list[Any]] = {}
    for span in spans.values():
        by_name.setdefault(span.name, []).append(span)
    (root,) = by_name["/specdec.v1.Gateway/Generate"]
    assert all(r.parent_span_id == root.span_id for r in by_name[names.ROUND_SPAN])
    assert len(by_name[names.DRAFT_SPAN]) == 3  # the k=0 round drafted nothing
    for span in by_name[names.DRAFT_SPAN] + by_name[names.VERIFY_SPAN]:
        assert spans[span.parent_span_id].name == names.ROUND_SPAN
    (prefill,) = by_name[names.PREFILL_SPAN]
    assert prefill.parent_span_id == root.span_id and prefill.service == "specdec-oracle"
    rollbacks = [
        e["attributes"]["tokens"]
        for s in by_name[names.VERIFY_SPAN]
        for e in s.events
        if e["name"] == names.EVENT_ROLLBACK
    ]
    assert sorted(rollbacks) == [2, 3]


def test_last_and_trace_id_select_requests(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    first, second, third = (write_request(path, session=f"s{i}") for i in range(3))
    traces = group_traces(read_spans(path))
    assert select(traces, last=2) == [second, third]
    assert select(traces, last=10) == [first, second, third]
    assert select(traces, trace_id=second[:6].upper()) == [second]
    with pytest.raises(NotFound, match="no trace"):
        select(traces, trace_id="ffffffffffff")
    with pytest.raises(InvalidArgument, match="--last"):
        select(traces, last=0)


def test_json_output(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    trace_id = write_request(path)
    out = tmp_path / "out.txt"
    with out.open("w") as handle:
        show(path, as_json=True, out=handle)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["trace_id"] == trace_id
    assert (record["rounds"], record["proposed"], record["accepted"]) == (4, 11, 6)
    assert record["acceptance_rate"] == pytest.approx(6 / 11)
    assert len(record["rows"]) == 4


def test_missing_or_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no trace file"):
        main(["traces", str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match="no spans"):
        main(["traces", str(tmp_path / "empty.jsonl")])


WRITER = textwrap.dedent(
    """
    import sys
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from specdec.telemetry.jsonl import JsonLinesSpanExporter

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(sys.argv[1])))
    tracer = provider.get_tracer("w")
    for i in range(300):
        with tracer.start_as_current_span("w" + sys.argv[2]) as span:
            span.set_attribute("padding", sys.argv[2] * 5000)  # lines longer than PIPE_BUF
    provider.shutdown()
    """
)


def test_processes_share_one_file_without_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], cwd=ROOT)
        for tag in ("a", "b", "c")
    ]
    assert [w.wait(60) for w in writers] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 900
    spans = [json.loads(line) for line in lines]  # every line is whole
    for tag in "abc":
        assert sum(s["name"] == "w" + tag for s in spans) == 300
        assert all(
            s["attributes"]["padding"] == tag * 5000 for s in spans if s["name"] == "w" + tag
        )
