"""`specdec bench`: every configuration through the real gateway, side by side, in one run.

Starts a gateway, an oracle and a draft, with a delay proxy between the draft
and the oracle, then runs each prompt through every configuration in turn
(prompt-major order, so drift on a noisy machine hits all configurations
alike): the oracle alone (k = 0), fixed k, adaptive k, the request's defaults
(no speculation settings at all), the n-gram drafter, each model-drafted
configuration at every added round trip; plus two in-process baselines on the
same models: HF ``generate`` of the oracle alone and HF assisted generation.

The workloads ``greedy-useless`` and ``sample-useless`` run the draft
configurations again with a useless draft (``workload.useless_draft``: the draft's
architecture and tokenizer, random weights), in a system of their own started
after the first, each against the oracle alone of that system. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdec.bench.measure import Result, Sample, table
from specdec.bench.proxy import DelayProxy
from specdec.bench.real_scale import add_real_scale_arguments
from specdec.bench.shapes import tokenizer_source

WORKLOADS = ("greedy", "sample", "greedy-useless", "sample-useless")
USELESS = "-useless"  # the workloads drafted by a useless draft (random weights)
BASELINE = "oracle alone (k=0)"
DEFAULTS = "draft defaults"  # a request without speculation settings


@dataclass(frozen=True)
class Config:
    name: str
    k: int | None  # None: the gateway's default
    adaptive: bool | None = False  # None: the gateway's default
    drafter: str | None = None  # None: the gateway's choice (model when registered)
    delay_ms: float = 0.0
    hf: str = ""  # "alone" / "assisted": in-process baselines
    pipeline_depth: int | None = None  # None: the draft's default
    branches: int | None = None  # None: the draft's default
    rescue: bool | None = None  # None: the draft's default


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark speculation against the oracle alone and HF")
    p.add_argument("--oracle-model", default="", help="default: the demo oracle")
    p.add_argument("--draft-model", default="", help="default: the demo draft")
    p.add_argument("--device", default="cpu", help="the oracle's device (cpu, cuda)")
    p.add_argument("--draft-device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--draft-dtype",
        default="",
        help="the draft's dtype (default: --dtype); float32 keeps int8 draft weights on a CPU",
    )
    p.add_argument(
        "--prompt-data",
        action="append",
        default=[],
        help="cut the prompts from the test documents of this text instead (what "
        "`specdec distill --data` took; repeatable)",
    )
    p.add_argument(
        "--heldout-permille",
        type=int,
        default=50,
        help="with --prompt-data: the held-out share `specdec distill` used (default 50)",
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=192)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--long-tokens", type=int, default=512, help="long-output case (0 = skip)")
    p.add_argument("--ks", default="2,4,8", help="fixed k values")
    p.add_argument(
        "--adaptive-caps",
        default="",
        help="the controller's k caps to compare, e.g. 8,12,16 (default: the largest of --ks)",
    )
    p.add_argument("--delays", default="0,10,50", help="added draft-oracle round trips, ms")
    p.add_argument(
        "--workloads",
        default="greedy,sample",
        help=f"any of {', '.join(WORKLOADS)}: greedy, sampled (T=1), and the same with a "
        "useless draft (random weights, the draft's tokenizer)",
    )
    p.add_argument(
        "--pipeline-depths",
        default="",
        help="compare blocks in flight, e.g. 1,2 (default: the draft's setting only)",
    )
    p.add_argument(
        "--branches",
        default="",
        help="compare likely corrections drafted ahead, e.g. 0,3 (default: the draft's only)",
    )
    p.add_argument(
        "--rescue",
        default="",
        help="compare the oracle drafting after a miss off and on, e.g. 0,1; the oracle "
        "then gets the draft model as rescue draft (default: none, no rescue)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip the in-process HF baselines")
    p.add_argument("--threads", type=int, default=1, help="compute threads per process")
    p.add_argument(
        "--out",
        default="",
        help="default: bench_results/bench.json (concurrency.json with --sessions)",
    )
    p.add_argument(
        "--tracing-overhead",
        action="store_true",
        help="instead: tokens/s with tracing on against off, side by side",
    )
    p.add_argument("--tracing-reps", type=int, default=3)
    p.add_argument(
        "--http",
        action="store_true",
        help="instead: the OpenAI-compatible HTTP API's time per output token against "
        "gRPC Generate's, side by side (greedy, oracle alone and k=4)",
    )
    p.add_argument("--http-reps", type=int, default=2, help="with --http: passes over the prompts")
    p.add_argument(
        "--session-stores",
        default="",
        help="instead: time per output token with the gateway's session store in memory "
        "and on these, side by side, e.g. memory,sqlite,redis (redis: a local redis-server)",
    )
    p.add_argument("--store-reps", type=int, default=3, help="with --session-stores: repeats")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="instead: the core loop against HF generate, in this process",
    )
    p.add_argument(
        "--sessions",
        default="",
        help="instead: this many concurrent sessions each, e.g. 1,16 (specdec.bench.concurrency)",
    )
    p.add_argument("--session-ks", default="0,4", help="with --sessions: k values")
    p.add_argument("--drafts", type=int, default=1, help="with --sessions: draft services")
    p.add_argument(
        "--draft-nice",
        type=int,
        default=0,
        help="with --sessions: CPU niceness of the drafts (they stand in for edge devices: "
        "keep them from slowing the oracle's host)",
    )
    p.add_argument(
        "--oracle-cpus",
        default="",
        help="with --sessions: CPUs of the oracle and the gateway, e.g. 0-3 (default: any)",
    )
    p.add_argument(
        "--draft-cpus",
        default="",
        help="with --sessions: CPUs of the drafts, e.g. 4-15 (default: any); drafts on "
        "CPUs of their own stand in for edge devices more faithfully",
    )
    p.add_argument("--adaptive", action="store_true", help="with --sessions: adaptive k (<= k)")
    p.add_argument(
        "--oracle-max-batch",
        default="",
        help="with --sessions: oracle --max-batch values, e.g. 1,16 (default: the oracle's own)",
    )
    p.add_argument(
        "--requests-per-session",
        type=int,
        default=2,
        help="with --sessions: counted requests per session (more when N < --prompts)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="with --sessions: measure every session count this many times, alternating, "
        "and pool the windows (a drifting host then weighs on all counts alike)",
    )
    add_real_scale_arguments(p)
    p.set_defaults(func=run_bench)


class ProxyThread:
    """A DelayProxy on its own event loop thread, controllable from this thread."""

    def __init__(self, target_port: int) -> None:
        self.proxy = DelayProxy("127.0.0.1", target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)


def _gateway_sample(
    client: Any, prompt: list[int], cfg: Config, sampling: dict[str, Any]
) -> Sample:
    start = time.perf_counter()
    sample = Sample(0, 0.0, 0.0)
    for response in client.stream(
        prompt, k=cfg.k, adaptive=cfg.adaptive, drafter=cfg.drafter, ignore_eos=True,
        pipeline_depth=cfg.pipeline_depth, branches=cfg.branches, rescue=cfg.rescue,
        **sampling,
    ):  # fmt: skip
        sample.arrive(response.token_ids, time.perf_counter(), start)
        if response.finish_reason:
            sample.stats = response.stats
    sample.seconds = time.perf_counter() - start
    return sample


class _Timer:
    """A transformers streamer that records when tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, int]] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass


def _hf_sample(oracle: Any, draft: Any, prompt: list[int], cfg: Config, sampling: dict[str, Any],
               max_new_tokens: int) -> Sample:  # fmt: skip
    import torch

    ids = torch.tensor([prompt], device=oracle.device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}
    if sampling.get("temperature", 0.0) > 0:
        kwargs.update(do_sample=True, temperature=sampling["temperature"], top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    if cfg.hf == "assisted":
        kwargs["assistant_model"] = draft
    timer = _Timer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = oracle.generate(ids, streamer=timer, pad_token_id=0, **kwargs)
    seconds = time.perf_counter() - start
    generated = [int(t) for t in out[0, len(prompt) :]]
    sample = Sample(0, seconds, seconds)
    for when, n in timer.times:
        sample.arrive(generated[sample.tokens : sample.tokens + n], when, start)
    sample.tokens, sample.token_ids = len(generated), generated
    return sample


def _configs(args: argparse.Namespace) -> list[Config]:
    ks = [int(k) for k in args.ks.split(",") if k]
    delays = [float(d) for d in args.delays.split(",") if d]
    depths = [int(d) for d in args.pipeline_depths.split(",") if d] or [0]
    widths = [int(b) for b in args.branches.split(",") if b] or [-1]
    rescues: list[bool | None] = [bool(int(r)) for r in args.rescue.split(",") if r]
    rescues = rescues or [None]
    configs = [Config(BASELINE, 0), Config("ngram k=4", 4, drafter="ngram")]
    for delay in delays:
        configs.append(Config(DEFAULTS, None, None, delay_ms=delay))
        for depth, width, rescue in itertools.product(depths, widths, rescues):
            tag = f" pipe={depth}" if len(depths) > 1 else ""
            tag += f" br={width}" if len(widths) > 1 else ""
            tag += f" rec={int(bool(rescue))}" if len(rescues) > 1 else ""
            pipe, branches = depth or None, None if width < 0 else width
            configs += [
                Config(f"draft k={k}{tag}", k, delay_ms=delay, pipeline_depth=pipe,
                       branches=branches, rescue=rescue)
                for k in ks
            ]  # fmt: skip
            caps = [int(c) for c in args.adaptive_caps.split(",") if c] or [max(ks)]
            configs += [
                Config(f"draft adaptive{f' k<={cap}' if args.adaptive_caps else ''}{tag}",
                       cap, True, delay_ms=delay, pipeline_depth=pipe, branches=branches,
                       rescue=rescue)
                for cap in caps
            ]  # fmt: skip
    if not args.no_hf:
        configs += [Config("HF generate (oracle)", 0, hf="alone"),
                    Config("HF assisted (draft)", 0, hf="assisted")]  # fmt: skip
    return configs


def run_bench(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.bench.workload import heldout_prompts, useless_draft
    from specdec.engine.models import DEMO_DRAFT, DEMO_ORACLE

    torch.set_num_threads(args.threads)
    if not args.out:
        args.out = (
            "bench_results/real_scale.json"
            if args.real_scale
            else "bench_results/concurrency.json"
            if args.sessions
            else "bench_results/http.json"
            if args.http
            else "bench_results/bench.json"
        )
    oracle_path = args.oracle_model or str(DEMO_ORACLE)
    draft_path = args.draft_model or str(DEMO_DRAFT)
    if args.real_scale:
        oracle_path = f"random:{args.real_scale.removeprefix('random:')}"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(oracle_path))
    if args.prompt_data:
        from specdec.training.domain import heldout_prompts as domain_prompts

        prompts = domain_prompts(
            args.prompt_data, lambda text: tokenizer(text)["input_ids"], args.prompts,
            args.prompt_tokens, args.heldout_permille,
        )  # fmt: skip
    else:
        prompts = heldout_prompts(
            lambda text: tokenizer(text)["input_ids"], args.prompts, args.prompt_tokens
        )
    if args.real_scale:
        from specdec.bench.real_scale import run_real_scale

        args.draft_path = draft_path
        run_real_scale(args, prompts)
        return
    if args.in_process:
        from specdec.bench.core import run_in_process

        args.oracle_path, args.draft_path = oracle_path, draft_path
        run_in_process(args, prompts)
        return
    if args.sessions:
        from specdec.bench.concurrency import run_concurrency

        args.oracle_path, args.draft_path = oracle_path, draft_path
        run_concurrency(args, prompts)
        return
    if args.http or args.session_stores or args.tracing_overhead:  # side by side
        from specdec.bench.http import run_http_overhead
        from specdec.bench.store import run_store_overhead
        from specdec.bench.tracing import run_tracing_overhead

        args.oracle_path, args.draft_path = oracle_path, draft_path
        side_by_side = (
            run_http_overhead
            if args.http
            else run_store_overhead
            if args.session_stores
            else run_tracing_overhead
        )
        outcome = side_by_side(args, prompts)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(outcome, indent=2))
        return
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}: choose from {', '.join(WORKLOADS)}")
    configs = _configs(args)
    hf: tuple[Any, Any] | None = None
    if not args.no_hf:
        dtypes = (args.dtype, args.draft_dtype or args.dtype)
        hf = tuple(  # type: ignore[assignment]
            AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
            .to(args.device)
            .eval()
            for path, dtype in zip((oracle_path, draft_path), dtypes, strict=True)
        )
    cases = [(w, args.max_new_tokens, configs) for w in workloads if not w.endswith(USELESS)]
    if args.long_tokens:
        long_configs = [cf for cf in configs if cf.delay_ms == 0 and cf.k in (0, 4, None)]
        cases.append(("greedy-long", args.long_tokens, long_configs))
    # The useless draft's own system: its draft configurations against its oracle alone.
    drafting = [cf for cf in configs if not cf.hf and cf.drafter is None]
    useless = [(w, args.max_new_tokens, drafting) for w in workloads if w.endswith(USELESS)]
    rows: list[dict[str, Any]] = []
    drafted: list[dict[str, Any]] = []  # the rows of the draft model's configurations
    with tempfile.TemporaryDirectory() as workdir:
        phases = [(draft_path, cases, hf)]
        if useless:
            random_draft = useless_draft(draft_path, Path(workdir) / "useless-draft", seed=0)
            phases.append((str(random_draft), useless, None))
        for phase_draft, phase_cases, phase_hf in phases:
            if phase_cases:
                found = _run_system(args, oracle_path, phase_draft, phase_cases, prompts, phase_hf)
                rows += found[0]
                drafted += found[1]
    round_trip = round_trip_retention(drafted)
    report = {
        "command": "specdec " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "device": args.device,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else ""},
        "models": {"oracle": oracle_path, "draft": draft_path},
        "prompt_data": args.prompt_data,
        "prompts": len(prompts),
        "rows": rows,
        "round_trip": round_trip,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    lines = [
        f"{r['workload']} +{r['delay_ms']:g} ms: best {r['best_speedup']:.2f}x "
        f"({r['best_config']}) keeps {r['retained']:.0%} of the best at 0 ms, "
        f"{r['best_0ms_speedup']:.2f}x ({r['best_0ms_config']})"
        for r in round_trip
    ]
    print("\n".join(["", table(rows), "", *lines, "", f"wrote {out}"]))


Case = tuple[str, int, list[Config]]  # (workload, max_new_tokens, configurations)


def _run_system(
    args: argparse.Namespace,
    oracle_path: str,
    draft_path: str,
    cases: list[Case],
    prompts: list[list[int]],
    hf: tuple[Any, Any] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Start a gateway, an oracle and a draft of ``draft_path`` and measure ``cases``:
    (every row, the rows of the draft model's configurations)."""
    from specdec.client import Client
    from specdec.launch import cluster, free_port

    env = {"OMP_NUM_THREADS": str(args.threads), "SPECDEC_LOG_LEVEL": "warning"}
    oracle_port = free_port()
    proxy = ProxyThread(oracle_port)
    rows: list[dict[str, Any]] = []
    drafted: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir, cluster(Path(workdir), env) as c:
        c.start_gateway(
            "--tokenizer", tokenizer_source(oracle_path), "--default-max-new-tokens", "512"
        )
        rescue = ["--rescue-draft", draft_path] if args.rescue else []
        c.start_oracle(
            oracle_path, "--device", args.device, "--dtype", args.dtype,
            "--public-address", f"127.0.0.1:{proxy.port}", *rescue, port=oracle_port,
        )  # fmt: skip
        draft_dtype = args.draft_dtype or args.dtype
        c.start_draft(draft_path, "--device", args.draft_device, "--dtype", draft_dtype)
        c.wait_workers(oracles=1, drafts=1)
        with Client(c.address, timeout=600) as client:
            for workload, max_new, case_configs in cases:
                found = _measure(client, proxy, workload, max_new, case_configs, prompts, hf)
                rows += found
                drafted += [
                    row
                    for cf, row in zip(case_configs, found, strict=True)
                    if cf.k != 0 and not cf.hf and cf.drafter is None
                ]
                if len(cases) > 1:
                    print(table(found), flush=True)
    proxy.stop()
    return rows, drafted


def _measure(
    client: Any,
    proxy: ProxyThread,
    workload: str,
    max_new: int,
    configs: list[Config],
    prompts: list[list[int]],
    hf: tuple[Any, Any] | None,
) -> list[dict[str, Any]]:
    """Each prompt through every configuration in turn; one row per configuration, the
    first (the oracle alone) the baseline of the others' speedups."""
    sampling: dict[str, Any] = {"max_new_tokens": max_new}
    if workload.startswith("sample"):
        sampling.update(temperature=1.0, seed=1234)
    case_prompts = prompts if max_new <= 256 else prompts[: max(2, len(prompts) // 4)]
    results = {cf: Result(cf.name, workload, cf.delay_ms, []) for cf in configs}
    warm_up = next(cf for cf in configs if cf.k)
    _gateway_sample(client, prompts[0][:16], warm_up, sampling)
    for i, prompt in enumerate(case_prompts):
        for cf in configs:
            if cf.hf:
                assert hf is not None
                s = _hf_sample(hf[0], hf[1], prompt, cf, sampling, max_new)
            else:
                proxy.proxy.delay_s = cf.delay_ms / 1000
                before = proxy.proxy.bytes_total
                s = _gateway_sample(client, prompt, cf, sampling)
                results[cf].wire_bytes += proxy.proxy.bytes_total - before
            results[cf].samples.append(s)
        print(f"  {workload}: prompt {i + 1}/{len(case_prompts)} done", flush=True)
    base = results[configs[0]]
    assert configs[0].name == BASELINE
    hf_base = next((r for cf, r in results.items() if cf.hf == "alone"), None)
    rows = []
    for cf, result in results.items():
        row = result.summary(None if cf is configs[0] else base)
        if hf_base is not None and cf.hf != "alone":
            row["vs_hf_generate"] = row["tokens_per_s"] / hf_base.summary(None)["tokens_per_s"]
        if not cf.hf:  # sampled too: every draw is the oracle's own at the seed
            row["mismatched_outputs"] = _mismatches(result, base)
        rows.append(row)
    assisted = next((r for cf, r in results.items() if cf.hf == "assisted"), None)
    if assisted is not None:
        hf_tps = assisted.summary(None)["tokens_per_s"]
        for row in rows:
            row["vs_hf_assisted"] = row["tokens_per_s"] / hf_tps
    return rows


def _mismatches(result: Result, base: Result) -> int:
    """Requests whose tokens differ from the oracle alone's for the same prompt: every
    configuration must give exactly the oracle's output (greedy, and sampled with the
    same seed unless the draft sends q: its tokens are then other draws of the same
    distribution)."""
    pairs = zip(result.samples, base.samples, strict=True)
    return sum(a.token_ids != b.token_ids for a, b in pairs)


def round_trip_retention(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload and added round trip, the best speedup of the draft model's
    configurations there against their best at 0 ms (``retained``: the round-trip
    target's ratio, best against best); each row with an added round trip also gets
    ``vs_0ms``, its speedup against the same configuration's at 0 ms."""
    at_zero = {(r["workload"], r["config"]): r for r in rows if r["delay_ms"] == 0}
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        zero = [r for (w, _), r in at_zero.items() if w == workload and "speedup" in r]
        delays = sorted({r["delay_ms"] for r in rows if r["workload"] == workload} - {0})
        if not zero:
            continue
        best_zero = max(zero, key=lambda r: r["speedup"])
        for delay in delays:
            here = [r for r in rows if (r["workload"], r["delay_ms"]) == (workload, delay)]
            for row in here:
                same = at_zero.get((workload, row["config"]))
                if same is not None and same["speedup"] > 0:
                    row["vs_0ms"] = row["speedup"] / same["speedup"]
            best = max(here, key=lambda r: r["speedup"])
            out.append({
                "workload": workload, "delay_ms": delay,
                "best_config": best["config"], "best_speedup": best["speedup"],
                "best_0ms_config": best_zero["config"], "best_0ms_speedup": best_zero["speedup"],
                "retained": best["speedup"] / best_zero["speedup"],
            })  # fmt: skip
    return out


def main(argv: list[str]) -> int:
    """``specdec bench ...`` (argv starts with "bench")."""
    parser = argparse.ArgumentParser(prog="specdec")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)
    return 0
