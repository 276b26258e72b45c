"""Tests of specdec.training: the whole pipeline at toy scale on CPU, and its pure parts.

The pipeline runs once per module (``--tiny``: a couple of dozen stdlib files, toy
models, a few dozen steps) into a temporary folder; the tests then load what it wrote
with plain transformers, as any user of the demo models would.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.core.errors import InvalidArgument
from specdec.training import cli, corpus
from specdec.training.card import METRICS_KEYS
from specdec.training.evaluate import (
    expected_tokens_per_round,
    simulate_rounds,
    speedups,
    tokens_per_round,
)
from specdec.training.loop import lr_at
from specdec.training.modeling import ModelSize, parse_size
from specdec.training.tokenizer import build_stream, encode_texts, train_tokenizer

TRICKY_CODE = (
    "class Foo:\n"
    '    """Docstring with unicode: héllo wörld, ∑ x², 日本語, emoji 😀."""\n'
    "\n"
    "\tdef tabbed(self):\r\n"
    "\t\treturn  {'a':1,   'b' : [ 2 ,3 ]}   \n"
    "        # eight spaces, trailing spaces   \n"
    "\n\n\n"
    "x = 0x1F  # <|endof not special\n"
    "   "
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "demo"
    argv = ["train", "--tiny", "--out", str(out), "--seed", "3", "--max-corpus-tokens", "30000"]
    code = cli.main(argv)
    assert code == 0
    return out


# --- the pipeline's outputs -------------------------------------------------


@pytest.mark.parametrize("name", ["oracle", "draft"])
def test_folders_load_with_transformers(tiny_run: Path, name: str) -> None:
    folder = tiny_run / name
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32  # stored bf16, upcast on load as asked
    assert model.config.vocab_size == len(tok)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == eot == 0
    assert model.config.eos_token_id == eot
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}
    ids = tok(TRICKY_CODE, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_tokenizer_round_trips_code_exactly(tiny_run: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_run / "oracle"))
    draft_tok = AutoTokenizer.from_pretrained(str(tiny_run / "draft"))
    ids = tok(TRICKY_CODE)["input_ids"]
    assert 0 not in ids  # encoding adds no special token
    assert tok.decode(ids) == TRICKY_CODE
    assert draft_tok(TRICKY_CODE)["input_ids"] == ids
    # The special token is a single id when it is written out.
    assert tok("a<|endoftext|>b")["input_ids"].count(0) == 1


def test_metrics_and_card(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(metrics)
    assert metrics["seed"] == 3
    # --max-corpus-tokens keeps whole files up to the cap and lists the rest as unused.
    assert metrics["corpus"]["tokens"]["train"] <= 30000 + 1
    assert metrics["corpus"]["unused_train_files"] > 0
    assert metrics["command"].startswith("specdec ")
    acc = metrics["acceptance"]
    assert 0.0 <= acc["greedy"]["acceptance"] <= 1.0
    assert 0.0 <= acc["t1"]["acceptance"] <= 1.0
    for k in ("2", "4", "8"):
        assert 1.0 <= acc["greedy"]["tokens_per_round"][k] <= int(k) + 1
        assert 1.0 <= acc["t1"]["tokens_per_round"][k] <= int(k) + 1
        assert metrics["speedup"][k] > 0
    for name in ("oracle", "draft"):
        assert metrics[name]["params"] > 0
        assert (
            metrics[name]["weights_bytes"] == (tiny_run / name / "model.safetensors").stat().st_size
        )
    card = (tiny_run / "README.md").read_text()
    for needle in (
        "## Corpus",
        "## Acceptance",
        "tokens/round k=4",
        metrics["corpus"]["file_list_sha256"],
    ):
        assert needle in card
    assert "specdec train --tiny" in card


def test_file_list_is_disjoint_and_follows_the_rule(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    raw = gzip.decompress((tiny_run / "corpus_files.tsv.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == metrics["corpus"]["file_list_sha256"]
    rows = [line.split("\t") for line in raw.decode().splitlines()[1:]]
    permille = metrics["options"]["eval_permille"]
    train = {(r[1], r[2]) for r in rows if r[0] == "train"}
    held = {(r[1], r[2]) for r in rows if r[0] == "eval"}
    assert train and held and not train & held
    assert all(corpus.is_heldout(root, rel, permille) for root, rel in held)
    assert not any(corpus.is_heldout(root, rel, permille) for root, rel in train)
    assert len({r[3] for r in rows}) == len(rows)  # deduplicated by content
    assert all(int(r[5]) > 0 for r in rows)  # token counts recorded


def test_eval_pair_cli(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "eval.json"
    argv = ["eval-pair", "--pair", str(tiny_run), "--packages", "stdlib", "--prompts", "3"]
    argv += ["--prompt-len", "8", "--gen-len", "8", "--eval-permille", "150"]
    argv += ["--max-file-bytes", "12000", "--no-timing", "--json", str(out_json)]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_json.read_text())
    assert printed["prompts"] == 3 and printed["gen_len"] == 8
    assert set(printed["greedy"]["tokens_per_round"]) == {"2", "4", "8"}


# --- corpus ------------------------------------------------------------------


def test_heldout_split_is_deterministic_and_disjoint() -> None:
    a = corpus.collect((corpus.STDLIB,), eval_permille=100, max_file_bytes=8000)
    b = corpus.collect((corpus.STDLIB,), eval_permille=100, max_file_bytes=8000)
    assert [(f.key, f.split) for f in a.files] == [(f.key, f.split) for f in b.files]
    held = {f.key for f in a.split("eval")}
    train = {f.key for f in a.split("train")}
    assert held and train and not held & train
    for f in a.files:
        digest = int(hashlib.sha256(f.key.encode()).hexdigest()[:8], 16)
        assert (f.split == "eval") == (digest % 1000 < 100)
    assert len({f.sha256 for f in a.files}) == len(a.files)
    valid, test = corpus.split_heldout(a.files)
    assert valid and test and not {f.key for f in valid} & {f.key for f in test}


def test_missing_package_is_reported_not_fatal() -> None:
    c = corpus.collect((corpus.STDLIB, "no_such_package_xyz"), max_file_bytes=4000, max_files=10)
    assert c.missing_packages == ["no_such_package_xyz"]
    with pytest.raises(InvalidArgument):
        corpus.collect(("no_such_package_xyz",))


# --- tokenizer ---------------------------------------------------------------


def test_tokenizer_is_lossless_on_unseen_text() -> None:
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    for text in (TRICKY_CODE, "\x00\x01 ÿ \u2028 \ufeff", "   \n\t\t\n", "中文 🚀🚀"):
        assert tok.decode(tok.encode(text).ids) == text
    stream = build_stream(encode_texts(tok, ["ab", "c"]), eot_id=0)
    assert stream[0] == 0 and stream[-1] == 0 and int((stream == 0).sum()) == 3


# --- evaluation maths --------------------------------------------------------


def test_simulate_rounds_on_hand_built_vector() -> None:
    agree = [True, True, False, True, True, True, True, False]
    # k=2: [T,T]+1 → pos 3; [T,T]+1 → pos 6; [T,F]: 1 accepted + 1 → pos 8. 3 rounds.
    assert simulate_rounds(agree, 2) == (8, 3)
    # k=4: [T,T,F] → 2+1 → pos 3; [T,T,T,T] → 4 + bonus → pos 8. 2 rounds.
    assert simulate_rounds(agree, 4) == (8, 2)
    assert simulate_rounds(agree, 8) == (8, 2)
    assert simulate_rounds([False] * 5, 4) == (5, 5)  # each round: the oracle's token only
    assert simulate_rounds([True] * 10, 4) == (10, 2)  # k+1 tokens per round
    assert simulate_rounds([True] * 3, 8) == (3, 1)  # cut at the end of the sequence
    assert tokens_per_round([agree, [False] * 4], 2) == pytest.approx(12 / 7)
    with pytest.raises(InvalidArgument):
        simulate_rounds(agree, 0)


def test_expected_tokens_per_round_formula() -> None:
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(InvalidArgument):
        expected_tokens_per_round(1.5, 2)


def test_speedup_formula() -> None:
    timing = {"t_draft_1_ms": 1.0, "t_oracle_1_ms": 10.0, "t_oracle_ms": {"3": 12.0, "5": 14.0}}
    got = speedups(timing, {"2": 2.5, "4": 3.0})
    assert got["2"] == pytest.approx(2.5 * 10 / (2 * 1 + 12))
    assert got["4"] == pytest.approx(3.0 * 10 / (4 * 1 + 14))


# --- options -----------------------------------------------------------------


def test_schedule_warms_up_then_decays() -> None:
    assert lr_at(0, 0.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 0.0, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_parse_size_and_flags_override_preset(tmp_path: Path) -> None:
    assert parse_size("256,30,512,4,2") == ModelSize(256, 30, 512, 4, 2)
    for bad in ("256,30", "256,30,512,3,2", "a,b,c,d,e"):
        with pytest.raises(InvalidArgument):
            parse_size(bad)
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--tiny", "--out", str(tmp_path), "--oracle-steps", "7"])
    opts = cli.options_from_args(args)
    assert opts.oracle.max_steps == 7 and opts.packages == (corpus.STDLIB,)
    args = parser.parse_args(["train", "--out", str(tmp_path), "--oracle-minutes", "1.5"])
    opts = cli.options_from_args(args)
    assert opts.oracle.minutes == 1.5 and opts.oracle.max_steps is None
    assert opts.oracle_size == ModelSize(256, 30, 512, 4, 2)


# --- generation and acceptance on random toy models ---------------------------


def _toy_model(seed: int) -> Any:
    from specdec.training.modeling import build_model, llama_config

    config = llama_config(ModelSize(32, 2, 64, 2, 1), 97, 0, 128)
    # Untied: with a tied random embedding every model just repeats its last token.
    config.tie_word_embeddings = False
    return build_model(config, seed).eval()


def test_greedy_generation_matches_transformers_generate() -> None:
    from specdec.training.distill import generate

    model = _toy_model(0)
    prompts = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    ours = generate(
        model, prompts, 9, torch.ones(3, dtype=torch.bool), torch.Generator(), torch.device("cpu")
    )
    theirs = model.generate(prompts, max_new_tokens=9, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_acceptance_of_a_model_against_itself_is_one() -> None:
    from specdec.training.evaluate import acceptance

    model = _toy_model(1)
    prompts = torch.randint(1, 97, (4, 6), generator=torch.Generator().manual_seed(1))
    same = acceptance(model, model, prompts, 10, torch.device("cpu"), batch=3)
    assert same["greedy"]["acceptance"] == 1.0
    assert same["greedy"]["tokens_per_round"]["4"] == pytest.approx(40 / 8)  # 5+5 per sequence
    assert same["t1"]["acceptance"] == pytest.approx(1.0, abs=1e-5)
    other = acceptance(model, _toy_model(2), prompts, 10, torch.device("cpu"))
    assert other["greedy"]["acceptance"] < 1.0 and other["t1"]["acceptance"] < 0.99


def test_training_package_never_imports_grpc_or_opentelemetry() -> None:
    # The GPU machine that trains has neither; a fresh interpreter shows what really loads.
    import subprocess
    import sys

    code = (
        "import sys, specdec.training.cli, specdec.training.pipeline, specdec.training.evaluate\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'opentelemetry'})\n"
        "print(bad)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
