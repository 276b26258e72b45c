"""The oracle's batched verify alone: HF caches against static KV slots, side by side.

Usage: python scripts/bench_verify.py [--device cuda] [--dtype float32] [--batches 1,4,16]
                                      [--rounds 40] [--out verify.json]

For each batch size B, B sessions (200-token prompts, at most half the context)
verify a 4-token block per round through ``verify_batch`` twice: on HF caches and on
a ``SlotPool`` (CUDA graphs on a GPU, captured before timing). Prints the median wall
time of a round (the first 5 rounds dropped) and the greedy verdicts that differ, and
writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock, committed_tokens
from specdec.engine.batched import BatchItem, verify_batch
from specdec.engine.models import DEMO_ORACLE, load_model
from specdec.engine.oracle import Oracle
from specdec.engine.static_kv import SlotPool

WARMUP_ROUNDS = 5
PROMPT_TOKENS = 200


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(model_path: str, device: str, dtype: str, batch: int, rounds: int) -> dict[str, float]:
    model = load_model(model_path, device=device, dtype=dtype)
    pool = SlotPool(model, batch, max_rows=batch, cuda_graphs=True)
    pool.capture_all()
    oracles = {"hf": Oracle(model), "static": Oracle(model, pool)}
    g = torch.Generator().manual_seed(batch)
    length = min(PROMPT_TOKENS, model.max_context // 2)  # room for the rounds' tokens
    prompts = [
        [1, *torch.randint(3, model.vocab_size, (length - 1,), generator=g).tolist()]
        for _ in range(batch)
    ]
    caches = {name: [oracle.new_cache() for _ in prompts] for name, oracle in oracles.items()}
    committed = [list(prompt) for prompt in prompts]  # both sides verify the same tokens
    times: dict[str, list[float]] = {name: [] for name in oracles}
    mismatches = 0
    for _ in range(rounds):
        blocks = [
            DraftBlock(tuple(torch.randint(3, model.vocab_size, (4,), generator=g).tolist()))
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
        mismatches += sum(a != b for a, b in zip(verdicts["hf"], verdicts["static"], strict=True))
        for tokens, block, verdict in zip(committed, blocks, verdicts["hf"], strict=True):
            tokens.extend(committed_tokens(block, verdict))
    row = {f"{name}_ms": statistics.median(ts[WARMUP_ROUNDS:]) * 1e3 for name, ts in times.items()}
    return {
        "batch": batch,
        **row,
        "ratio": row["hf_ms"] / row["static_ms"],
        "mismatches": mismatches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_ORACLE))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = [
        bench(args.model, args.device, args.dtype, int(b), args.rounds)
        for b in args.batches.split(",")
    ]
    print(f"{'B':>3}  {'HF ms':>7}  {'static ms':>9}  {'ratio':>6}  mismatches")
    for row in rows:
        print(
            f"{row['batch']:>3}  {row['hf_ms']:>7.2f}  {row['static_ms']:>9.2f}  "
            f"{row['ratio']:>5.1f}x  {row['mismatches']}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": vars(args), "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
