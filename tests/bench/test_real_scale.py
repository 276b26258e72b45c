"""`specdec bench --real-scale`: a real shape (tiny here) through the real services."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec.bench.real_scale import add_theory, check_targets, nominal_bandwidth_gbs
from specdec.core.adaptive import expected_tokens
from tests.cluster_tools import run_bench


def test_real_scale_mode_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF generate, the oracle alone at 1 and 2 sessions on paged KV (on the CPU), then the
    benchmark drafter at acceptance 0 and 1: every greedy output is the oracle alone's."""
    monkeypatch.setenv("SPECDEC_STATIC_KV", "on")  # paged KV on the CPU too
    out = tmp_path / "real.json"
    argv = [
        "--real-scale", "llama-3.1-8b:layers=2,head_dim=8,context=256",
        "--device", "cpu", "--dtype", "float32", "--prompts", "2", "--prompt-tokens", "32",
        "--max-new-tokens", "12", "--alone-sessions", "1,2", "--spec-sessions", "1",
        "--acceptances", "0,1", "--spec-k", "4", "--hf-prompts", "1",
        "--draft-step-ms", "0.2", "--bandwidth-gbs", "100", "--out", str(out),
    ]  # fmt: skip
    report = run_bench(argv, out)
    assert report["complete"] and report["hf_generate"]["session_tokens_per_s"] > 0
    rows = report["rows"]
    assert [(r["kind"], r["sessions"], r.get("acceptance")) for r in rows] == [
        ("alone", 1, None), ("alone", 2, None), ("spec", 1, 0.0), ("spec", 1, 1.0),
    ]  # fmt: skip
    assert all(r["mismatched_outputs"] == 0 and r["fallback_requests"] == 0 for r in rows)
    never, always = rows[2], rows[3]
    assert never["acceptance_rate"] == 0.0 and always["acceptance_rate"] == 1.0
    assert always["mean_k"] > 2 and always["theoretical_speedup"] > 1
    assert report["bandwidth_limit_tokens_per_s"] == pytest.approx(100e9 / report["weight_bytes"])
    assert rows[0]["of_limit"] > 0 and "oracle_log_tail" in report
    assert report["targets"]["mismatched_outputs"]["met"]


def test_theory_is_leviathans_with_the_oracle_alones_step() -> None:
    rows = [
        {"kind": "alone", "sessions": 1, "session_tokens_per_s": 100.0,
         "aggregate_tokens_per_s": 100.0},
        {"kind": "spec", "sessions": 1, "mean_k": 4.2, "alpha": 0.8,
         "aggregate_tokens_per_s": 250.0, "session_tokens_per_s": 250.0},
    ]  # fmt: skip
    add_theory(rows, draft_step_ms=1.0)  # c = 1 ms / 10 ms
    theory = expected_tokens(0.8, 4) / (4 * 0.1 + 1)
    assert rows[1]["theoretical_speedup"] == pytest.approx(theory)
    assert rows[1]["speedup"] == 2.5 and rows[1]["efficiency"] == pytest.approx(2.5 / theory)
    targets = check_targets(rows, {"session_tokens_per_s": 20.0})
    assert targets["alone_1_vs_hf"] == {"value": 5.0, "goal": 4.0, "met": True}


def test_nominal_bandwidth_by_card_name() -> None:
    assert nominal_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert nominal_bandwidth_gbs("NVIDIA H200") == 4800
    assert nominal_bandwidth_gbs("NVIDIA H100 PCIe") == 2000
    assert nominal_bandwidth_gbs("cpu") == 0
