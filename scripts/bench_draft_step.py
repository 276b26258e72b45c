"""A draft's one-token step on the CPU, timed in P processes at once.

Usage: python scripts/bench_draft_step.py [--model PATH] [--quantize auto|none]
                                          [--processes 1,16] [--steps 200] [--out step.json]

For each process count P, P processes start together (one torch thread each, as the
drafts of ``specdec bench`` run), load the draft as the draft service does
(``--quantize``: ``auto`` gives a float32 CPU draft int8 weights), prefill 100 tokens
(at most half the context) on the lean forward and time ``--steps`` one-token steps,
rolling back to the prefix every 50. Each process reports its median step; the table
gives the median and the slowest of those, and the median against the first count.

What it isolates: how much N drafts sharing one host slow each other down with no
oracle, gateway or network beside them (the 16-session benchmark's drafts share the
H200 host's cores), and what a change to the draft's forward is worth per step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import time
from multiprocessing.synchronize import Barrier
from typing import Any

PREFIX_TOKENS = 100
ROLLBACK_EVERY = 50


def _worker(model: str, quantize: str, steps: int, barrier: Barrier, results: Any) -> None:
    """Load, wait for every process of this count, time ``steps`` steps, report the median."""
    import torch

    torch.set_num_threads(1)
    from specdec.drafters.model_drafter import ModelDrafter
    from specdec.engine.quantize import load_draft_model

    loaded = load_draft_model(model, "cpu", "float32", quantize)
    cache = ModelDrafter(loaded).cache
    prefix = min(PREFIX_TOKENS, loaded.max_context // 2)
    rollback_every = min(ROLLBACK_EVERY, loaded.max_context // 4)
    tokens = [3 + i % (loaded.vocab_size - 3) for i in range(prefix + rollback_every)]
    cache.extend(tokens[:prefix])
    barrier.wait()
    times = []
    for step in range(steps):
        if step % rollback_every == 0:
            cache.rollback(prefix)
        start = time.perf_counter()
        cache.extend([tokens[prefix + step % rollback_every]])
        times.append(time.perf_counter() - start)
    results.put(statistics.median(times) * 1e3)


def measure(model: str, quantize: str, processes: int, steps: int) -> dict[str, Any]:
    """One process count: every process's median step, in ms."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_worker, args=(model, quantize, steps, barrier, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    medians: list[float] = []
    while len(medians) < processes:
        try:
            medians.append(results.get(timeout=1))
        except queue.Empty:
            failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if failed:
                for worker in workers:
                    worker.terminate()
                raise RuntimeError(f"a timing process failed (exit code {failed[0]})") from None
    for worker in workers:
        worker.join()
    medians.sort()
    return {
        "processes": processes,
        "median_ms": statistics.median(medians),
        "slowest_ms": medians[-1],
        "process_medians_ms": medians,
    }


def main() -> None:
    from specdec.engine.models import DEMO_DRAFT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_DRAFT))
    parser.add_argument("--quantize", default="auto", choices=["auto", "none"])
    parser.add_argument("--processes", default="1,16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    counts = [int(p) for p in args.processes.split(",")]
    rows = [measure(args.model, args.quantize, p, args.steps) for p in counts]
    for row in rows:
        row["vs_first"] = row["median_ms"] / rows[0]["median_ms"]
    print(f"{'P':>3}  {'median ms':>9}  {'slowest ms':>10}  {'vs first':>8}")
    for row in rows:
        print(
            f"{row['processes']:>3}  {row['median_ms']:>9.3f}  {row['slowest_ms']:>10.3f}  "
            f"{row['vs_first']:>7.2f}x"
        )
    if args.out:
        environment = {"cpus": os.cpu_count(), "machine": platform.machine()}
        with open(args.out, "w") as f:
            json.dump(
                {"command": vars(args), "environment": environment, "rows": rows}, f, indent=2
            )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
