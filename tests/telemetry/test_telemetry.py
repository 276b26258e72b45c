"""Tracing and metrics of the three services, as real processes, into a real OTLP receiver.

The module starts one gateway, one oracle and one draft exporting spans over
OTLP/gRPC to a receiver served by this test (``TraceServiceServicer`` of
opentelemetry-proto) and to a shared ``SPECDEC_TRACE_FILE``, each with a
Prometheus endpoint. Requests carry a W3C ``traceparent`` of the test's own,
so the test knows each request's trace id; the gateway's Generate span is then
the root of the trace within the system (its parent is the test's span).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.common.v1 import common_pb2 as otlp_common_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from specdec.client import Completion, build_request
from specdec.launch import Cluster, cluster, free_port
from specdec.telemetry import names
from specdec.telemetry.jsonl import read_spans
from specdec.v1 import gateway_pb2_grpc

GATEWAY, ORACLE, DRAFT = "specdec-gateway", "specdec-oracle", "specdec-draft"
GENERATE = "/specdec.v1.Gateway/Generate"
HTTP_ROOT = "POST /v1/completions"
PROMPT = [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 40]
SPAN_WAIT_S = 30.0


# -- a real OTLP receiver ----------------------------------------------------------


def _value(value: otlp_common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """Keeps every span exported to it."""

    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = _attributes(resource_spans.resource.attributes).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(
                        Span(
                            service=service,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            attributes=_attributes(s.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in s.events],
                        )
                    )
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def all(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


@dataclass
class System:
    cluster: Cluster
    receiver: Receiver
    trace_file: Path
    metrics_ports: dict[str, int]
    http_port: int  # the gateway's OpenAI-compatible API


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[System]:
    receiver = Receiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    workdir = tmp_path_factory.mktemp("telemetry")
    trace_file = workdir / "spans.jsonl"
    env = {
        # No OTEL_TRACES_EXPORTER: an endpoint alone turns OTLP on (as in docker-compose.yml).
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",
        "SPECDEC_TRACE_FILE": str(trace_file),
    }
    ports = {service: free_port() for service in (GATEWAY, ORACLE, DRAFT)}
    oracle_path = model_dir("llama", "oracle")
    try:
        with cluster(workdir, env) as c:
            http_port = free_port()
            c.start_gateway(
                "--tokenizer", str(oracle_path), "--metrics-port", str(ports[GATEWAY]),
                "--http-port", str(http_port),
            )  # fmt: skip
            c.start_oracle(oracle_path, "--metrics-port", str(ports[ORACLE]), oracle_id="o1")
            c.start_draft(
                model_dir("llama", "close_draft"),
                "--metrics-port",
                str(ports[DRAFT]),
                draft_id="d1",
            )
            c.wait_workers(oracles=1, drafts=1)
            yield System(c, receiver, trace_file, ports, http_port)
    finally:
        server.stop(None)


def generate(system: System, **kwargs: Any) -> tuple[str, str, Completion]:
    """One request under a parent span of the test's: (trace id, that parent's id, result)."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    request = build_request(PROMPT, ignore_eos=True, **kwargs)
    completion = Completion()
    with grpc.insecure_channel(system.cluster.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
        for response in stub.Generate(request, timeout=60, metadata=metadata):
            completion.add(response)
    return trace_id, parent_id, completion


def wait_for_trace(system: System, trace_id: str, rounds: int, root: str = GENERATE) -> list[Span]:
    """The trace once its root and all its round and verify spans have arrived."""
    deadline = time.monotonic() + SPAN_WAIT_S
    while True:
        spans = system.receiver.trace(trace_id)
        names_seen = [s.name for s in spans]
        ids = {s.span_id for s in spans}
        orphans = [(s.service, s.name, s.kind) for s in spans if s.parent_id not in ids]
        if (
            root in names_seen
            and names_seen.count(names.ROUND_SPAN) >= rounds
            and names_seen.count(names.VERIFY_SPAN) >= rounds
            and len(orphans) == 1  # the root alone: every span's parent has arrived
        ):
            time.sleep(0.3)  # stragglers of the same batch window
            return system.receiver.trace(trace_id)
        if time.monotonic() > deadline:
            logs = "\n".join(s.log()[-1500:] for s in system.cluster.services)
            raise AssertionError(f"trace incomplete: {sorted(names_seen)} {orphans}\n{logs}")
        time.sleep(0.1)


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def check_tree(
    spans: list[Span], parent_id: str, completion: Any, root_name: str = GENERATE
) -> dict[str, Any]:
    """What every request's trace must satisfy; returns its parts for path-specific checks."""
    stats = completion.stats
    ids = {s.span_id: s for s in spans}
    (root,) = by_name(spans, root_name)
    assert root.service == GATEWAY and root.parent_id == parent_id
    # Connected: every other span's parent is in the trace; the Generate span is its root.
    assert [s.name for s in spans if s.parent_id not in ids] == [root_name]

    all_rounds = sorted(
        by_name(spans, names.ROUND_SPAN), key=lambda s: s.attributes[names.ROUND_INDEX]
    )
    assert [r.attributes[names.ROUND_INDEX] for r in all_rounds] == list(range(len(all_rounds)))
    assert all(r.parent_id == root.span_id for r in all_rounds)
    # Pipelined blocks that proved stale (or were still in flight at the end) are marked
    # skipped; every other round was verified and is in the stats.
    rounds = [r for r in all_rounds if not r.attributes.get(names.ROUND_SKIPPED)]
    skipped = {r.span_id for r in all_rounds} - {r.span_id for r in rounds}
    assert len(rounds) == stats.rounds and len(skipped) >= stats.skipped_blocks
    attrs = [r.attributes for r in rounds]
    assert sum(a[names.ROUND_PROPOSED] for a in attrs) == stats.proposed_tokens
    assert sum(a[names.ROUND_ACCEPTED] for a in attrs) == stats.accepted_tokens
    assert sum(a[names.ROUND_COMMITTED] for a in attrs) == stats.output_tokens
    assert attrs[-1][names.ROUND_COMMITTED_LENGTH] == len(PROMPT) + stats.output_tokens
    origins = [a[names.ROUND_BLOCK] for a in attrs]
    assert sum(o.startswith("branch") for o in origins) == stats.branch_rounds
    assert sum(o.endswith("piped") for o in origins) == stats.pipelined_rounds
    for a in attrs:
        assert a[names.ROUND_EXTRA_TOKEN] == (
            names.BONUS if a[names.ROUND_ACCEPTED] == a[names.ROUND_PROPOSED] else names.CORRECTION
        )
        assert a[names.SESSION_ID]
        for key in (names.ROUND_DRAFT_NS, names.ROUND_VERIFY_NS, names.ROUND_NETWORK_NS):
            assert a[key] >= 0
        assert a[names.ROUND_VERIFY_NS] > 0

    # One verify span per round, in the oracle, child of that round.
    verifies = [v for v in by_name(spans, names.VERIFY_SPAN) if v.parent_id not in skipped]
    assert len(verifies) == stats.rounds
    round_by_id = {r.span_id: r for r in rounds}
    rolled_back = 0
    for v in verifies:
        assert v.service == ORACLE
        assert v.parent_id in round_by_id, "a verify span's parent must be a round span"
        parent = round_by_id[v.parent_id].attributes
        assert v.attributes[names.ROUND_INDEX] == parent[names.ROUND_INDEX]
        assert v.attributes[names.ROUND_ACCEPTED] == parent[names.ROUND_ACCEPTED]
        rejected = parent[names.ROUND_PROPOSED] - parent[names.ROUND_ACCEPTED]
        events = dict(v.events)
        if rejected:
            assert events[names.EVENT_ROLLBACK] == {"tokens": rejected}
        else:
            assert names.EVENT_ROLLBACK not in events
        rolled_back += rejected
    assert rolled_back == stats.proposed_tokens - stats.accepted_tokens

    # The OpenVerify's prefill, in the oracle, with its KV event.
    (prefill,) = by_name(spans, names.PREFILL_SPAN)
    assert prefill.service == ORACLE and prefill.parent_id in ids
    prefill_event = dict(prefill.events)[names.EVENT_PREFILL]
    assert prefill_event["computed_tokens"] == stats.prefilled_tokens
    assert prefill_event["cached_tokens"] == stats.cached_tokens

    # GenAI request attributes and the speculative-decoding summary on the root.
    a = root.attributes
    assert a[names.GEN_AI_OPERATION_NAME] == "text_completion"
    assert a[names.GEN_AI_REQUEST_MODEL]
    assert a[names.GEN_AI_USAGE_INPUT_TOKENS] == len(PROMPT)
    assert a[names.GEN_AI_USAGE_OUTPUT_TOKENS] == stats.output_tokens
    assert a[names.GEN_AI_RESPONSE_FINISH_REASONS] == ["length"]
    assert a[names.GEN_AI_REQUEST_MAX_TOKENS] == stats.output_tokens
    assert a[names.GEN_AI_REQUEST_TEMPERATURE] == 0.0
    assert a[names.GEN_AI_REQUEST_TOP_P] == 1.0 and a[names.GEN_AI_REQUEST_TOP_K] == 0
    assert a[names.ROUNDS] == stats.rounds
    assert a[names.ACCEPTANCE_RATE] == pytest.approx(stats.acceptance_rate)
    assert a[names.MEAN_TOKENS_PER_ROUND] == pytest.approx(stats.mean_tokens_per_round)

    # The stock gRPC instrumentation: the Verify stream's client and server spans.
    verify_rpcs = [s for s in spans if s.name == "/specdec.v1.Oracle/Verify"]
    assert {s.service for s in verify_rpcs if s.kind == 2} == {ORACLE}  # SPAN_KIND_SERVER
    return {"root": root, "rounds": rounds, "verifies": verifies}


def test_draft_path_is_one_trace_across_three_services(system: System) -> None:
    trace_id, parent_id, completion = generate(system, max_new_tokens=24, k=4)
    stats = completion.stats
    assert stats.draft_id == "d1" and stats.output_tokens == 24
    spans = wait_for_trace(system, trace_id, stats.rounds)
    assert {s.service for s in spans} == {GATEWAY, DRAFT, ORACLE}
    parts = check_tree(spans, parent_id, completion)
    rounds = parts["rounds"]
    assert {r.service for r in rounds} == {DRAFT}  # the round runs in the draft
    assert max(r.attributes[names.ROUND_K] for r in rounds) == 4
    # A draft span under every round that drafted (the last round may ask for none).
    drafts = by_name(spans, names.DRAFT_SPAN)
    drafting = {r.span_id for r in rounds if r.attributes[names.ROUND_K] > 0}
    assert sorted(d.parent_id for d in drafts) == sorted(drafting)
    assert {d.service for d in drafts} == {DRAFT}
    root = parts["root"].attributes
    assert root[names.DRAFTER] == "model" and root[names.DRAFT_ID] == "d1"
    assert root[names.GEN_AI_REQUEST_MODEL] == root[names.GEN_AI_RESPONSE_MODEL]
    # The draft's Verify RPC client span hangs under the request too.
    clients = [s for s in spans if s.name == "/specdec.v1.Oracle/Verify" and s.kind == 3]
    assert [s.service for s in clients] == [DRAFT]


def test_an_http_request_is_the_root_of_its_trace(system: System) -> None:
    # No traceparent: the HTTP request's span is the root of the whole trace, the draft's
    # rounds and the oracle's verifies under it as under a gRPC Generate call's span.
    body = {
        "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
        "specdec": {"k": 3},
    }  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{system.http_port}/v1/completions", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        stats = json.loads(response.read())["specdec"]
    assert stats["output_tokens"] == 10 and stats["drafter"] == "model"

    def http_root() -> Span | None:
        roots = [s for s in system.receiver.all() if s.name == HTTP_ROOT]
        return roots[0] if roots else None

    root = wait_until_value(http_root, SPAN_WAIT_S)
    spans = wait_for_trace(system, root.trace_id, stats["rounds"], root=HTTP_ROOT)
    completion = types.SimpleNamespace(stats=types.SimpleNamespace(**stats))
    parts = check_tree(spans, "", completion, root_name=HTTP_ROOT)
    assert {s.service for s in spans} == {GATEWAY, DRAFT, ORACLE}
    assert not by_name(spans, GENERATE)  # no gRPC Generate call in between
    a = parts["root"].attributes
    assert parts["root"].kind == 2  # SPAN_KIND_SERVER
    assert a["http.route"] == "/v1/completions" and a["http.response.status_code"] == 200
    assert a[names.GEN_AI_OPERATION_NAME] == "text_completion"
    assert a[names.GEN_AI_USAGE_OUTPUT_TOKENS] == 10


def wait_until_value(get: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (value := get()) is None:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def test_oracle_only_trace_spans_gateway_and_oracle(system: System) -> None:
    trace_id, parent_id, completion = generate(system, max_new_tokens=8, k=0)
    stats = completion.stats
    assert stats.rounds == 8 and stats.proposed_tokens == 0
    spans = wait_for_trace(system, trace_id, stats.rounds)
    assert {s.service for s in spans} == {GATEWAY, ORACLE}
    parts = check_tree(spans, parent_id, completion)
    assert {r.service for r in parts["rounds"]} == {GATEWAY}
    assert all(r.attributes[names.ROUND_EXTRA_TOKEN] == names.BONUS for r in parts["rounds"])
    assert by_name(spans, names.DRAFT_SPAN) == []
    assert parts["root"].attributes[names.DRAFTER] == "none"


def test_ngram_rounds_draft_in_the_gateway(system: System) -> None:
    trace_id, parent_id, completion = generate(system, max_new_tokens=12, k=3, drafter="ngram")
    spans = wait_for_trace(system, trace_id, completion.stats.rounds)
    check_tree(spans, parent_id, completion)
    drafts = by_name(spans, names.DRAFT_SPAN)
    assert drafts and {d.service for d in drafts} == {GATEWAY}


def test_health_checks_and_worker_streams_are_not_traced(system: System) -> None:
    from specdec.rpc.healthcheck import check

    assert check(system.cluster.address)
    generate(system, max_new_tokens=2, k=0)
    time.sleep(0.5)
    rpc_names = {s.name for s in system.receiver.all()}
    assert not any("grpc.health" in n or "WorkerRegistry" in n for n in rpc_names), rpc_names


# -- metrics ---------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """Sample name -> value summed over label sets; also "name[block]" per block label."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if "block" in sample.labels:
                key = f"{sample.name}[{sample.labels['block']}]"
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_move_with_the_stats(system: System) -> None:
    ports = system.metrics_ports
    before = {service: scrape(port) for service, port in ports.items()}
    _, _, completion = generate(system, max_new_tokens=20, k=4)
    stats = completion.stats
    after = {service: scrape(port) for service, port in ports.items()}

    g0, g1 = before[GATEWAY], after[GATEWAY]
    assert delta(g0, g1, "specdec_draft_tokens_total") == stats.proposed_tokens
    assert delta(g0, g1, "specdec_accepted_tokens_total") == stats.accepted_tokens
    assert delta(g0, g1, "specdec_rounds_total") == stats.rounds
    rounds_by_block = {
        block: delta(g0, g1, f"specdec_rounds_total[{block}]")
        for block in ("alone", "fresh", "ahead", "piped", "branch", "branch+piped")
    }
    assert sum(rounds_by_block.values()) == stats.rounds
    assert rounds_by_block["alone"] == stats.oracle_alone_rounds
    assert rounds_by_block["branch"] + rounds_by_block["branch+piped"] == stats.branch_rounds
    assert rounds_by_block["piped"] + rounds_by_block["branch+piped"] == stats.pipelined_rounds
    fresh = rounds_by_block["fresh"] + rounds_by_block["alone"]
    assert stats.rounds - fresh == stats.draft_ahead_hits
    assert delta(g0, g1, "specdec_output_tokens_total") == stats.output_tokens == 20
    assert delta(g0, g1, "specdec_prompt_tokens_total") == len(PROMPT)
    assert delta(g0, g1, "specdec_requests_total") == 1
    # Acceptance by position: drafted at i in proposed_per_position[i] rounds, accepted in ...
    assert delta(g0, g1, "specdec_accepted_tokens_per_position_total") == stats.accepted_tokens
    assert delta(g0, g1, "specdec_draft_tokens_per_position_total") == stats.proposed_tokens
    drafting_rounds = stats.proposed_per_position[0]
    assert delta(g0, g1, "specdec_accepted_length_count") == drafting_rounds
    assert delta(g0, g1, "specdec_accepted_length_sum") == stats.accepted_tokens
    assert delta(g0, g1, "specdec_time_to_first_token_seconds_count") == 1
    assert delta(g0, g1, "specdec_round_trip_seconds_count") == stats.rounds
    for part in ("draft", "verify", "network", "queue"):
        assert delta(g0, g1, f"specdec_round_{part}_seconds_count") > 0
    assert delta(g0, g1, "specdec_inter_token_latency_seconds_count") > 0
    assert g1["specdec_active_sessions"] == 0

    o0, o1 = before[ORACLE], after[ORACLE]
    assert delta(o0, o1, "specdec_oracle_verify_seconds_count") == stats.rounds
    assert delta(o0, o1, "specdec_oracle_prefill_seconds_count") == 1
    assert delta(o0, o1, "specdec_prefill_tokens_total") == stats.prefilled_tokens
    assert delta(o0, o1, "specdec_kv_rollback_tokens_total") == (
        stats.proposed_tokens - stats.accepted_tokens
    )
    assert "specdec_kv_cache_bytes" in o1 and "specdec_kv_evictions_total" in o1
    assert o1["specdec_kv_cache_budget_bytes"] > 0

    d0, d1 = before[DRAFT], after[DRAFT]
    assert delta(d0, d1, "specdec_draft_propose_seconds_count") == drafting_rounds
    assert "specdec_active_sessions" in d1


def test_kv_cache_gauge_holds_a_kept_session(system: System) -> None:
    from specdec.client import Client

    port = system.metrics_ports[ORACLE]
    with Client(system.cluster.address, timeout=60) as client:
        session = client.create_session()
        client.generate(PROMPT, session_id=session, max_new_tokens=4, k=0)
        held = scrape(port)
        client.close_session(session)
    assert held["specdec_kv_cache_bytes"] > 0
    assert held["specdec_cached_sessions"] >= 1


# -- `specdec traces` on the file the services wrote ---------------------------------


def wait_for_file_trace(path: Path, trace_id: str, rounds: int) -> None:
    deadline = time.monotonic() + SPAN_WAIT_S
    while time.monotonic() < deadline:
        if path.exists():
            # read_spans skips a line still being written by a service.
            mine = [s for s in read_spans(path) if s.trace_id == trace_id]
            if (
                sum(s.name == names.ROUND_SPAN for s in mine) >= rounds
                and any(s.name == GENERATE for s in mine)
                and sum(s.name == names.PREFILL_SPAN for s in mine) == 1
            ):
                return
        time.sleep(0.1)
    raise AssertionError(f"trace {trace_id} not in {path} after {SPAN_WAIT_S}s")


def specdec_traces(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """`specdec traces ARGS` (in process: the command line's parser and output)."""
    from specdec.cli import main

    capsys.readouterr()
    main(["traces", *args])
    return capsys.readouterr().out


def test_traces_command_shows_a_request_round_by_round(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_id, _, completion = generate(system, max_new_tokens=16, k=4)
    stats = completion.stats
    wait_for_file_trace(system.trace_file, trace_id, stats.rounds)

    table = specdec_traces(capsys, str(system.trace_file), "--trace-id", trace_id[:12])
    lines = table.strip().splitlines()
    assert lines[0].startswith(f"trace {trace_id}") and GENERATE in lines[0]
    header = lines[1].split()
    assert header[:5] == ["round", "k", "proposed", "accepted", "extra"]
    rows = [line.split() for line in lines[2:-1]]
    # Pipelined blocks that were not verified show as skipped rows and count nowhere.
    skipped = [r for r in rows if r[4] == "skipped"]
    assert len(rows) - len(skipped) == stats.rounds
    assert all(r[2:4] == ["0", "0"] for r in skipped)
    assert sum(int(r[2]) for r in rows) == stats.proposed_tokens
    assert sum(int(r[3]) for r in rows) == stats.accepted_tokens
    assert sum(int(r[5]) for r in rows) == stats.output_tokens
    assert {r[4] for r in rows} <= {"bonus", "correction", "skipped"}
    # The last column says how each block was drafted, and agrees with the stats.
    assert all(r[-1] == "-" for r in skipped)
    blocks = [r[-1] for r in rows if r[4] != "skipped"]
    assert sum(b.startswith("branch") for b in blocks) == stats.branch_rounds
    assert sum(b.endswith("piped") for b in blocks) == stats.pipelined_rounds
    assert sum(b not in ("fresh", "alone") for b in blocks) == stats.draft_ahead_hits
    assert blocks.count("alone") == stats.oracle_alone_rounds
    summary = lines[-1]
    assert summary.startswith(f"services: {DRAFT}, {GATEWAY}, {ORACLE} |")
    rounds = f"{stats.rounds} rounds" + (f" (+{len(skipped)} skipped)" if skipped else "")
    assert (
        f"{rounds}, {stats.proposed_tokens} proposed, "
        f"{stats.accepted_tokens} accepted ({100 * stats.acceptance_rate:.1f}%), "
        f"{stats.output_tokens} committed"
    ) in summary
    assert f"{stats.proposed_tokens - stats.accepted_tokens} rolled back" in summary

    # --last 1 --json: the most recent request, with exact totals.
    (record,) = [json.loads(line) for line in specdec_traces(
        capsys, str(system.trace_file), "--last", "1", "--json"
    ).splitlines()]  # fmt: skip
    assert record["trace_id"] == trace_id
    assert (record["rounds"], record["proposed"], record["accepted"], record["committed"]) == (
        stats.rounds,
        stats.proposed_tokens,
        stats.accepted_tokens,
        stats.output_tokens,
    )
    assert record["request"][names.GEN_AI_USAGE_OUTPUT_TOKENS] == stats.output_tokens


# -- oracle KV events: eviction and re-prefill (in process, a real engine) ---------------


async def test_eviction_and_re_prefill_events(loaded: Callable[[str, str], Any]) -> None:
    from oracle_service.engine import OracleEngine
    from specdec.core.sampling import SamplingParams
    from specdec.telemetry.oracle import VerifyObserver

    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # local: the process's global provider stays untouched
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    # Budget 0: every session is evicted as soon as its stream closes.
    engine = OracleEngine(
        loaded("llama", "oracle"),
        oracle_id="o",
        kv_budget_bytes=0,
        max_sessions=4,
        max_cached_sessions=8,
    )

    async def open_and_close(session_id: str) -> None:
        watch = VerifyObserver(tracer, None, engine.sessions, session_id)
        lease, opened = await engine.open(session_id, PROMPT, SamplingParams(), 0)
        watch.opened({}, opened, lease.reprefill)
        engine.close(lease)  # queues an eviction pass in the model thread

    try:
        await open_and_close("a")  # first time: a plain prefill
        await open_and_close("b")  # "a" is evicted (idle, over budget) while "b" prefills
        await open_and_close("a")  # seen before, but evicted: a re-prefill; "b" evicted
    finally:
        engine.shutdown()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [names.PREFILL_SPAN] * 3
    events = [{e.name: dict(e.attributes or {}) for e in s.events} for s in spans]
    assert all(e[names.EVENT_PREFILL]["computed_tokens"] == len(PROMPT) - 1 for e in events)
    assert [names.EVENT_REPREFILL in e for e in events] == [False, False, True]
    assert events[2][names.EVENT_REPREFILL] == {"tokens": len(PROMPT) - 1}
    assert [e.get(names.EVENT_EVICTION) for e in events] == [None, {"sessions": 1}] * 1 + [
        {"sessions": 1}
    ]


# -- configuration from the environment (no process needed) -----------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),  # nothing configured: tracing off
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4317", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console, OTLP"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_exporters_follow_the_otel_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: list[str]
) -> None:
    from specdec.telemetry.setup import exporter_names

    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert exporter_names() == expected


def test_unusable_exporters_are_refused_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from specdec.core.errors import InvalidArgument
    from specdec.telemetry.setup import _exporter

    with pytest.raises(InvalidArgument, match="not installed"):
        _exporter("zipkin-nope")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(InvalidArgument, match="grpc or http/protobuf"):
        _exporter("otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert type(_exporter("otlp")).__module__.endswith("grpc.trace_exporter")


def test_no_tracing_means_no_hooks() -> None:
    """In this process nothing is configured: every hook is None, no interceptor is added."""
    from specdec.telemetry import server_interceptors, tracing_enabled
    from specdec.telemetry.gateway import request_observer
    from specdec.telemetry.oracle import verify_observer
    from specdec.telemetry.rounds import current_trace_context, round_tracer

    if tracing_enabled():
        pytest.skip("this test process was started with OTEL_* tracing variables set")
    assert server_interceptors() == []
    assert round_tracer("s", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None
    assert current_trace_context() == {}
    from specdec.core.sampling import SamplingParams

    assert request_observer("s", 3, SamplingParams(), 4, persistent=False) is None
    assert verify_observer(None, "s") is None  # type: ignore[arg-type]
