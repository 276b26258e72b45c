"""On a GPU: is the paged verify forward right, and batch-invariant? Then its timings.

Usage: python scripts/gpu_check.py [--model random:llama-3.1-8b] [--dtype bfloat16]
                                   [--budget-s 170] [--out check.json]

1. Correctness, per attention kernel (sdpa, chunked), on CUDA graphs:
   * a session's verify logits against HF's forward in float32 on the same input, judged
     by HF's own bf16 error there (``judge``): the paged forward fails only when it is
     much further from float32 than HF's bf16 forward is, or disagrees on the argmax
     where HF's bf16 forward agrees (random-weight logits are flat: bf16 rounding alone
     moves them by ~5 % of their scale, so a fixed tolerance cannot tell a bug);
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
``--attentions`` (sdpa,chunked) and ``--paths`` (hf,static,paged,paged_fast) narrow a run.
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

from specdec.engine.models import LoadedModel, load_model
from specdec.engine.paged_kv import BLOCK_SIZE, PagedCache, PagedPool

# The paged forward's error against float32 may be this many times HF's own bf16 error
# (different kernels round differently; a bug is ~1 of the logits' scale, 20x HF's error).
ERROR_FACTOR = 3.0
ERROR_FLOOR = 0.02  # relative: below this, any error is rounding
FALLBACK_RELATIVE_ERROR = 0.25  # without a float32 reference (no memory for it)
TOP_K = 5
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
    result.update(judge(model, mine, alone))
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


@torch.inference_mode()
def full_logits(module: torch.nn.Module, tokens: list[int], last: int) -> torch.Tensor:
    """HF's logits (float32) of the last ``last`` positions, one forward without a cache."""
    ids = torch.tensor([tokens], device=next(module.parameters()).device)
    return module(input_ids=ids).logits[0, -last:].float()


def judge(
    model: LoadedModel, mine: tuple[list[int], list[int]], paged: torch.Tensor
) -> dict[str, Any]:
    """The paged logits ``paged`` [n, V] of ``mine`` against HF in float32 (a copy of the
    same weights), next to HF's own bf16 forward: relative max errors, argmax and top-k
    agreement, and ``ok``. Without memory for the float32 copy: against HF's bf16 forward
    with FALLBACK_RELATIVE_ERROR and argmax agreement."""
    import copy

    tokens = [*mine[0], *mine[1]]
    n = paged.shape[0]
    hf = full_logits(model.model, tokens, n)
    out: dict[str, Any] = {}
    try:
        exact = copy.deepcopy(model.model).float()
        reference = full_logits(exact, tokens, n)
        del exact
    except torch.cuda.OutOfMemoryError:
        reference = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if reference is None:
        scale = float(hf.abs().max())
        error = float((paged - hf).abs().max()) / scale
        argmax = bool((paged.argmax(-1) == hf.argmax(-1)).all())
        out.update(relative_error_vs_hf=error, argmax_equal_vs_hf=argmax, reference="hf bf16")
        out["ok"] = argmax and error <= FALLBACK_RELATIVE_ERROR
        return out
    scale = float(reference.abs().max())
    hf_error = float((hf - reference).abs().max()) / scale
    error = float((paged - reference).abs().max()) / scale
    want = reference.argmax(-1)
    hf_argmax = bool((hf.argmax(-1) == want).all())
    argmax = bool((paged.argmax(-1) == want).all())
    top = reference.topk(TOP_K, -1).indices
    overlap = float(
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in
            zip(paged.topk(TOP_K, -1).indices, top, strict=True)) / top.numel()
    )  # fmt: skip
    out.update(
        reference="hf float32",
        relative_error_vs_fp32=error,
        hf_bf16_error_vs_fp32=hf_error,
        error_ratio=error / max(hf_error, 1e-9),
        argmax_equal_vs_fp32=argmax,
        hf_argmax_equal_vs_fp32=hf_argmax,
        top5_overlap_vs_fp32=overlap,
        relative_error_vs_hf=float((paged - hf).abs().max()) / scale,
    )
    out["ok"] = error <= max(ERROR_FACTOR * hf_error, ERROR_FLOOR) and (argmax or not hf_argmax)
    return out


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
    parser.add_argument("--attentions", default="sdpa,chunked")
    parser.add_argument("--paths", default="hf,static,paged,paged_fast")
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
    attentions = [a for a in args.attentions.split(",") if a]
    for attention, invariant in [*((a, True) for a in attentions), ("sdpa", False)]:
        try:
            result = check(model, attention, invariant, g)
        except Exception as exc:  # report it and go on: the other kernels may work
            result = {"attention": attention, "batch_invariant": invariant, "error": repr(exc)}
        report["checks"].append(result)
        stamp(f"check {result}")
        if result.get("ok") is False:
            print(
                f"FAILED: {attention} logits are further from HF's float32 forward than "
                f"HF's bf16 forward is ({result.get('error_ratio', 'n/a')}x; argmax "
                f"{result.get('argmax_equal_vs_fp32', result.get('argmax_equal_vs_hf'))})",
                flush=True,
            )
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
    paths = [p for p in args.paths.split(",") if p]
    if chosen == "chunked" and "paged" in paths:
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
