"""`specdec bench` (the round-trip benchmark): every configuration through the real
services and the delay proxy, side by side, on tiny models."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from specdec.bench.run import round_trip_retention
from tests.cluster_tools import run_bench

PROMPTS = 2
NEW_TOKENS = 8


def test_round_trip_bench_end_to_end(tmp_path: Path, model_dir: Callable[[str, str], Path]) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--prompts", str(PROMPTS), "--prompt-tokens", "32",
        "--max-new-tokens", str(NEW_TOKENS), "--ks", "2", "--delays", "0,20",
        "--workloads", "greedy", "--long-tokens", "0",
        "--oracle-model", str(model_dir("llama", "oracle")),
        "--draft-model", str(model_dir("llama", "close_draft")), "--out", str(out),
    ]  # fmt: skip
    report = run_bench(argv, out)
    rows = {(r["config"], r["delay_ms"]): r for r in report["rows"]}
    assert list(rows) == [
        ("oracle alone (k=0)", 0), ("ngram k=4", 0),
        ("draft defaults", 0), ("draft k=2", 0), ("draft adaptive", 0),
        ("draft defaults", 20), ("draft k=2", 20), ("draft adaptive", 20),
        ("HF generate (oracle)", 0), ("HF assisted (draft)", 0),
    ]  # fmt: skip
    for (config, delay), row in rows.items():
        # Every request runs to its length (ignore_eos; min_new_tokens for HF).
        assert (row["requests"], row["output_tokens"]) == (PROMPTS, PROMPTS * NEW_TOKENS), row
        assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"] and row["ttft_ms"] > 0, row
        if config.startswith("HF"):
            assert "mismatched_outputs" not in row
        else:  # greedy through the gateway: the oracle's own output whatever the drafter
            assert row["mismatched_outputs"] == 0 and row["vs_hf_generate"] > 0, row
        if config.startswith("draft"):
            assert row["rounds"] > 0 and 0 < row["acceptance_rate"] <= 1, row
            assert row["speedup"] > 0 and row["theoretical_speedup"] > 0, row
        if delay:
            same = rows[config, 0]
            assert math.isclose(row["vs_0ms"], row["speedup"] / same["speedup"]), row
    (retention,) = report["round_trip"]
    drafted = [r for (config, _), r in rows.items() if config.startswith("draft")]
    best = {d: max(r["speedup"] for r in drafted if r["delay_ms"] == d) for d in (0, 20)}
    assert (retention["workload"], retention["delay_ms"]) == ("greedy", 20)
    assert (retention["best_speedup"], retention["best_0ms_speedup"]) == (best[20], best[0])
    assert math.isclose(retention["retained"], best[20] / best[0])


def test_retention_is_best_against_best_per_workload_and_delay() -> None:
    def row(config: str, workload: str, delay: float, speedup: float) -> dict[str, object]:
        return {"config": config, "workload": workload, "delay_ms": delay, "speedup": speedup}

    rows = [
        row("k=4", "greedy", 0, 2.0), row("k=8", "greedy", 0, 2.5),
        row("k=4", "greedy", 20, 1.8), row("k=8", "greedy", 20, 1.5),
        row("k=4", "greedy", 40, 1.0), row("k=4", "sample", 0, 1.0),
    ]  # fmt: skip
    assert round_trip_retention(rows) == [
        {"workload": "greedy", "delay_ms": 20, "best_config": "k=4", "best_speedup": 1.8,
         "best_0ms_config": "k=8", "best_0ms_speedup": 2.5, "retained": 1.8 / 2.5},
        {"workload": "greedy", "delay_ms": 40, "best_config": "k=4", "best_speedup": 1.0,
         "best_0ms_config": "k=8", "best_0ms_speedup": 2.5, "retained": 1.0 / 2.5},
    ]  # fmt: skip
    assert [r.get("vs_0ms") for r in rows] == [None, None, 0.9, 0.6, 0.5, None]
