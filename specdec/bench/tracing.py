"""`specdec bench --tracing-overhead`: tokens/s with every request traced, against untraced.

Two identical systems run side by side on the same models, one with tracing
on (every request sampled, spans exported to a JSON-lines file by a batch
processor) and one with tracing off; requests alternate between them (A, B,
A, B...) so machine noise hits both alike. Reports the median tokens/s of
each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from specdec.bench.measure import Sample


def run_tracing_overhead(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from contextlib import ExitStack

    from specdec.bench.run import Config, _gateway_sample
    from specdec.client import Client
    from specdec.launch import cluster

    oracle_path, draft_path = args.oracle_path, args.draft_path
    config = Config("draft k=4", 4)
    sampling = {"max_new_tokens": args.max_new_tokens}
    samples: dict[str, list[Sample]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as workdir, ExitStack() as stack:
        clients = {}
        for mode in ("off", "on"):
            env = {"OMP_NUM_THREADS": str(args.threads), "SPECDEC_LOG_LEVEL": "warning"}
            if mode == "on":
                env.update(
                    SPECDEC_TRACE_FILE=str(Path(workdir) / "spans.jsonl"),
                    OTEL_TRACES_SAMPLER="always_on",
                )
            folder = Path(workdir) / mode
            folder.mkdir()
            c = stack.enter_context(cluster(folder, env))
            c.start_gateway("--tokenizer", oracle_path)
            c.start_oracle(oracle_path, "--device", args.device, "--dtype", args.dtype)
            c.start_draft(draft_path, "--device", args.draft_device, "--dtype", args.dtype)
            c.wait_workers(oracles=1, drafts=1)
            clients[mode] = stack.enter_context(Client(c.address, timeout=600))
        for mode in ("off", "on"):  # warm-up
            _gateway_sample(clients[mode], prompts[0][:16], config, sampling)
        for rep in range(args.tracing_reps):
            order = ("off", "on") if rep % 2 == 0 else ("on", "off")
            for prompt in prompts:
                for mode in order:
                    samples[mode].append(_gateway_sample(clients[mode], prompt, config, sampling))
        spans = sum(1 for _ in (Path(workdir) / "spans.jsonl").open())
    off = statistics.median(s.tokens_per_s for s in samples["off"])
    on = statistics.median(s.tokens_per_s for s in samples["on"])
    paired = statistics.median(
        a.tokens_per_s / b.tokens_per_s for a, b in zip(samples["on"], samples["off"], strict=True)
    )
    result = {
        "requests_per_mode": len(samples["off"]),
        "tokens_per_s_tracing_off": off,
        "tokens_per_s_tracing_on": on,
        "ratio_on_off": on / off,
        "median_paired_ratio": paired,
        "overhead_percent": 100 * (1 - paired),
        "spans_exported": spans,
    }
    print(json.dumps(result, indent=2), flush=True)
    return result
