"""`specdec bench --sessions 1,16`: N concurrent sessions through the real gateway, side by side.

One gateway, one oracle and ``--drafts`` draft services run as local processes.
For every oracle ``--max-batch`` value (the oracle is restarted between values,
so gateway and drafts stay the same processes), every k and every session count
N, N clients stream greedy generations (EOS ignored, so every request yields
exactly ``--max-new-tokens``) through the gateway at once.

The measured window keeps the concurrency at exactly N. Session i asks for
prompt (i + j) mod P at its j-th request, so sessions start on different prompts
and every N sees the same prompt mix. R = max(--requests-per-session, ceil(P / N))
requests per session are *counted*; a session that has finished its R keeps
going with uncounted filler requests until the last session finishes its R-th,
which closes the window (the filler still running is cancelled). Hence

    aggregate tok/s = (counted tokens + filler tokens arrived inside the window) / window

and every latency figure comes from the counted requests only, N * R * M tokens.

Inter-token latency follows measure.py: a chunk of n tokens arriving g after the
previous chunk counts as n tokens of g / n each. ``itl_arrival_p99_ms`` is the
other reading, one arrival of gap g followed by n - 1 gaps of 0 (what a reader
of the stream sees as a stall). Ratios are against the smallest N of the run
(N = 1 when asked) at the same max-batch and k, measured in the same run:
``aggregate_vs_base`` = aggregate(N) / aggregate(base), ``itl_p99_vs_base`` =
ITL p99(N) / ITL p99(base). Issue 7 asks, at N = 16, for >= 6x and <= 2x.

With ``--repeats R`` every session count is measured R times, alternating (N=1,
N=16, N=1, N=16, ...), and each count's windows are pooled (their tokens over their
summed time, their latencies together): a host whose speed drifts over minutes then
weighs on every count alike, instead of on whichever ran during a slow spell.

Greedy outputs must not depend on concurrency, k or batching: ``mismatched_outputs``
counts counted requests whose tokens differ from the first run of the same prompt.
``fallback_requests`` counts k > 0 requests that ran without the draft model (a
draft at its session limit makes the gateway fall back to the oracle alone).

Where the time goes: per round, ``verify_ms_per_round`` is the oracle's compute and
``queue_ms_per_round`` the wait for its model thread. Over the window, read from the
oracle's GetInfo before and after: ``oracle_rows_per_batch`` (blocks per verify batch)
and ``oracle_busy_share`` (the model thread's busy share of the wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.bench.measure import Result, Sample, format_table, percentile
from specdec.bench.shapes import tokenizer_source
from specdec.config import settings_in_environment
from specdec.core.errors import InvalidArgument
from specdec.v1 import common_pb2

WARMUP_TOKENS = 8
QUIET_TIMEOUT_S = 15.0
TARGET_SESSIONS, TARGET_AGGREGATE, TARGET_ITL = 16, 6.0, 2.0  # issue 7


@dataclass(frozen=True)
class Point:
    """One measured configuration."""

    max_batch: int | None  # None: the oracle's own default
    k: int
    sessions: int
    branches: int | None = None  # likely corrections drafted ahead (None: the draft's default)


@dataclass
class Request:
    """One counted request: its Sample, the prompt it ran, and its chunk arrivals."""

    sample: Sample
    prompt: int
    arrivals: list[tuple[float, int]]  # (perf_counter, tokens in the chunk)


@dataclass
class Window:
    """What one Point measured."""

    seconds: float
    requests: list[list[Request]]  # per session, in order
    filler_tokens: int  # uncounted requests' tokens that arrived inside the window
    filler_requests: int = 0
    oracle: dict[str, float] = field(default_factory=dict)  # OracleLoad.since over the window


def pool(windows: list[Window]) -> Window:
    """Several windows of one Point as one: their sessions' requests together, their
    times and filler summed, the oracle's figures weighted by batches and by time."""
    first, seconds = windows[0], sum(w.seconds for w in windows)
    requests = [[req for w in windows for req in w.requests[i]] for i in range(len(first.requests))]
    pooled = Window(
        seconds,
        requests,
        sum(w.filler_tokens for w in windows),
        sum(w.filler_requests for w in windows),
    )
    if all(w.oracle for w in windows):
        batches = sum(w.oracle["oracle_batches"] for w in windows)
        rows = sum(w.oracle["oracle_rows_per_batch"] * w.oracle["oracle_batches"] for w in windows)
        busy = sum(w.oracle["oracle_busy_share"] * w.seconds for w in windows)
        pooled.oracle = {
            "oracle_batches": batches,
            "oracle_rows_per_batch": rows / max(batches, 1),
            "oracle_busy_share": busy / seconds if seconds > 0 else 0.0,
        }
    return pooled


@dataclass(frozen=True)
class OracleLoad:
    """The oracle's counters (GetInfo) at one moment, and their change over the window."""

    batches: int
    verified_blocks: int
    busy_ns: int
    at_s: float  # time.perf_counter() when read

    def since(self, start: OracleLoad) -> dict[str, float]:
        """rows_per_batch: blocks per verify batch; busy_share: the model thread's share
        of the wall time (verifying, not queueing)."""
        batches = self.batches - start.batches
        seconds = self.at_s - start.at_s
        return {
            "oracle_batches": batches,
            "oracle_rows_per_batch": (self.verified_blocks - start.verified_blocks)
            / max(batches, 1),
            "oracle_busy_share": (self.busy_ns - start.busy_ns) / 1e9 / seconds
            if seconds > 0
            else 0.0,
        }


@dataclass
class Plan:
    """The run's fixed parameters."""

    prompts: list[list[int]]
    max_new_tokens: int
    requests_per_session: int
    adaptive: bool
    warmup_tokens: int = WARMUP_TOKENS

    def requests_for(self, sessions: int) -> int:
        """R: at least ``requests_per_session``, and enough that every prompt is used."""
        return max(self.requests_per_session, math.ceil(len(self.prompts) / sessions))


def parse_ints(text: str, flag: str, minimum: int) -> list[int]:
    """``"1,16"`` -> [1, 16]; InvalidArgument naming ``flag`` otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgument(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise InvalidArgument(f"{flag} needs integers >= {minimum}, got {text!r}")
    return sorted(set(values))


async def _request(
    client: Any, prompt: list[int], point: Point, plan: Plan, max_new_tokens: int,
    arrivals: list[tuple[float, int]],
) -> Sample:  # fmt: skip
    """Stream one greedy request; chunk arrivals go to ``arrivals`` as they come."""
    start = time.perf_counter()
    sample = Sample(0, 0.0, 0.0)
    k = point.k
    stream = client.stream(
        prompt, k=k, adaptive=plan.adaptive and k > 0, max_new_tokens=max_new_tokens,
        ignore_eos=True, branches=point.branches,
    )  # fmt: skip
    async with contextlib.aclosing(stream):
        async for response in stream:
            now = time.perf_counter()
            if response.token_ids:
                arrivals.append((now, len(response.token_ids)))
            sample.arrive(response.token_ids, now, start)
            if response.finish_reason:
                sample.stats = response.stats
    sample.seconds = time.perf_counter() - start
    return sample


async def _warm_up(clients: list[Any], point: Point, plan: Plan) -> None:
    """One short untimed request per session, all at once: every path (channel, oracle, each
    draft, the batch shapes of N sessions) has run before the window opens."""
    short = min(plan.warmup_tokens, plan.max_new_tokens)
    await asyncio.gather(
        *(
            _request(client, plan.prompts[i % len(plan.prompts)], point, plan, short, [])
            for i, client in enumerate(clients)
        )
    )


async def _measure_point(address: str, oracle: str, point: Point, plan: Plan) -> Window:
    """Warm-up then the window, each session on its own channel (as N separate users);
    the oracle (at ``oracle``) is asked for its counters on both sides of the window."""
    from specdec.client import AsyncClient

    clients = [AsyncClient(address, timeout=600) for _ in range(point.sessions)]
    try:
        await _warm_up(clients, point, plan)
        start = await _oracle_load(oracle)
        window = await _window(clients, point, plan)
        end = await _oracle_load(oracle)
        if start is not None and end is not None:
            window.oracle = end.since(start)
        return window
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _oracle_load(address: str) -> OracleLoad | None:
    """The oracle's batch counters now (None if it does not answer)."""
    import grpc

    from specdec.v1 import oracle_pb2, oracle_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            info = await oracle_pb2_grpc.OracleStub(channel).GetInfo(
                oracle_pb2.GetInfoRequest(), timeout=5
            )
        except grpc.aio.AioRpcError:
            return None
    return OracleLoad(info.batches, info.verified_blocks, info.verify_busy_ns, time.perf_counter())


async def _window(clients: list[Any], point: Point, plan: Plan) -> Window:
    """N sessions at once; see the module docstring for the window and the filler."""
    n, r, p = point.sessions, plan.requests_for(point.sessions), len(plan.prompts)
    counted: list[list[Request]] = [[] for _ in range(n)]
    filler: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    filler_started = [0]
    left = [n]
    end = [0.0]
    all_counted = asyncio.Event()

    async def session(i: int) -> None:
        j = 0
        while j < r or not all_counted.is_set():
            prompt = (i + j) % p
            arrivals: list[tuple[float, int]] = [] if j < r else filler[i]
            if j >= r:
                filler_started[0] += 1
            sample = await _request(
                clients[i], plan.prompts[prompt], point, plan, plan.max_new_tokens, arrivals
            )
            if j < r:
                counted[i].append(Request(sample, prompt, arrivals))
            j += 1
            if j == r:
                left[0] -= 1
                if left[0] == 0:
                    end[0] = time.perf_counter()
                    all_counted.set()

    start = time.perf_counter()
    tasks = [asyncio.create_task(session(i)) for i in range(n)]
    waiter = asyncio.create_task(all_counted.wait())
    try:
        pending: set[asyncio.Task[Any]] = {*tasks, waiter}
        while not waiter.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
    finally:
        # The filler still streaming is cancelled: its turns end at the gateway.
        for task in [*tasks, waiter]:
            task.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)
    inside = sum(tokens for arrivals in filler for when, tokens in arrivals if when <= end[0])
    return Window(end[0] - start, counted, inside, filler_started[0])


async def _quiet(address: str, timeout: float = QUIET_TIMEOUT_S) -> None:
    """Until the gateway sees no turn on any worker (cancelled filler has ended)."""
    from specdec.client import AsyncClient

    deadline = time.monotonic() + timeout
    async with AsyncClient(address, timeout=5) as client:
        while time.monotonic() < deadline:
            if all(w.active_sessions == 0 for w in await client.list_workers()):
                return
            await asyncio.sleep(0.1)
    print(f"  warning: workers still busy {timeout:.0f}s after the window", flush=True)


def summarize(point: Point, window: Window, plan: Plan) -> dict[str, Any]:
    """The row of one Point (JSON-ready); ratios are added by ``add_ratios``."""
    requests = [req for session in window.requests for req in session]
    samples = [req.sample for req in requests]
    name = f"k={point.k} N={point.sessions}"
    if point.branches is not None:
        name += f" br={point.branches}"
    row = Result(name, "greedy", 0.0, samples).summary(None)
    counted_tokens = row["output_tokens"]
    arrival_itl = [gap for req in requests for gap in _arrival_gaps(req.arrivals)]
    session_tps = [
        sum(q.sample.tokens for q in s) / sum(q.sample.seconds for q in s)
        for s in window.requests
        if s and sum(q.sample.seconds for q in s) > 0
    ]
    drafters = Counter(s.stats.drafter for s in samples if s.stats is not None)
    row.update(
        max_batch=point.max_batch,
        k=point.k,
        branches=point.branches,
        adaptive=plan.adaptive and point.k > 0,
        sessions=point.sessions,
        requests_per_session=plan.requests_for(point.sessions),
        window_s=window.seconds,
        window_tokens=counted_tokens + window.filler_tokens,
        filler_requests=window.filler_requests,
        aggregate_tokens_per_s=(counted_tokens + window.filler_tokens) / window.seconds,
        session_tokens_per_s=statistics.median(session_tps) if session_tps else 0.0,
        request_tokens_per_s=row.pop("tokens_per_s"),
        ttft_p50_ms=row.pop("ttft_ms"),
        itl_arrival_p99_ms=1000 * percentile(arrival_itl, 99),
        fallback_requests=(
            sum(c for kind, c in drafters.items() if kind != common_pb2.DRAFTER_KIND_MODEL)
            if point.k
            else 0
        ),
    )
    if point.k:  # which draft served how many requests (the gateway balances them)
        row["draft_requests"] = dict(
            Counter(s.stats.draft_id for s in samples if s.stats is not None)
        )
    else:  # nothing is drafted at k = 0: acceptance figures are void, not zero
        for key in ("acceptance_rate", "alpha", "mean_accepted_per_round", "draft_ms_per_token"):
            row[key] = None
    for key in ("config", "workload", "delay_ms", "wire_bytes_per_token"):
        row.pop(key, None)
    row.update(window.oracle)
    return row


def _arrival_gaps(arrivals: list[tuple[float, int]]) -> list[float]:
    """One request's inter-token gaps read as arrivals: a chunk of n tokens after a gap g
    is g followed by n - 1 zeros (the first chunk's extra tokens are zeros too)."""
    gaps: list[float] = []
    for i, (when, n) in enumerate(arrivals):
        gaps.extend(([when - arrivals[i - 1][0]] if i else []) + [0.0] * (n - 1))
    return gaps


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the smallest N of the same (max_batch, k, branches), in place."""
    for row in rows:
        key = (row["max_batch"], row["k"], row.get("branches"))
        same = [r for r in rows if (r["max_batch"], r["k"], r.get("branches")) == key]
        base = min(same, key=lambda r: r["sessions"])
        row["baseline_sessions"] = base["sessions"]
        row["aggregate_vs_base"] = row["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
        row["itl_p99_vs_base"] = row["itl_p99_ms"] / base["itl_p99_ms"]
        row["itl_arrival_p99_vs_base"] = row["itl_arrival_p99_ms"] / base["itl_arrival_p99_ms"]
        if row["sessions"] == TARGET_SESSIONS and base["sessions"] == 1:
            row["issue7_target_met"] = (
                row["aggregate_vs_base"] >= TARGET_AGGREGATE
                and row["itl_p99_vs_base"] <= TARGET_ITL
            )


def mark_mismatches(rows: list[dict[str, Any]], outputs: list[list[list[Request]]]) -> None:
    """``mismatched_outputs`` per row: requests whose tokens differ from the first run of the
    same prompt anywhere in this run (greedy output is the oracle's alone, whatever k, N or
    batching)."""
    reference: dict[int, list[int]] = {}
    for row, sessions in zip(rows, outputs, strict=True):
        mismatched = 0
        for req in (q for s in sessions for q in s):
            ref = reference.setdefault(req.prompt, req.sample.token_ids)
            mismatched += req.sample.token_ids != ref
        row["mismatched_outputs"] = mismatched


COLUMNS = [
    ("max_batch", "max_batch", "{}"),
    ("k", "k", "{}"),
    ("branches", "br", "{}"),
    ("sessions", "N", "{}"),
    ("requests", "reqs", "{}"),
    ("aggregate_tokens_per_s", "agg tok/s", "{:.1f}"),
    ("aggregate_vs_base", "agg x", "{:.2f}x"),
    ("session_tokens_per_s", "sess tok/s", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50", "{:.0f}"),
    ("itl_p50_ms", "ITL p50", "{:.1f}"),
    ("itl_p99_ms", "ITL p99", "{:.1f}"),
    ("itl_p99_vs_base", "p99 x", "{:.2f}x"),
    ("itl_arrival_p99_ms", "arr p99", "{:.1f}"),
    ("acceptance_rate", "accept", "{:.2f}"),
    ("verify_ms_per_round", "verify ms", "{:.1f}"),
    ("queue_ms_per_round", "queue ms", "{:.1f}"),
    ("oracle_rows_per_batch", "rows/batch", "{:.1f}"),
    ("oracle_busy_share", "busy", "{:.0%}"),
    ("fallback_requests", "fallbk", "{}"),
    ("mismatched_outputs", "mismatch", "{}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """measure.table's layout with this mode's columns (missing figures shown as '-')."""
    return format_table(
        [{**row, "max_batch": row["max_batch"] or "default"} for row in rows], COLUMNS
    )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "cuda_devices": (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda
            else []
        ),
        "oracle_device": args.device,
        "draft_device": args.draft_device,
        "dtype": args.dtype,
        "draft_dtype": args.draft_dtype or args.dtype,
        "drafts": args.drafts,
        "threads_per_process": args.threads,
        "oracle_cpus": args.oracle_cpus,  # "" = any
        "draft_cpus": args.draft_cpus,
        # The oracle's settings that the services take from the environment (SPECDEC_*).
        "oracle_env": settings_in_environment(),
    }


def _await_oracle(c: Any, oracle: Any, oracle_id: str, drafts: int) -> None:
    """Until the gateway lists exactly ``oracle_id`` as its oracle, and every draft."""
    from specdec.client import Client

    c.wait_workers(oracles=1, drafts=drafts)
    deadline = time.monotonic() + 120
    with Client(c.address, timeout=2) as client:
        while time.monotonic() < deadline:
            if not oracle.alive():
                raise RuntimeError(f"the oracle exited:\n{oracle.log()[-3000:]}")
            workers = client.list_workers()
            oracles = [w.worker_id for w in workers if int(w.kind) == 2]
            if oracles == [oracle_id] and len(workers) - len(oracles) >= drafts:
                return
            time.sleep(0.1)
    raise TimeoutError(f"the gateway did not list oracle {oracle_id} alone within 120s")


async def _measure_all(
    c: Any, args: argparse.Namespace, plan: Plan, batches: list[int | None], ks: list[int],
    sessions: list[int], save: Callable[[list[dict[str, Any]], list[list[list[Request]]]], None],
) -> None:  # fmt: skip
    """Every point, on one event loop; ``save`` gets the rows so far after each point."""
    rows: list[dict[str, Any]] = []
    outputs: list[list[list[Request]]] = []
    oracle = None
    for max_batch in batches:
        # One oracle at a time, restarted per value: two registered oracles would split
        # the sessions between them, and gateway and drafts stay the same processes.
        if oracle is not None:
            oracle.terminate()
            c.services.remove(oracle)
        flags = ["--device", args.device, "--dtype", args.dtype,
                 "--max-sessions", str(max(64, max(sessions)))]  # fmt: skip
        if max_batch is not None:
            flags += ["--max-batch", str(max_batch)]
        oracle_id = f"oracle-mb{max_batch if max_batch is not None else 'default'}"
        oracle = c.start_oracle(
            args.oracle_path, *flags, oracle_id=oracle_id, cpus=args.oracle_cpus
        )
        await asyncio.to_thread(_await_oracle, c, oracle, oracle_id, args.drafts if any(ks) else 0)
        widths: list[int | None] = (
            list(parse_ints(args.branches, "--branches", 0)) if args.branches else [None]
        )
        for k, width in itertools.product(ks, widths):
            windows: dict[int, list[Window]] = {n: [] for n in sessions}
            for repeat, n in itertools.product(range(args.repeats), sessions):
                point = Point(max_batch, k, n, width)
                oracle_address = f"127.0.0.1:{oracle.port}"
                window = await _measure_point(c.address, oracle_address, point, plan)
                await _quiet(c.address)
                windows[n].append(window)
                tokens = sum(q.sample.tokens for s in window.requests for q in s)
                print(
                    f"  max_batch={max_batch} k={k} branches={width} N={n} "
                    f"({repeat + 1}/{args.repeats}): "
                    f"{(tokens + window.filler_tokens) / window.seconds:.1f} tok/s aggregate, "
                    f"{window.seconds:.1f}s window",
                    flush=True,
                )
            for n in sessions:
                window = pool(windows[n])
                rows.append(summarize(Point(max_batch, k, n, width), window, plan))
                outputs.append(window.requests)
            save(rows, outputs)


def run_concurrency(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """Every (max_batch, k, N) point; prints the table, writes ``args.out``, returns the report."""
    from specdec.launch import check_cpus, cluster

    sessions = parse_ints(args.sessions, "--sessions", 1)
    ks = parse_ints(args.session_ks, "--session-ks", 0)
    batches: list[int | None] = (
        list(parse_ints(args.oracle_max_batch, "--oracle-max-batch", 1))
        if args.oracle_max_batch
        else [None]
    )
    if args.drafts < 1 and any(ks):
        raise InvalidArgument("--drafts must be >= 1 when a k > 0 is measured")
    if args.requests_per_session < 1:
        raise InvalidArgument("--requests-per-session must be >= 1")
    if args.repeats < 1:
        raise InvalidArgument("--repeats must be >= 1")
    for flag, cpus in (("--oracle-cpus", args.oracle_cpus), ("--draft-cpus", args.draft_cpus)):
        if cpus:
            check_cpus(cpus, flag)
    plan = Plan(prompts, args.max_new_tokens, args.requests_per_session, args.adaptive)
    # Every draft may take every session: the gateway gives a turn to the least loaded one,
    # so shares stay even, and none is ever refused (which would silently mean k = 0).
    per_draft = max(8, max(sessions))
    env = {"OMP_NUM_THREADS": str(args.threads), "SPECDEC_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "specdec " + " ".join(sys.argv[1:]),
        "environment": environment(args),
        "models": {"oracle": args.oracle_path, "draft": args.draft_path},
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "requests_per_session": args.requests_per_session,
        "repeats": args.repeats,
        "complete": False,
        "rows": [],
    }

    def save(rows: list[dict[str, Any]], outputs: list[list[list[Request]]]) -> None:
        # After every point, so that a run cut short still leaves what it measured.
        add_ratios(rows)
        mark_mismatches(rows, outputs)
        report.update(rows=rows, wall_s=time.perf_counter() - started)
        out.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as workdir, cluster(Path(workdir), env) as c:
        c.start_gateway("--tokenizer", tokenizer_source(args.oracle_path), cpus=args.oracle_cpus)
        for i in range(args.drafts):
            c.start_draft(
                args.draft_path, "--device", args.draft_device,
                "--dtype", args.draft_dtype or args.dtype,
                "--max-sessions", str(per_draft), draft_id=f"draft-{i}", nice=args.draft_nice,
                cpus=args.draft_cpus,
            )  # fmt: skip
        asyncio.run(_measure_all(c, args, plan, batches, ks, sessions, save))
    report.update(complete=True, wall_s=time.perf_counter() - started)
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{table(report['rows'])}\n\nwrote {out} ({report['wall_s']:.0f}s)", flush=True)
    return report
