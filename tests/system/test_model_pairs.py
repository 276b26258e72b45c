"""Real model pairs through real services: accepted when compatible, refused when not.

* An "instruct" oracle and a "base" draft of one tokenizer, their embeddings padded to
  different widths (128 and 112 logit rows for 96 ids, as Qwen2.5-7B / -0.5B), the
  instruct one with other special-token settings and three EOS ids in its generation
  config (as Llama-3.1 Instruct). Padded rows are scaled copies of real ones, so
  unmasked they would win most argmaxes: the outputs must be the oracle's with the
  padded ids at probability zero, and every oracle EOS id must end a turn.
* A draft of another tokenizer: FAILED_PRECONDITION when a model draft is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from specdec.client import Client
from specdec.launch import Cluster, cluster
from tests.conftest import (
    EOS_ID,
    OTHER_CORPUS,
    VOCAB_SIZE,
    build_model,
    build_tokenizer,
    perturb,
    save_model,
)
from tests.engine.test_models import padded_model

PROMPTS = [[1, 5, 9, 12], [1, 30, 31, 32, 33, 34, 35], [1, 7]]
PADDED = list(range(VOCAB_SIZE, 128))


def hf_reference(
    folder: Path, prompt: list[int], max_new_tokens: int, eos: list[int] | None
) -> list[int]:
    """HF greedy generate of the oracle alone with the padded ids suppressed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=0, suppress_tokens=PADDED,
    )  # fmt: skip
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path, list[int]]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("pairs")
    tokenizer = build_tokenizer()
    oracle = padded_model(tokenizer, root / "instruct", logits=128, seed=3)
    # The base sibling: nearly the same weights, its embedding padded to 112 rows.
    sibling = perturb(AutoModelForCausalLM.from_pretrained(oracle), noise=0.02, seed=4)
    sibling.resize_token_embeddings(112, mean_resizing=False)
    base = save_model(sibling, tokenizer, root / "base")
    # Two more EOS ids, taken from the oracle's own greedy output so that they occur.
    first = hf_reference(oracle, PROMPTS[0], 24, None)
    eos = list(dict.fromkeys([EOS_ID, first[8], first[12]]))
    model = AutoModelForCausalLM.from_pretrained(oracle)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(oracle)
    AutoTokenizer.from_pretrained(oracle, eos_token="<unk>", pad_token="<s>").save_pretrained(
        oracle
    )
    (root / "run").mkdir()
    with cluster(root / "run") as c:
        c.start_gateway("--tokenizer", str(oracle))
        c.start_oracle(oracle, "--rescue-draft", str(base), oracle_id="instruct")
        c.start_draft(base, draft_id="base")
        c.wait_workers(oracles=1, drafts=1)
        yield c, oracle, eos


def test_padded_pair_registers_with_one_vocabulary(pair: tuple[Cluster, Path, Any]) -> None:
    c, _, _ = pair
    with Client(c.address, timeout=60) as client:
        workers = {w.worker_id: w for w in client.list_workers()}
    assert workers["instruct"].vocab_fingerprint == workers["base"].vocab_fingerprint


@pytest.mark.parametrize("k", [0, 4])
def test_greedy_output_is_the_oracles_with_padding_masked(
    pair: tuple[Cluster, Path, Any], k: int
) -> None:
    c, oracle, _ = pair
    with Client(c.address, timeout=60) as client:
        for prompt in PROMPTS:
            result = client.generate(prompt, max_new_tokens=24, k=k, ignore_eos=True)
            assert result.token_ids == hf_reference(oracle, prompt, 24, None), (k, prompt)
            if k:
                assert result.stats.draft_id == "base"
                assert result.stats.accepted_tokens > 0


def test_every_eos_id_of_the_oracle_ends_the_turn(pair: tuple[Cluster, Path, Any]) -> None:
    c, oracle, eos = pair
    ended_by = set()
    with Client(c.address, timeout=60) as client:
        for prompt in PROMPTS:
            expected = hf_reference(oracle, prompt, 24, eos)
            result = client.generate(prompt, max_new_tokens=24, k=4)
            assert result.token_ids == expected, prompt
            if expected[-1] in eos:
                assert result.finish_reason == "eos"
                ended_by.add(expected[-1])
    assert ended_by - {EOS_ID}, "no prompt ended at an instruct-only EOS id"


def test_sampled_tokens_never_are_padding(pair: tuple[Cluster, Path, Any]) -> None:
    c, _, _ = pair
    with Client(c.address, timeout=60) as client:
        for seed in range(4):
            result = client.generate(
                PROMPTS[1], max_new_tokens=32, k=4, temperature=1.0, seed=seed, ignore_eos=True
            )
            assert len(result.token_ids) == 32
            assert max(result.token_ids) < VOCAB_SIZE


def test_draft_of_another_tokenizer_is_refused(tmp_path: Path, model_dir: Any) -> None:
    other = save_model(
        build_model("llama", seed=5), build_tokenizer(OTHER_CORPUS, VOCAB_SIZE), tmp_path / "x"
    )
    oracle = model_dir("llama", "oracle")
    (tmp_path / "run").mkdir()
    with cluster(tmp_path / "run") as c:
        c.start_gateway("--tokenizer", str(oracle))
        c.start_oracle(oracle, oracle_id="o")
        c.start_draft(other, draft_id="stranger")
        c.wait_workers(oracles=1, drafts=1)
        client = Client(c.address, timeout=60)
        with client, pytest.raises(grpc.RpcError) as failure:
            client.generate(PROMPTS[0], max_new_tokens=8, k=4, drafter="model")
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stranger: they use different tokenizers" in str(failure.value.details())
        # Without insisting on a model draft, the oracle serves the turn alone.
        with Client(c.address, timeout=60) as client:
            result = client.generate(PROMPTS[0], max_new_tokens=8, k=4, ignore_eos=True)
        assert len(result.token_ids) == 8 and result.stats.draft_id == ""
