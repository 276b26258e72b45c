"""`specdec bench --real-scale llama-3.1-8b`: the oracle at a real model's scale, side by side.

The oracle is a real model's shape with random weights (``specdec.bench.shapes``) in the
given dtype on the GPU, served as the real services run it: one gateway, one oracle,
and for speculation one draft service with the benchmark drafter of chosen acceptance
(``specdec.drafters.controlled``: it proposes the oracle's greedy output from a first
k = 0 pass, right with probability a per token, at ``--draft-step-ms`` per token). In
order, each step saving the JSON so far:

1. HF ``generate`` of the same model in this process (then freed);
2. the oracle alone through the gateway (k = 0) at each of ``--alone-sessions``
   concurrent sessions; its N = 1 outputs are the references;
3. speculation through the gateway at each acceptance, the controller's k (adaptive,
   at most ``--spec-k``), at each of ``--spec-sessions``.

Per row: aggregate and per-session tokens/s, ITL p50/p99, its ratios to N = 1 of the
same configuration, the share of the bandwidth limit (a token per weight read: weight
bytes / the card's nominal bandwidth), and for speculation the speedup over the oracle
alone at the same N, Leviathan's theoretical speedup

    S = E(a, k) / (k c + 1),  E(a, k) = (1 - a^(k+1)) / (1 - a),  c = t_draft / t_step

(a the measured per-token acceptance, k the mean k, t_step the oracle alone's time per
token at that N, verifying k + 1 tokens taken as one step) and the efficiency, measured
over S. ``targets`` checks issue 26's goals. Greedy outputs must equal the references:
``mismatched_outputs``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from specdec.bench.concurrency import (
    Plan,
    Point,
    Request,
    _measure_point,
    _quiet,
    add_ratios,
    mark_mismatches,
    summarize,
)
from specdec.bench.measure import Sample, format_table, percentile
from specdec.core.adaptive import expected_tokens
from specdec.core.errors import InvalidArgument

# Nominal memory bandwidth, GB/s, by a word of the device name (first match wins).
NOMINAL_BANDWIDTH_GBS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
)
TARGETS = {  # issue 26
    "alone_1_of_limit": 0.70,
    "alone_1_vs_hf": 4.0,
    "alone_16_aggregate": 10.0,
    "alone_16_itl_p99": 1.5,
    "spec_1_efficiency": 0.85,
    "spec_16_aggregate": 10.0,
    "spec_16_itl_p99": 1.5,
}


def add_real_scale_arguments(p: Any) -> None:
    p.add_argument(
        "--real-scale",
        default="",
        help="instead: the oracle at a real model's shape with random weights (e.g. "
        "llama-3.1-8b), HF generate, the oracle alone and speculation at chosen acceptances "
        "(specdec.bench.real_scale)",
    )
    p.add_argument("--acceptances", default="0.6,0.8,0.9", help="with --real-scale")
    p.add_argument("--alone-sessions", default="1,16,64", help="with --real-scale")
    p.add_argument("--spec-sessions", default="1,16", help="with --real-scale")
    p.add_argument("--spec-k", type=int, default=8, help="with --real-scale: the most k")
    p.add_argument(
        "--draft-step-ms",
        type=float,
        default=-1.0,
        help="with --real-scale: the benchmark drafter's cost per token (-1 = the demo "
        "draft's step on this CPU, measured)",
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=0.0,
        help="with --real-scale: the card's memory bandwidth (0 = nominal, by its name)",
    )
    p.add_argument("--hf-prompts", type=int, default=2, help="with --real-scale")


def nominal_bandwidth_gbs(device_name: str) -> float:
    for word, gbs in NOMINAL_BANDWIDTH_GBS:
        if word in device_name:
            return gbs
    return 0.0


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgument(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise InvalidArgument(f"{flag} needs numbers in [0, 1], got {text!r}")
    return values


def _ints(text: str, flag: str) -> list[int]:
    from specdec.bench.concurrency import parse_ints

    return parse_ints(text, flag, 1)


def demo_draft_step_ms(steps: int = 64) -> float:
    """The demo draft's median one-token step on this CPU, as the draft service runs it."""
    import torch

    from specdec.drafters.model_drafter import ModelDrafter
    from specdec.engine.models import DEMO_DRAFT
    from specdec.engine.quantize import load_draft_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = ModelDrafter(load_draft_model(str(DEMO_DRAFT), "cpu", "float32", "auto")).cache
        cache.extend([3 + i for i in range(100)])
        times = []
        for step in range(steps):
            start = time.perf_counter()
            cache.extend([5 + step % 50])
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    finally:
        torch.set_num_threads(threads)


def hf_generate(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """HF ``generate`` of the random model in this process, greedy; the model is freed."""
    import torch

    from specdec.bench.run import Config, _hf_sample
    from specdec.engine.models import load_model

    loaded = load_model(args.oracle_path, device=args.device, dtype=args.dtype)
    try:
        config = Config("HF generate (oracle)", 0, hf="alone")
        sampling = {"max_new_tokens": args.max_new_tokens}
        _hf_sample(loaded.model, None, prompts[0], config, {"max_new_tokens": 8}, 8)  # warm-up
        samples: list[Sample] = []
        for prompt in prompts[: args.hf_prompts]:
            samples.append(
                _hf_sample(loaded.model, None, prompt, config, sampling, args.max_new_tokens)
            )
        itl = [gap for s in samples for gap in s.itl_s]
        return {
            "config": config.name,
            "sessions": 1,
            "requests": len(samples),
            "session_tokens_per_s": statistics.median(s.tokens_per_s for s in samples),
            "itl_p50_ms": 1000 * percentile(itl, 50),
            "itl_p99_ms": 1000 * percentile(itl, 99),
        }
    finally:
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _wait_drafts(address: str, want: set[str], timeout: float = 120.0) -> None:
    """Until the gateway lists exactly the drafts ``want``."""
    from specdec.client import Client

    deadline = time.monotonic() + timeout
    with Client(address, timeout=2) as client:
        while time.monotonic() < deadline:
            drafts = {w.worker_id for w in client.list_workers() if int(w.kind) == 1}
            if drafts == want:
                return
            time.sleep(0.2)
    raise TimeoutError(f"the gateway did not list the drafts {sorted(want)} within {timeout}s")


def _reference_outputs(requests: list[list[Request]]) -> dict[int, list[int]]:
    """Prompt index -> the greedy tokens of its first counted request."""
    outputs: dict[int, list[int]] = {}
    for session in requests:
        for request in session:
            outputs.setdefault(request.prompt, request.sample.token_ids)
    return outputs


def add_limits(rows: list[dict[str, Any]], limit_tok_s: float) -> None:
    """Each row's per-session speed as a share of the bandwidth limit (one token a weight
    read), and its aggregate in units of that limit."""
    for row in rows:
        if limit_tok_s > 0:
            row["of_limit"] = row["session_tokens_per_s"] / limit_tok_s
            if "aggregate_tokens_per_s" in row:
                row["aggregate_x_limit"] = row["aggregate_tokens_per_s"] / limit_tok_s


def add_theory(rows: list[dict[str, Any]], draft_step_ms: float) -> None:
    """Speculative rows: speedup over the oracle alone at the same N, Leviathan's theory,
    efficiency (module doc)."""
    alone = {r["sessions"]: r for r in rows if r.get("kind") == "alone"}
    for row in rows:
        base = alone.get(row["sessions"])
        if row.get("kind") != "spec" or base is None or not row.get("mean_k"):
            continue
        step_ms = 1000 / base["session_tokens_per_s"]
        k = max(1, round(row["mean_k"]))
        theory = expected_tokens(row["alpha"], k) / (k * draft_step_ms / step_ms + 1)
        row["speedup"] = row["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
        row["theoretical_speedup"] = theory
        row["efficiency"] = row["speedup"] / theory if theory > 0 else 0.0


def check_targets(rows: list[dict[str, Any]], hf: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 26's targets, each as (value, goal, met); missing rows are left out."""

    def find(kind: str, sessions: int, acceptance: float | None = None) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r.get("kind") == kind
                and r["sessions"] == sessions
                and (acceptance is None or r.get("acceptance") == acceptance)
            ),
            None,
        )

    out: dict[str, Any] = {}

    def put(name: str, value: float | None, at_least: bool) -> None:
        if value is None:
            return
        goal = TARGETS[name]
        out[name] = {
            "value": value,
            "goal": goal,
            "met": value >= goal if at_least else value <= goal,
        }

    one, sixteen = find("alone", 1), find("alone", 16)
    if one is not None:
        put("alone_1_of_limit", one.get("of_limit"), True)
        if hf:
            put("alone_1_vs_hf", one["session_tokens_per_s"] / hf["session_tokens_per_s"], True)
    if sixteen is not None:
        put("alone_16_aggregate", sixteen.get("aggregate_vs_base"), True)
        put("alone_16_itl_p99", sixteen.get("itl_p99_vs_base"), False)
    spec_one, spec_sixteen = find("spec", 1, 0.8), find("spec", 16, 0.8)
    if spec_one is not None:
        put("spec_1_efficiency", spec_one.get("efficiency"), True)
    if spec_sixteen is not None:
        put("spec_16_aggregate", spec_sixteen.get("aggregate_vs_base"), True)
        put("spec_16_itl_p99", spec_sixteen.get("itl_p99_vs_base"), False)
    sixty_four = find("alone", 64)
    if sixty_four is not None:
        out["alone_64_admitted"] = {
            "value": sixty_four["requests"],
            "goal": "every request served",
            "met": sixty_four["requests"] == 64 * sixty_four["requests_per_session"],
        }
    out["mismatched_outputs"] = {
        "value": sum(r.get("mismatched_outputs", 0) for r in rows),
        "goal": 0,
        "met": all(r.get("mismatched_outputs", 0) == 0 for r in rows),
    }
    return out


COLUMNS = [
    ("config", "config", "{}"),
    ("sessions", "N", "{}"),
    ("aggregate_tokens_per_s", "agg tok/s", "{:.0f}"),
    ("aggregate_vs_base", "agg x", "{:.2f}x"),
    ("session_tokens_per_s", "sess tok/s", "{:.1f}"),
    ("of_limit", "of limit", "{:.0%}"),
    ("itl_p50_ms", "ITL p50", "{:.2f}"),
    ("itl_p99_ms", "ITL p99", "{:.2f}"),
    ("itl_p99_vs_base", "p99 x", "{:.2f}x"),
    ("acceptance_rate", "accept", "{:.2f}"),
    ("mean_k", "k", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("theoretical_speedup", "theory", "{:.2f}x"),
    ("efficiency", "effic.", "{:.2f}"),
    ("verify_ms_per_round", "verify ms", "{:.2f}"),
    ("oracle_rows_per_batch", "rows/batch", "{:.1f}"),
    ("mismatched_outputs", "mismatch", "{}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    return format_table(rows, COLUMNS)


def _stamp(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_real_scale(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """Every step of the module doc; prints the table, writes ``args.out``."""
    import torch

    from specdec.bench.concurrency import environment
    from specdec.bench.shapes import SHAPES, parameters, parse
    from specdec.drafters.controlled import Reference, References
    from specdec.engine.models import DEMO_DRAFT, DEMO_ORACLE
    from specdec.launch import cluster

    name = args.real_scale if args.real_scale.startswith("random:") else f"random:{args.real_scale}"
    key, shape = parse(name)
    args.oracle_path = name
    acceptances = _floats(args.acceptances, "--acceptances")
    alone_sessions = _ints(args.alone_sessions, "--alone-sessions")
    spec_sessions = _ints(args.spec_sessions, "--spec-sessions")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    bandwidth = args.bandwidth_gbs or nominal_bandwidth_gbs(device_name)
    itemsize = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    weight_bytes = parameters(shape, 8192) * itemsize
    limit = bandwidth * 1e9 / weight_bytes if bandwidth else 0.0
    step_ms = args.draft_step_ms if args.draft_step_ms >= 0 else demo_draft_step_ms()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    outputs: list[list[list[Request]]] = []
    report: dict[str, Any] = {
        "command": "specdec " + " ".join(sys.argv[1:]),
        "environment": environment(args),
        "device_name": device_name,
        "shape": {"name": key, **shape.__dict__, "known": key in SHAPES},
        "weight_bytes": weight_bytes,
        "bandwidth_gbs": bandwidth,
        "bandwidth_limit_tokens_per_s": limit,
        "draft_step_ms": step_ms,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "hf_generate": None,
        "rows": rows,
        "complete": False,
    }

    def save() -> None:
        add_ratios(rows)
        mark_mismatches(rows, outputs)
        add_limits(rows, limit)
        add_theory(rows, step_ms)
        report["targets"] = check_targets(rows, report["hf_generate"])
        report["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2, default=str))

    _stamp(
        f"{key}: {weight_bytes / 1e9:.1f} GB of weights on {device_name} ({bandwidth:.0f} GB/s): "
        f"limit {limit:.1f} tok/s; benchmark drafter at {step_ms:.2f} ms a token"
    )
    if args.hf_prompts > 0:
        report["hf_generate"] = hf_generate(args, prompts)
        _stamp(f"HF generate: {report['hf_generate']['session_tokens_per_s']:.1f} tok/s")
        save()
    env = {"OMP_NUM_THREADS": str(args.threads), "SPECDEC_LOG_LEVEL": "warning"}
    biggest = max([*alone_sessions, *spec_sessions])
    with tempfile.TemporaryDirectory() as workdir, cluster(Path(workdir), env) as c:
        c.start_gateway("--tokenizer", str(DEMO_ORACLE), "--default-max-new-tokens", "512")
        oracle = c.start_oracle(
            name, "--device", args.device, "--dtype", args.dtype, "--log-level", "info",
            "--max-sessions", str(2 * max(64, biggest)), oracle_id="oracle",
        )  # fmt: skip
        try:
            c.wait_workers(oracles=1, drafts=0, timeout=900)
            _stamp("oracle serving")
            oracle_address = f"127.0.0.1:{oracle.port}"
            plan = Plan(prompts, args.max_new_tokens, args.requests_per_session, False)

            async def alone() -> None:
                for n in alone_sessions:
                    window = await _measure_point(
                        c.address, oracle_address, Point(None, 0, n), plan
                    )
                    await _quiet(c.address)
                    row = summarize(Point(None, 0, n), window, plan)
                    row.update(kind="alone", config="oracle alone")
                    rows.append(row)
                    outputs.append(window.requests)
                    save()
                    _stamp(f"oracle alone N={n}: {row['aggregate_tokens_per_s']:.0f} tok/s")

            asyncio.run(alone())
            first = next(i for i, r in enumerate(rows) if r["kind"] == "alone")
            refs = _reference_outputs(outputs[first])
            path = Path(workdir) / "references.json"
            References.dump(
                path, [Reference(tuple(prompts[i]), tuple(t)) for i, t in sorted(refs.items())]
            )
            spec_plan = Plan(prompts, args.max_new_tokens, args.requests_per_session, True)
            for acceptance in acceptances:
                draft_id = f"bench-draft-{acceptance:g}"
                draft = c.start_draft(
                    str(DEMO_DRAFT), "--bench-acceptance", str(acceptance),
                    "--bench-reference", str(path), "--bench-step-ms", f"{step_ms:.4f}",
                    "--max-sessions", str(2 * max(64, biggest)), draft_id=draft_id,
                )  # fmt: skip
                _wait_drafts(c.address, {draft_id})

                async def spec(acceptance: float = acceptance) -> None:
                    for n in spec_sessions:
                        point = Point(None, args.spec_k, n)
                        window = await _measure_point(c.address, oracle_address, point, spec_plan)
                        await _quiet(c.address)
                        row = summarize(point, window, spec_plan)
                        row.update(
                            kind="spec",
                            config=f"speculative a={acceptance:g}",
                            acceptance=acceptance,
                            max_batch=f"a={acceptance:g}",  # its own ratio baseline (N = 1)
                        )
                        rows.append(row)
                        outputs.append(window.requests)
                        save()
                        _stamp(
                            f"speculative a={acceptance:g} N={n}: "
                            f"{row['aggregate_tokens_per_s']:.0f} tok/s, accept "
                            f"{row['acceptance_rate']:.2f}, k {row['mean_k']:.1f}"
                        )

                asyncio.run(spec())
                draft.terminate()
                c.services.remove(draft)
                _wait_drafts(c.address, set())
        finally:
            report["oracle_log_tail"] = oracle.log()[-6000:]
            save()
    report["complete"] = True
    save()
    hf = report["hf_generate"]
    lines = [table(([{**hf, "config": hf["config"]}] if hf else []) + rows), ""]
    for target, value in report["targets"].items():
        lines.append(f"  {target}: {value['value']} (goal {value['goal']}): "
                     f"{'met' if value['met'] else 'NOT met'}")  # fmt: skip
    print("\n".join(["", *lines, "", f"wrote {out} ({report['wall_s']:.0f}s)"]), flush=True)
    return report
