"""On a GPU: is the paged verify forward right, and batch-invariant? Then its timings.

Usage: python scripts/gpu_check.py [--model random:llama-3.1-8b] [--dtype bfloat16]
                                   [--budget-s 170] [--out check.json]

1. Correctness, per attention kernel (sdpa, chunked), on CUDA graphs:
   * a session's verify logits against HF's forward on the same GPU (relative error);
   * the same session alone and in batches of 16 sessions of other lengths and k, at
     rows 0, 7 and 15: bit-identical logits (``invariant``);
   * 12 greedy tokens decoded alone and inside a batch of 16 decoding sessions: equal;
   * the graphs against the eager forward: bit-identical.
   Without batch invariance (``paged_fast``) only the invariance is checked (informative).
   The first attention that is invariant is printed as ``ATTENTION=<name>`` (the
   benchmark's oracle takes it); none: ``ATTENTION=sdpa`` and a loud warning.
2. ``scripts/bench_verify.py``'s timings of the same model: B = 1, 16 x k = 0, 4 on HF
   caches, slots and paged KV, and the profile of one eager paged forward.
Exits 1 when the paged forward is far from HF's (a bug, not rounding).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from specdec.engine.kv_cache import SequenceCache
from specdec.engine.models import LoadedModel, load_model
from specdec.engine.paged_kv import BLOCK_SIZE, PagedCache, PagedPool

MAX_RELATIVE_ERROR = 0.05  # bf16 rounding is ~1e-2 of the logits' scale; a bug is ~1
SESSIONS = 16


def stamp(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_pool(model: LoadedModel, graphs: bool, invariant: bool, attention: str) -> PagedPool:
    blocks = (SESSIONS + 2) * (-(-420 // BLOCK_SIZE) + 3)
    return PagedPool(
        model, blocks, max_rows=SESSIONS, cuda_graphs=graphs, batch_invariant=invariant,
        attention=attention,
    )  # fmt: skip


def verify_rows(
    pool: PagedPool, sessions: list[tuple[list[int], list[int]]]
) -> tuple[torch.Tensor, list[PagedCache]]:
    """One forward of each (context, block) on fresh caches; logits [R, T, V] (float32)."""
    caches = [pool.new_cache() for _ in sessions]
    for cache, (context, _) in zip(caches, sessions, strict=True):
        pool.prefill(cache, context[:-1])
    forward = pool.forward_rows(caches, [[c[-1], *b] for c, b in sessions])
    return forward.logits, caches


def check(
    model: LoadedModel, attention: str, invariant: bool, g: torch.Generator
) -> dict[str, Any]:
    vocab = model.vocab_size

    def ids(n: int) -> list[int]:
        return [1, *torch.randint(3, vocab, (n - 1,), generator=g).tolist()]

    mine = (ids(150), ids(5)[1:])
    lengths = torch.randint(20, 300, (SESSIONS,), generator=g).tolist()
    ks = torch.randint(0, 9, (SESSIONS,), generator=g).tolist()
    others = [(ids(n), ids(k + 1)[1:]) for n, k in zip(lengths, ks, strict=True)]
    pool = make_pool(model, True, invariant, attention)
    result: dict[str, Any] = {"attention": attention, "batch_invariant": invariant}
    alone, caches = verify_rows(pool, [mine])
    alone = alone[0, : len(mine[1]) + 1]
    for cache in caches:
        cache.release()
    differs = []
    for at in (0, 7, SESSIONS - 1):
        batch = [*others[:at], mine, *others[at : SESSIONS - 1]]
        logits, caches = verify_rows(pool, batch)
        differs.append(not torch.equal(logits[at, : len(mine[1]) + 1], alone))
        for cache in caches:
            cache.release()
    result["invariant"] = not any(differs)
    result["differs_at_rows"] = [
        at for at, d in zip((0, 7, SESSIONS - 1), differs, strict=True) if d
    ]
    if not invariant:
        return result
    reference = SequenceCache(model)
    reference.extend(mine[0][:-1])
    hf = reference.extend([mine[0][-1], *mine[1]])
    scale = float(hf.abs().max())
    result["relative_error_vs_hf"] = float((alone - hf).abs().max()) / scale
    result["argmax_equal_vs_hf"] = bool((alone.argmax(-1) == hf.argmax(-1)).all())
    eager = make_pool(model, False, invariant, attention)
    eager_logits, caches = verify_rows(eager, [mine])
    result["graph_equals_eager"] = bool(torch.equal(eager_logits[0, : len(mine[1]) + 1], alone))
    for cache in caches:
        cache.release()
    del eager

    # Greedy decoding, 12 steps: alone, then inside 16 sessions decoding at once.
    def decode(rows: list[list[int]], steps: int) -> list[list[int]]:
        caches = [pool.new_cache() for _ in rows]
        for cache, row in zip(caches, rows, strict=True):
            pool.prefill(cache, row[:-1])
        out = [list(row) for row in rows]
        for _ in range(steps):
            logits = pool.forward_rows(caches, [[row[-1]] for row in out]).logits
            for cache, row, next_token in zip(
                caches, out, logits[:, 0].argmax(-1).tolist(), strict=True
            ):
                cache.adopt([row[-1]])
                row.append(int(next_token))
        for cache in caches:
            cache.release()
        return [row[len(r) :] for row, r in zip(out, rows, strict=True)]

    single = decode([mine[0]], 12)[0]
    together = decode([o[0] for o in others[:7]] + [mine[0]] + [o[0] for o in others[7:15]], 12)
    result["greedy_alone_equals_batched"] = together[7] == single
    return result


def load_bench_verify() -> Any:
    path = Path(__file__).with_name("bench_verify.py")
    spec = importlib.util.spec_from_file_location("bench_verify", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=170.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    started = time.perf_counter()
    on_gpu = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    report: dict[str, Any] = {"device": name, "checks": [], "verify": None}

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))

    stamp(f"loading {args.model} on {report['device']}")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    stamp("loaded")
    g = torch.Generator().manual_seed(0)
    broken = False
    for attention, invariant in (("sdpa", True), ("chunked", True), ("sdpa", False)):
        try:
            result = check(model, attention, invariant, g)
        except Exception as exc:  # report it and go on: the other kernels may work
            result = {"attention": attention, "batch_invariant": invariant, "error": repr(exc)}
        report["checks"].append(result)
        stamp(f"check {result}")
        error = result.get("relative_error_vs_hf")
        if error is not None and error > MAX_RELATIVE_ERROR:
            print(f"FAILED: {attention} logits are {error:.3f} (relative) from HF's", flush=True)
            broken = True
        save()
        if on_gpu:
            torch.cuda.empty_cache()
    chosen = next(
        (c["attention"] for c in report["checks"]
         if c.get("batch_invariant") and c.get("invariant") and "error" not in c),
        None,
    )  # fmt: skip
    if chosen is None:
        print("WARNING: no attention kernel was batch-invariant on this GPU", flush=True)
    report["attention"] = chosen or "sdpa"
    save()
    bench_verify = load_bench_verify()
    rows = []
    paths = ["hf", "static", "paged", "paged_fast"]
    if chosen == "chunked":
        paths.append("paged_chunked")
    for batch in (1, SESSIONS):
        for k in (0, 4):
            if time.perf_counter() - started > args.budget_s:
                stamp(f"budget spent: B={batch} k={k} skipped")
                continue
            rows.append(bench_verify.bench(model, args.device, paths, batch, k, args.rounds))
            stamp("verify " + ", ".join(f"{key}={value}" for key, value in rows[-1].items()
                                        if not isinstance(value, dict)))  # fmt: skip
            bench_verify.relate(rows, paths)
            report["verify"] = rows
            save()
    if time.perf_counter() - started < args.budget_s + 20:
        report["profile"] = bench_verify.profile(model, SESSIONS, 4, args.device)
        stamp(f"profile {report['profile']['share_by_kind']}")
    save()
    print(f"ATTENTION={report['attention']}", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
