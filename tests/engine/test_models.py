"""Model loading, vocabulary fingerprints and draft/oracle compatibility."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.core.errors import InvalidArgument, NotFound, VocabularyMismatch
from specdec.engine.models import (
    DEMO_DRAFT,
    DEMO_ORACLE,
    check_compatible,
    load_model,
    vocab_fingerprint,
)
from tests.conftest import (
    EOS_ID,
    MAX_POSITIONS,
    OTHER_CORPUS,
    VOCAB_SIZE,
    build_model,
    build_tokenizer,
    save_model,
    tiny_config,
)


def test_loaded_model_fields(loaded: Callable[..., Any]) -> None:
    for arch in ("llama", "gpt2"):
        model = loaded(arch, "oracle")
        assert model.vocab_size == VOCAB_SIZE
        # gpt2 names it n_positions, llama max_position_embeddings.
        assert model.max_context == MAX_POSITIONS
        assert model.eos_token_ids == (EOS_ID,)
        assert model.device == torch.device("cpu")
        assert model.dtype == torch.float32
        assert not model.model.training
        assert model.fingerprint == vocab_fingerprint(model.tokenizer)


def test_fingerprint_same_tokenizer_equal(loaded: Callable[..., Any], tiny_tokenizer: Any) -> None:
    # Saved and reloaded, in two folders: still the same vocabulary.
    assert loaded("llama", "oracle").fingerprint == loaded("gpt2", "draft").fingerprint
    assert loaded("llama", "oracle").fingerprint == vocab_fingerprint(tiny_tokenizer)
    assert len(vocab_fingerprint(tiny_tokenizer)) == 16


def test_fingerprint_differs_for_other_vocab(tiny_tokenizer: Any) -> None:
    other = build_tokenizer(OTHER_CORPUS, vocab_size=VOCAB_SIZE)
    assert vocab_fingerprint(other) != vocab_fingerprint(tiny_tokenizer)


def test_fingerprint_differs_with_an_added_special_token() -> None:
    tokenizer = build_tokenizer()
    before = vocab_fingerprint(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert vocab_fingerprint(tokenizer) != before


def test_check_compatible_accepts_same_tokenizer(loaded: Callable[..., Any]) -> None:
    check_compatible(loaded("llama", "draft"), loaded("llama", "oracle"))
    # Architectures may differ: only the vocabulary matters.
    check_compatible(loaded("gpt2", "draft"), loaded("llama", "oracle"))


def test_check_compatible_rejects_other_tokenizer(
    tmp_path: Path, loaded: Callable[..., Any]
) -> None:
    other = build_tokenizer(OTHER_CORPUS, vocab_size=VOCAB_SIZE)
    draft = load_model(str(save_model(build_model("llama", seed=3), other, tmp_path / "m")))
    with pytest.raises(VocabularyMismatch, match="different tokenizers"):
        check_compatible(draft, loaded("llama", "oracle"))


def padded_model(tokenizer: Any, folder: Path, logits: int, seed: int = 0) -> Path:
    """A llama of ``tokenizer`` whose embedding is padded to ``logits`` rows, the padded
    lm_head rows scaled copies of real ones: unmasked, they would win every argmax."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=logits)).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[VOCAB_SIZE:] = 4 * head[torch.arange(VOCAB_SIZE, logits) % VOCAB_SIZE]
    model.generation_config.eos_token_id = EOS_ID
    return save_model(model, tokenizer, folder)


def test_padded_logit_rows_are_dropped_exactly(tmp_path: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    folder = padded_model(tiny_tokenizer, tmp_path / "padded", logits=128)
    padded = load_model(str(folder))
    assert (padded.vocab_size, padded.padded_logits) == (VOCAB_SIZE, 128 - VOCAB_SIZE)
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    raw = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        full = raw(ids).logits
        kept = padded.model(ids).logits
    assert full[0, -1].argmax() >= VOCAB_SIZE  # the padding would win, unmasked
    assert kept.shape[-1] == VOCAB_SIZE
    assert torch.equal(kept, full[..., :VOCAB_SIZE])  # = the padded ids masked to -inf


def test_pairs_padded_differently_are_compatible(
    tmp_path: Path, tiny_tokenizer: Any, loaded: Callable[..., Any]
) -> None:
    # Qwen2.5-0.5B / -7B: one tokenizer, 151,936 against 152,064 logits.
    draft = load_model(str(padded_model(tiny_tokenizer, tmp_path / "d", logits=112, seed=1)))
    oracle = load_model(str(padded_model(tiny_tokenizer, tmp_path / "o", logits=128, seed=2)))
    assert draft.fingerprint == oracle.fingerprint == loaded("llama", "oracle").fingerprint
    check_compatible(draft, oracle)
    check_compatible(oracle, draft)
    check_compatible(draft, loaded("llama", "oracle"))


def test_fingerprint_ignores_special_token_settings(tiny_tokenizer: Any, tmp_path: Path) -> None:
    # An instruct sibling: the same vocabulary, another EOS and padding token.
    tiny_tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    instruct = AutoTokenizer.from_pretrained(tmp_path, eos_token="<unk>", pad_token="<s>")
    assert instruct.eos_token_id != tiny_tokenizer.eos_token_id
    assert vocab_fingerprint(instruct) == vocab_fingerprint(tiny_tokenizer)


def test_check_compatible_refuses_a_draft_the_oracle_cannot_score(
    tmp_path: Path, tiny_tokenizer: Any, loaded: Callable[..., Any]
) -> None:
    # An oracle with fewer logits than its tokenizer has ids cannot score the last ones.
    from transformers import AutoModelForCausalLM

    narrow = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=80))
    oracle = load_model(str(save_model(narrow, tiny_tokenizer, tmp_path / "narrow")))
    assert oracle.vocab_size == 80
    with pytest.raises(VocabularyMismatch, match="scores only 80"):
        check_compatible(loaded("llama", "draft"), oracle)
    check_compatible(oracle, loaded("llama", "draft"))


def test_eos_ids_come_from_generation_config(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = build_model("qwen2", seed=5)
    model.generation_config.eos_token_id = [7, 2]
    loaded_model = load_model(str(save_model(model, tiny_tokenizer, tmp_path / "m")))
    assert loaded_model.eos_token_ids == (7, 2)


def test_missing_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        load_model(str(tmp_path / "no_such_model"))


def test_folder_without_config_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match=r"config\.json"):
        load_model(str(tmp_path / "empty"))


def test_file_instead_of_folder_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(InvalidArgument, match="folder"):
        load_model(str(path))


def test_not_a_causal_lm_is_invalid(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(vocab_size=32, d_model=16, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(InvalidArgument, match="not a causal language model"):
        load_model(str(tmp_path))


def test_bad_dtype_and_device_are_invalid(model_dir: Callable[..., Path]) -> None:
    folder = str(model_dir("llama", "oracle"))
    with pytest.raises(InvalidArgument, match="dtype"):
        load_model(folder, dtype="float8")
    with pytest.raises(InvalidArgument, match="device"):
        load_model(folder, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_gpu_is_invalid(model_dir: Callable[..., Path]) -> None:
    with pytest.raises(InvalidArgument, match="CUDA is not available"):
        load_model(str(model_dir("llama", "oracle")), device="cuda")


def test_bfloat16_load(model_dir: Callable[..., Path]) -> None:
    model = load_model(str(model_dir("llama", "oracle")), dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert next(model.model.parameters()).dtype == torch.bfloat16


def test_demo_paths_point_into_the_package() -> None:
    assert DEMO_ORACLE.parent == DEMO_DRAFT.parent
    assert DEMO_ORACLE.parent.name == "demo_models"
    assert DEMO_ORACLE.parent.parent.name == "specdec"
