"""`specdec bench --sessions`: concurrent sessions through the real services, tiny models."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from specdec.bench.concurrency import (
    Plan,
    Request,
    Window,
    _arrival_gaps,
    add_ratios,
    parse_ints,
    pool,
)
from specdec.bench.measure import Sample
from specdec.cli import main
from specdec.core.errors import InvalidArgument
from tests.cluster_tools import run_bench

NEW_TOKENS = 8
REQUESTS = 2
REPEATS = 2  # each count measured twice, alternating, windows pooled


def test_concurrency_mode_end_to_end(tmp_path: Path, model_dir: Callable[[str, str], Path]) -> None:
    out = tmp_path / "concurrency.json"
    argv = [
        "--sessions", "1,2", "--session-ks", "0,4", "--prompts", "1",
        "--prompt-tokens", "32", "--max-new-tokens", str(NEW_TOKENS),
        "--requests-per-session", str(REQUESTS), "--repeats", str(REPEATS),
        "--oracle-model", str(model_dir("llama", "oracle")),
        "--draft-model", str(model_dir("llama", "close_draft")), "--out", str(out),
        "--draft-dtype", "bfloat16",
    ]  # fmt: skip
    report = run_bench(argv, out)
    assert report["complete"] is True
    environment = report["environment"]
    assert environment["cpu_count"] >= 1 and environment["torch"]
    assert (environment["dtype"], environment["draft_dtype"]) == ("float32", "bfloat16")
    rows = {(r["k"], r["sessions"]): r for r in report["rows"]}
    assert sorted(rows) == [(0, 1), (0, 2), (4, 1), (4, 2)]
    for (k, n), row in rows.items():
        # ignore_eos fixes every request's length: filler must never be counted.
        assert row["requests"] == n * REQUESTS * REPEATS, row
        assert row["output_tokens"] == n * REQUESTS * REPEATS * NEW_TOKENS, row
        assert row["window_tokens"] >= row["output_tokens"]
        assert row["aggregate_tokens_per_s"] > 0 and row["session_tokens_per_s"] > 0
        assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]
        # Greedy output is the oracle's alone whatever k and the concurrency.
        assert row["mismatched_outputs"] == 0, row
        assert row["fallback_requests"] == 0, row
        # The oracle's side of the window: it verified in batches, and was busy a while.
        assert row["oracle_batches"] > 0 and 1 <= row["oracle_rows_per_batch"] <= n, row
        assert 0 < row["oracle_busy_share"] < 1, row
        assert row["queue_ms_per_round"] > 0, row
        assert row["baseline_sessions"] == 1
        base = rows[k, 1]
        assert math.isclose(
            row["aggregate_vs_base"],
            row["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"],
        )
        assert math.isclose(row["itl_p99_vs_base"], row["itl_p99_ms"] / base["itl_p99_ms"])
        if k:
            assert row["draft_requests"] == {"draft-0": n * REQUESTS * REPEATS}, row
            assert row["acceptance_rate"] > 0
        else:
            assert row["acceptance_rate"] is None
    assert rows[0, 1]["aggregate_vs_base"] == 1.0


def test_chunk_arrivals_read_as_one_gap_then_zeros() -> None:
    # Chunks of 2, 1 and 3 tokens at t = 0, 1 and 3 s: 5 gaps for 6 tokens.
    assert _arrival_gaps([(0.0, 2), (1.0, 1), (3.0, 3)]) == [0.0, 1.0, 2.0, 0.0, 0.0]


def test_a_chunk_of_n_tokens_after_a_gap_counts_as_n_tokens_of_a_share_each() -> None:
    # Sent at t = 10 s; chunks of 2, 0, 1 and 4 tokens at t = 10.5, 11, 12 and 14 s.
    sample = Sample(0, 0.0, 0.0)
    for ids, now in (([5, 6], 10.5), ([], 11.0), ([7], 12.0), ([1, 2, 3, 4], 14.0)):
        sample.arrive(ids, now, start=10.0)
    assert sample.ttft_s == 0.5
    assert sample.itl_s == [1.5, 0.5, 0.5, 0.5, 0.5]
    assert (sample.tokens, sample.token_ids) == (7, [5, 6, 7, 1, 2, 3, 4])


def test_every_prompt_is_used_at_every_session_count() -> None:
    plan = Plan([[1]] * 4, max_new_tokens=8, requests_per_session=2, adaptive=False)
    assert [plan.requests_for(n) for n in (1, 2, 3, 16)] == [4, 2, 2, 2]


def test_ratios_are_against_the_smallest_session_count_of_the_same_k() -> None:
    rows = [
        {"max_batch": 16, "k": 4, "sessions": n, "aggregate_tokens_per_s": agg,
         "itl_p99_ms": p99, "itl_arrival_p99_ms": p99}
        for n, agg, p99 in ((1, 10.0, 20.0), (16, 70.0, 30.0))
    ]  # fmt: skip
    add_ratios(rows)
    assert rows[1]["aggregate_vs_base"] == 7.0 and rows[1]["itl_p99_vs_base"] == 1.5
    assert rows[1]["issue7_target_met"] is True
    assert "issue7_target_met" not in rows[0]


def test_session_lists_are_validated() -> None:
    assert parse_ints("16,1,1", "--sessions", 1) == [1, 16]
    for bad in ("", "0,4", "a"):
        with pytest.raises(InvalidArgument, match="--sessions"):
            parse_ints(bad, "--sessions", 1)


def test_pooled_windows_add_their_time_and_requests_and_weigh_the_oracle() -> None:
    def window(seconds: float, tokens: int, batches: int, rows: float, busy: float) -> Window:
        requests = [[Request(Sample(tokens, seconds, 0.01), 0, [])], []]  # two sessions
        return Window(seconds, requests, 3, 1, {
            "oracle_batches": batches, "oracle_rows_per_batch": rows, "oracle_busy_share": busy,
        })  # fmt: skip

    pooled = pool([window(1.0, 10, 10, 2.0, 0.5), window(3.0, 20, 30, 4.0, 0.1)])
    assert pooled.seconds == 4.0 and (pooled.filler_tokens, pooled.filler_requests) == (6, 2)
    assert [[q.sample.tokens for q in s] for s in pooled.requests] == [[10, 20], []]
    assert pooled.oracle["oracle_batches"] == 40
    assert math.isclose(pooled.oracle["oracle_rows_per_batch"], (20 + 120) / 40)
    assert math.isclose(pooled.oracle["oracle_busy_share"], (0.5 + 0.3) / 4)


def test_a_cpu_list_the_host_lacks_is_a_clear_error_before_anything_starts() -> None:
    with pytest.raises(SystemExit, match="--draft-cpus '4096' names CPUs this process"):
        main(["bench", "--sessions", "1", "--draft-cpus", "4096"])
