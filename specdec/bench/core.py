"""`specdec bench --in-process`: the core speculative loop against HF greedy generate, one process.

No services, no network: ``speculative_generate`` (the same round loop the
services run) with the demo draft at several k (at k = 4 also on HF's forward
instead of the lean one), against HF ``generate`` of the oracle alone, on the same
prompts, alternating per prompt. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from specdec.bench.measure import percentile


def run_in_process(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    import torch

    from specdec.core.adaptive import AdaptiveK
    from specdec.core.sampling import SamplingParams
    from specdec.drafters.model_drafter import ModelDrafter
    from specdec.engine.models import load_model
    from specdec.engine.oracle import Oracle
    from specdec.generate import speculative_generate

    oracle = load_model(args.oracle_path, args.device, args.dtype)
    draft = load_model(args.draft_path, args.draft_device, args.dtype)
    runner = Oracle(oracle)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    names = [
        "HF generate (oracle alone)",
        "core loop k=0",
        "core k=4",
        "core k=4, HF draft forward",
        "core k=8",
        "core adaptive",
    ]
    speeds: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for prompt in prompts:
        row: dict[str, float] = {}
        start = time.perf_counter()
        with torch.inference_mode():
            out = oracle.model.generate(
                torch.tensor([prompt], device=oracle.device),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                pad_token_id=0,
            )
        row[names[0]] = (out.shape[1] - len(prompt)) / (time.perf_counter() - start)
        for name, k, policy, lean in [
            (names[1], 0, None, True),
            (names[2], 4, None, True),
            (names[3], 4, None, False),  # the draft's forward without specdec.engine.lean_forward
            (names[4], 8, None, True),
            (names[5], 8, AdaptiveK(8), True),
        ]:
            drafter = ModelDrafter(draft, lean=lean) if k else None
            start = time.perf_counter()
            result = speculative_generate(prompt, runner, drafter, params, k, policy=policy)
            row[name] = len(result.tokens) / (time.perf_counter() - start)
        for name in names:
            speeds[name].append(row[name])
            ratios[name].append(row[name] / row[names[0]])
    summary = {
        name: {
            "tokens_per_s_median": statistics.median(speeds[name]),
            "tokens_per_s_p10": percentile(speeds[name], 10),
            "ratio_vs_hf_generate_median": statistics.median(ratios[name]),
        }
        for name in names
    }
    print(f"{'in process':>28}  {'tok/s':>7}  {'vs HF generate':>14}")
    for name, s in summary.items():
        print(
            f"{name:>28}  {s['tokens_per_s_median']:7.1f}  "
            f"{s['ratio_vs_hf_generate_median']:13.2f}x"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompts": len(prompts), "rows": summary}, indent=2))
    return summary
