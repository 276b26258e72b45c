"""`specdec bench --session-stores memory,sqlite,redis`: what the session store costs per
output token.

One oracle and one draft serve three gateways at once (workers dial every gateway
they are given), each gateway on another session store; the requests go to them in
turn, the order rotating every prompt, so the compute and the machine's drift are
the same for all. Each request is one turn of a fresh session (the draft's model,
k = 4, greedy); its time per output token (TPOT) is compared with the in-memory
gateway's on the same prompt (the median of the paired ratios). Beside it, the
store's own cost: the median time of one round's append (4 tokens), measured in
this process against the same backends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from specdec.bench.measure import Sample

STORES = ("memory", "sqlite", "redis")
APPENDS = 2000  # rounds timed per store in the append microbenchmark


def _tpot_ms(sample: Sample) -> float:
    """Time per output token after the first, in ms."""
    return 1000 * (sample.seconds - sample.ttft_s) / max(1, sample.tokens - 1)


async def _append_us(spec: str, state_dir: str) -> float:
    """Median microseconds of one fenced append of 4 tokens (one round) on ``spec``."""
    from gateway.store import SessionRecord, open_store

    store = await open_store(spec, state_dir)
    try:
        await store.create(SessionRecord("bench", "", ephemeral=False, tokens=list(range(200))))
        times = []
        async with store.lock("bench") as fence:
            length = 200
            for _ in range(APPENDS):
                start = time.perf_counter()
                await store.append(fence, length, [1, 2, 3, 4], None)
                times.append(time.perf_counter() - start)
                length += 4
        await store.delete("bench")
        return 1e6 * statistics.median(times)
    finally:
        await store.close()


def run_store_overhead(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from specdec.bench.run import Config, _gateway_sample
    from specdec.client import Client
    from specdec.launch import cluster, redis_server

    stores = [s.strip() for s in args.session_stores.split(",") if s.strip()]
    unknown = set(stores) - set(STORES)
    if unknown or "memory" not in stores:
        raise SystemExit(f"--session-stores takes memory (the baseline) and any of {STORES}")
    config = Config("draft k=4", 4)
    sampling = {"max_new_tokens": args.max_new_tokens}
    samples: dict[str, list[Sample]] = {s: [] for s in stores}
    with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as stack:
        specs = {s: s for s in stores}
        if "redis" in stores:
            specs["redis"] = stack.enter_context(redis_server(Path(workdir) / "redis"))
        env = {"OMP_NUM_THREADS": str(args.threads), "SPECDEC_LOG_LEVEL": "warning"}
        c = stack.enter_context(cluster(Path(workdir), env))
        addresses = {}
        for store in stores:
            flags = ["--tokenizer", args.oracle_path, "--session-store", specs[store]]
            if store == "sqlite":
                flags += ["--state-dir", str(Path(workdir) / "state")]
            addresses[store] = f"127.0.0.1:{c.start_gateway(*flags).port}"
        c.start_oracle(args.oracle_path, "--device", args.device, "--dtype", args.dtype)
        c.start_draft(args.draft_path, "--device", args.draft_device, "--dtype", args.dtype)
        for address in addresses.values():
            c.wait_workers(oracles=1, drafts=1, address=address)
        clients = {s: stack.enter_context(Client(a, timeout=600)) for s, a in addresses.items()}
        for store in stores:  # warm-up
            _gateway_sample(clients[store], prompts[0][:16], config, sampling)
        total = args.store_reps * len(prompts)
        done = 0
        for rep in range(args.store_reps):
            for i, prompt in enumerate(prompts):
                shift = (rep * len(prompts) + i) % len(stores)
                for store in stores[shift:] + stores[:shift]:
                    session = clients[store].create_session()
                    samples[store].append(
                        _gateway_sample(
                            clients[store], prompt, config, {**sampling, "session_id": session}
                        )
                    )
                done += 1
                print(f"\r{done}/{total} prompts", end="", flush=True)
        print(flush=True)
        append_us = {
            s: asyncio.run(_append_us(specs[s], str(Path(workdir) / "micro"))) for s in stores
        }
    base = samples["memory"]
    rows = []
    for store in stores:
        paired = statistics.median(
            _tpot_ms(a) / _tpot_ms(b) for a, b in zip(samples[store], base, strict=True)
        )
        same = all(a.token_ids == b.token_ids for a, b in zip(samples[store], base, strict=True))
        tpot = statistics.median(_tpot_ms(s) for s in samples[store])
        per_round = statistics.median(
            s.tokens / max(1, s.stats.rounds) for s in samples[store] if s.stats
        )
        rows.append(
            {
                "store": store,
                "requests": len(samples[store]),
                "tpot_ms": tpot,
                "tokens_per_s": statistics.median(s.tokens_per_s for s in samples[store]),
                "tpot_vs_memory": paired,
                "overhead_percent": 100 * (paired - 1),
                "append_us": append_us[store],
                "tokens_per_round": per_round,
                # The store's own cost per output token, as a share of the TPOT: the
                # bound the end-to-end ratio (noisy on a loaded machine) measures too.
                "append_share_percent": 100 * append_us[store] / per_round / (1000 * tpot),
                "outputs_equal_memory": same,
            }
        )
    print(store_table(rows), flush=True)
    return {"config": config.name, "max_new_tokens": args.max_new_tokens, "rows": rows}


def store_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'store':>7}  {'TPOT ms':>8}  {'tok/s':>7}  {'TPOT vs memory':>14}  "
        f"{'append us':>9}  {'append/TPOT':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['store']:>7}  {r['tpot_ms']:8.2f}  {r['tokens_per_s']:7.1f}  "
            f"{r['overhead_percent']:+13.1f}%  {r['append_us']:9.1f}  "
            f"{r['append_share_percent']:10.2f}%"
        )
    return "\n".join(lines)
