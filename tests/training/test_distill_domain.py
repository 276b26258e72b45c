"""`specdec distill` end to end on tiny models: a draft that loads, serves and agrees more.

The oracle is a tiny random llama, the starting draft a smaller random one of the same
tokenizer, the domain a folder of short documents. A few seconds of rounds must raise
the draft's acceptance on held-out prompts; the folder must load in the draft service
and its outputs through the gateway must equal the oracle alone's.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.cli import main as specdec_main
from specdec.client import Client
from specdec.engine.models import check_compatible, load_model
from specdec.launch import cluster
from specdec.training.cli import main as training_main
from specdec.training.distill import distill_terms
from specdec.training.targets import Scored, eos_mask, sparse_terms
from tests.cluster_tools import reference
from tests.conftest import (
    CORPUS,
    OTHER_CORPUS,
    VOCAB_SIZE,
    build_model,
    build_tokenizer,
    save_model,
)

TINY_FLAGS = [
    "--device", "cpu", "--threads", "1", "--round-sequences", "16", "--gen-batch", "16",
    "--prompt-len", "8", "--gen-len", "16", "--eval-prompts", "8", "--eval-gen-len", "16",
    "--heldout-permille", "200", "--lr", "1e-2", "--minutes", "10",
]  # fmt: skip


def write_domain(folder: Path, n: int = 60) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for i in range(n):
        lines = [rng.choice(CORPUS) for _ in range(rng.randint(3, 8))]
        (folder / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> tuple[Path, Path, Path, dict[str, Any], str]:
    """(oracle, data, out, metrics, printed output) of one distillation of the tiny draft."""
    root = tmp_path_factory.mktemp("distill")
    data = write_domain(root / "data")
    oracle = model_dir("llama", "oracle")
    out = root / "out"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = training_main([
            "distill", "--oracle", str(oracle), "--draft", str(model_dir("llama", "draft")),
            "--data", str(data), "--out", str(out), "--max-rounds", "30", *TINY_FLAGS,
        ])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return oracle, data, out, metrics, printed.getvalue()


def test_acceptance_on_the_domain_rose(run: tuple[Path, Path, Path, dict[str, Any], str]) -> None:
    _, _, _, metrics, printed = run
    before, after = metrics["before"]["acceptance"], metrics["after"]["acceptance"]
    assert after["greedy"]["acceptance"] >= before["greedy"]["acceptance"] + 0.05
    assert after["t1"]["acceptance"] >= before["t1"]["acceptance"] + 0.05
    assert after["greedy"]["tokens_per_round"]["4"] > before["greedy"]["tokens_per_round"]["4"]
    assert metrics["draft"]["train"]["rounds"] == 30
    assert "| greedy acceptance per token |" in printed
    history = metrics["draft"]["train"]["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == metrics["draft"]["train"]["steps"]


def test_folder_loads_pairs_and_has_a_card(
    run: tuple[Path, Path, Path, dict[str, Any], str],
) -> None:
    oracle, _, out, metrics, _ = run
    draft = load_model(str(out))
    check_compatible(draft, load_model(str(oracle)))
    assert draft.vocab_size == VOCAB_SIZE
    card = (out / "README.md").read_text()
    for needle in ("## Data", "## Acceptance before and after", metrics["command"]):
        assert needle in card
    assert metrics["command"].startswith("specdec distill --oracle")
    assert (out / "checkpoint" / "state.pt").exists()


def test_distilled_draft_serves_and_changes_no_token(
    run: tuple[Path, Path, Path, dict[str, Any], str], tmp_path: Path
) -> None:
    oracle, _, out, _, _ = run
    with cluster(tmp_path) as c:
        c.start_gateway("--tokenizer", str(oracle))
        c.start_oracle(oracle, oracle_id="o")
        c.start_draft(out, draft_id="distilled")
        c.wait_workers(oracles=1, drafts=1)
        tokenizer = build_tokenizer()
        prompts = [tokenizer.encode(text)[:8] for text in CORPUS]  # text of the domain
        with Client(c.address, timeout=60) as client:
            accepted = 0
            for prompt in prompts:
                result = client.generate(prompt, max_new_tokens=24, k=4, ignore_eos=True)
                assert result.token_ids == reference(oracle, prompt, 24), prompt
                assert result.stats.draft_id == "distilled"
                accepted += result.stats.accepted_tokens
    assert accepted > 0


def test_rerun_resumes_from_the_checkpoint(
    run: tuple[Path, Path, Path, dict[str, Any], str],
    tmp_path: Path,
    model_dir: Callable[[str, str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    oracle, data, out, metrics, _ = run
    again = tmp_path / "out"
    shutil.copytree(out / "checkpoint", again / "checkpoint")
    argv = [
        "distill", "--oracle", str(oracle), "--draft", str(model_dir("llama", "draft")),
        "--data", str(data), "--out", str(again), "--max-rounds", "2", *TINY_FLAGS,
    ]  # fmt: skip
    assert training_main(argv) == 0
    assert "resuming from it" in capsys.readouterr().out
    resumed = json.loads((again / "metrics.json").read_text())["draft"]["train"]
    assert resumed["resumed_from_step"] == metrics["draft"]["train"]["steps"]
    assert resumed["rounds"] == 32
    # The starting draft's measurement was kept, not redone (its cost is timed anew).
    before = json.loads((again / "metrics.json").read_text())["before"]
    assert (before["acceptance"], before["seconds"]) == (
        metrics["before"]["acceptance"],
        metrics["before"]["seconds"],
    )


def test_fresh_draft_from_the_oracle(tmp_path: Path, model_dir: Callable[[str, str], Path]) -> None:
    # No --draft: a llama of the oracle's width, two layers, its first layers copied.
    data = write_domain(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["distill", "--oracle", str(model_dir("llama", "oracle")), "--data", str(data),
            "--out", str(out), "--max-rounds", "1", "--no-timing", *TINY_FLAGS]  # fmt: skip
    assert training_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["draft"]["source"].startswith("fresh 32,2,64,4,2")
    assert load_model(str(out)).model.config.num_hidden_layers == 2


def test_refusals_are_clear(tmp_path: Path, model_dir: Callable[[str, str], Path]) -> None:
    data = write_domain(tmp_path / "data")
    stranger = save_model(
        build_model("llama", seed=5), build_tokenizer(OTHER_CORPUS, VOCAB_SIZE), tmp_path / "x"
    )
    oracle = str(model_dir("llama", "oracle"))
    base = ["distill", "--oracle", oracle, "--data", str(data), *TINY_FLAGS]
    with pytest.raises(SystemExit) as failure:
        specdec_main([*base, "--draft", str(stranger), "--out", str(tmp_path / "o1")])
    assert "different tokenizers" in str(failure.value.code)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as failure:
        specdec_main([*base, "--out", str(busy)])
    assert "not empty" in str(failure.value.code)


def test_sparse_terms_are_exact_when_k_covers_the_vocabulary() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    logp, ids = torch.log_softmax(teacher, -1).topk(11, -1)
    target = Scored(torch.zeros(2, 9, dtype=torch.long), ids, logp, torch.ones(2, 5))
    sparse, full = sparse_terms(student, target), distill_terms(teacher, student)
    assert torch.allclose(sparse["kl"], full["fkl"], atol=1e-5)
    assert torch.allclose(sparse["tvd"], full["tvd"], atol=1e-5)
    assert torch.allclose(sparse["agree"], full["agree"])
    # With fewer ids the binned divergences are lower bounds of the full ones.
    logp, ids = torch.log_softmax(teacher, -1).topk(3, -1)
    coarse = sparse_terms(student, Scored(target.seqs, ids, logp, target.mask), loss="jsd")
    assert coarse["tvd"] <= full["tvd"] + 1e-6 and coarse["kl"] <= full["fkl"] + 1e-6
    assert 0 <= float(coarse["loss"]) <= float(torch.log(torch.tensor(2.0)))  # JSD <= ln 2


def test_eos_mask_stops_after_the_first_eos() -> None:
    rows = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert eos_mask(rows, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert eos_mask(rows, [7, 9]).tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
