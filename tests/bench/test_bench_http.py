"""`specdec bench --http`: the HTTP API beside gRPC Generate, on tiny models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.cluster_tools import run_bench

PROMPTS = 2
NEW_TOKENS = 8


def test_http_bench_end_to_end(tmp_path: Path, model_dir: Callable[[str, str], Path]) -> None:
    out = tmp_path / "http.json"
    argv = [
        "--http", "--prompts", str(PROMPTS), "--prompt-tokens", "32",
        "--max-new-tokens", str(NEW_TOKENS), "--http-reps", "1",
        "--oracle-model", str(model_dir("llama", "oracle")),
        "--draft-model", str(model_dir("llama", "close_draft")), "--out", str(out),
    ]  # fmt: skip
    report = run_bench(argv, out)
    rows = [(r["config"], r["api"]) for r in report["rows"]]
    assert rows == [
        ("oracle alone k=0", "grpc"), ("oracle alone k=0", "http"),
        ("draft k=4", "grpc"), ("draft k=4", "http"),
    ]  # fmt: skip
    for row in report["rows"]:
        # Every request ran to its length over either API (EOS ignored).
        assert (row["requests"], row["output_tokens"]) == (PROMPTS, PROMPTS * NEW_TOKENS), row
        assert row["ms_per_output_token"] > 0 and row["ttft_ms"] > 0, row
    for comparison in report["comparisons"]:
        assert comparison["mismatched_outputs"] == 0  # both APIs stream the same text
        assert comparison["http_over_grpc_per_token"] > 0
        assert 0 < comparison["encode_share_of_tpot"] < 1
    # A chunk a token for the oracle alone; more for the draft's rounds.
    assert report["tokens_per_chunk"]["oracle alone k=0"] == 1.0
    assert report["tokens_per_chunk"]["draft k=4"] > 1.0
    assert report["encode_us_per_chunk"] > 0
