"""The oracle's batched verify alone: HF caches, static KV slots and paged KV, side by side.

Usage: python scripts/bench_verify.py [--model random:llama-3.1-8b] [--device cuda]
           [--dtype bfloat16] [--batches 1,16] [--ks 0,4] [--paths hf,static,paged]
           [--rounds 40] [--profile] [--out verify.json]

For each batch size B and block size k, B sessions (200-token prompts, at most half the
context) verify a k-token block per round through ``verify_batch`` on each path:

    hf          HF caches, one padded forward
    static      ``SlotPool`` (full-context slots; CUDA graphs on a GPU)
    paged       ``PagedPool``, batch-invariant (the oracle's default)
    paged_fast  ``PagedPool`` without batch invariance (M = rows x tokens)
    paged_chunked  ``PagedPool`` with the chunked reference attention

Graphs are captured on first use, in the warm-up rounds. Prints the median wall time of
a round (the first 5 dropped), each path's time against k = 0 and against B = 1, and the
greedy verdicts that differ from the first path's; with ``--profile``, where one eager
paged forward at the largest B and k spends its GPU time, by kind of kernel. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock, committed_tokens
from specdec.engine.batched import BatchItem, verify_batch
from specdec.engine.models import DEMO_ORACLE, LoadedModel, load_model
from specdec.engine.oracle import Oracle
from specdec.engine.paged_kv import BLOCK_SIZE, MAX_ROW_TOKENS, PagedPool, weight_bytes
from specdec.engine.static_kv import SlotPool

WARMUP_ROUNDS = 5
PROMPT_TOKENS = 200
PATHS = ("hf", "static", "paged", "paged_fast", "paged_chunked")
# Kernel kinds of the profile, by the first matching word in the op's name.
KINDS = (
    ("attention", ("attention", "sdpa", "fmha", "flash")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "addmm", "matmul")),
    ("kv gather/scatter", ("index", "gather", "scatter")),
)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_oracle(model: LoadedModel, path: str, sessions: int, tokens: int) -> Oracle:
    """An oracle whose caches are on ``path``, sized for ``sessions`` of ``tokens`` each."""
    if path == "hf":
        return Oracle(model)
    if path == "static":
        return Oracle(model, SlotPool(model, sessions, max_rows=sessions, cuda_graphs=True))
    blocks = sessions * (-(-(tokens + MAX_ROW_TOKENS) // BLOCK_SIZE) + 1)
    pool = PagedPool(
        model, blocks, max_rows=sessions, cuda_graphs=True, batch_invariant=path != "paged_fast",
        attention="chunked" if path == "paged_chunked" else "auto",
        verify_tokens=max(128, sessions * 5),
    )  # fmt: skip
    return Oracle(model, pool)


def bench(
    model: LoadedModel, device: str, paths: list[str], batch: int, k: int, rounds: int
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(batch * 100 + k)
    length = min(PROMPT_TOKENS, model.max_context // 2)  # room for the rounds' tokens
    prompts = [
        [1, *torch.randint(3, model.vocab_size, (length - 1,), generator=g).tolist()]
        for _ in range(batch)
    ]
    oracles = {p: make_oracle(model, p, batch, length + rounds * (k + 1)) for p in paths}
    caches = {name: [oracle.new_cache() for _ in prompts] for name, oracle in oracles.items()}
    committed = [list(prompt) for prompt in prompts]  # every path verifies the same tokens
    times: dict[str, list[float]] = {name: [] for name in oracles}
    mismatches = dict.fromkeys(paths[1:], 0)
    for _ in range(rounds):
        blocks = [
            DraftBlock(tuple(torch.randint(3, model.vocab_size, (k,), generator=g).tolist()))
            for _ in prompts
        ]
        verdicts = {}
        for name, oracle in oracles.items():
            items = [
                BatchItem(cache, tokens, block, SamplingParams(), 0)
                for cache, tokens, block in zip(caches[name], committed, blocks, strict=True)
            ]
            sync(device)
            start = time.perf_counter()
            results = verify_batch(oracle, items).results
            sync(device)
            times[name].append(time.perf_counter() - start)
            errors = [result for result in results if isinstance(result, Exception)]
            if errors:
                raise errors[0]
            verdicts[name] = [result[0] for result in results]  # type: ignore[index]
        first = verdicts[paths[0]]
        for name in paths[1:]:
            mismatches[name] += sum(a != b for a, b in zip(first, verdicts[name], strict=True))
        for tokens, block, verdict in zip(committed, blocks, first, strict=True):
            tokens.extend(committed_tokens(block, verdict))
    for cache_list in caches.values():  # free the pools before the next point
        for cache in cache_list:
            cache.release()
    oracles.clear()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    row: dict[str, Any] = {"batch": batch, "k": k}
    row.update({f"{n}_ms": statistics.median(ts[WARMUP_ROUNDS:]) * 1e3 for n, ts in times.items()})
    if "hf" in paths and "static" in paths:
        row["ratio"] = row["hf_ms"] / row["static_ms"]
    row["mismatches"] = sum(mismatches.values())
    row["mismatches_by_path"] = mismatches
    return row


def relate(rows: list[dict[str, Any]], paths: list[str]) -> None:
    """Each row's time against the same path at k = min k (same B) and at B = min B (same k)."""
    for row in rows:
        least_k = min(r["k"] for r in rows if r["batch"] == row["batch"])
        least_b = min(r["batch"] for r in rows if r["k"] == row["k"])
        by_k = next(r for r in rows if r["batch"] == row["batch"] and r["k"] == least_k)
        by_b = next(r for r in rows if r["k"] == row["k"] and r["batch"] == least_b)
        for path in paths:
            row[f"{path}_vs_k{least_k}"] = row[f"{path}_ms"] / by_k[f"{path}_ms"]
            row[f"{path}_vs_b{least_b}"] = row[f"{path}_ms"] / by_b[f"{path}_ms"]


def profile(model: LoadedModel, batch: int, k: int, device: str) -> dict[str, Any]:
    """GPU (or CPU) time of one eager paged forward of ``batch`` rows x (k + 1) tokens, by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pool = PagedPool(
        model, batch * 20, max_rows=batch, cuda_graphs=False, verify_tokens=max(128, batch * 5)
    )
    caches = [pool.new_cache() for _ in range(batch)]
    for cache in caches:
        pool.prefill(cache, [1, *range(3, PROMPT_TOKENS + 2)])
    rows = [[5] * (k + 1) for _ in caches]

    def run() -> None:
        pool.forward_rows(caches, rows)
        sync(device)

    run()  # warm-up
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        run()
    events = prof.key_averages()
    on_gpu = device.startswith("cuda")

    def took_us(event: Any) -> float:
        """Kernels' own GPU time on a GPU (ops' CPU time on a CPU)."""
        if on_gpu:
            is_kernel = str(getattr(event, "device_type", "")).endswith("CUDA")
            time_us = getattr(event, "self_device_time_total", None)
            if time_us is None:
                time_us = getattr(event, "self_cuda_time_total", 0)
            return float(time_us or 0) if is_kernel else 0.0
        return float(event.self_cpu_time_total) if event.key.startswith("aten::") else 0.0

    kinds: dict[str, float] = {}
    for event in events:
        name = event.key.lower()
        kind = next((kind for kind, words in KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + took_us(event)
    top = sorted(events, key=took_us, reverse=True)
    total = sum(kinds.values()) or 1.0
    start = time.perf_counter()
    run()
    eager_ms = (time.perf_counter() - start) * 1e3
    return {
        "batch": batch,
        "tokens": k + 1,
        "eager_forward_ms": eager_ms,
        "device_ms_by_kind": {kind: us / 1e3 for kind, us in sorted(kinds.items())},
        "share_by_kind": {kind: us / total for kind, us in sorted(kinds.items())},
        "top_ops": [(e.key[:120], took_us(e) / 1e3) for e in top[:15]],
        "weight_gb": weight_bytes(model) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_ORACLE))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--ks", default="4", help="block sizes k (the forward takes k + 1)")
    parser.add_argument("--paths", default="hf,static,paged", help=f"of {', '.join(PATHS)}")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = []
    for b in (int(b) for b in args.batches.split(",")):
        for k in (int(k) for k in args.ks.split(",")):
            rows.append(bench(model, args.device, paths, b, k, args.rounds))
            took = ", ".join(f"{p} {rows[-1][f'{p}_ms']:.2f} ms" for p in paths)
            print(f"  B={b} k={k}: {took}", flush=True)
    relate(rows, paths)
    header = f"{'B':>3}  {'k':>2}  " + "  ".join(f"{p + ' ms':>16}" for p in paths)
    print(header)
    for row in rows:
        cells = "  ".join(f"{row[f'{p}_ms']:>16.2f}" for p in paths)
        print(f"{row['batch']:>3}  {row['k']:>2}  {cells}  mismatches {row['mismatches']}")
    report: dict[str, Any] = {"command": vars(args), "rows": rows}
    if args.profile:
        biggest = max(rows, key=lambda r: (r["batch"], r["k"]))
        report["profile"] = profile(model, biggest["batch"], biggest["k"], args.device)
        shares = report["profile"]["share_by_kind"]
        print(
            "profile (eager paged forward): " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
