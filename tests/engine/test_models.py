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


def test_check_compatible_rejects_other_logits_width(
    tmp_path: Path, tiny_tokenizer: Any, loaded: Callable[..., Any]
) -> None:
    # Same tokenizer, but the embedding is padded to 128 rows: logits are [.., 128].
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=128))
    padded = load_model(str(save_model(model, tiny_tokenizer, tmp_path / "padded")))
    assert padded.vocab_size == 128
    assert padded.fingerprint == loaded("llama", "oracle").fingerprint
    with pytest.raises(VocabularyMismatch, match="logits"):
        check_compatible(padded, loaded("llama", "oracle"))


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
