"""Loading a causal LM and its tokenizer, and deciding whether two of them can be paired.

A draft and an oracle can only be compared token for token when they share the
tokenizer *and* the width of their logits: the verifier indexes the oracle's
distribution p with the draft's token ids and compares it with the draft's q.
``vocab_fingerprint`` names a tokenizer by a short hash of its vocabulary, so
two processes (edge draft, GPU oracle) can check compatibility by exchanging a
string instead of a vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.core.errors import InvalidArgument, NotFound, VocabularyMismatch

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_models"
DEMO_ORACLE = DEMO_DIR / "oracle"
DEMO_DRAFT = DEMO_DIR / "draft"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

FINGERPRINT_HEX_CHARS = 16


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal LM ready for inference, with what the speculation code needs to know about it.

    vocab_size: the width V of the model's logits (may exceed ``len(tokenizer)``:
        embedding matrices are often padded to a multiple of 64 or 128).
    max_context: the most positions the model can attend over.
    eos_token_ids: ids that end generation, in the precedence order HF uses
        (generation_config, then config, then tokenizer).
    fingerprint: ``vocab_fingerprint(tokenizer)``.
    """

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    fingerprint: str

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids`` (special tokens kept, as HF's stop-string matching sees them)."""
        return str(self.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False))


def vocab_fingerprint(tokenizer: Any) -> str:
    """Short sha256 hex of the sorted (token -> id) vocabulary and the special tokens.

    Two tokenizers with the same fingerprint map every string to the same ids
    (up to normalisation rules, which real tokenizer pairs share with their vocab).
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    specials = sorted((str(name), str(value)) for name, value in _special_tokens(tokenizer).items())
    payload = json.dumps({"vocab": vocab, "special": specials}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:FINGERPRINT_HEX_CHARS]


def check_compatible(draft: LoadedModel, oracle: LoadedModel) -> None:
    """Raise ``VocabularyMismatch`` unless ``draft`` can propose tokens for ``oracle``."""
    if draft.fingerprint != oracle.fingerprint:
        raise VocabularyMismatch(
            f"draft {draft.name!r} (vocab fingerprint {draft.fingerprint}) and oracle "
            f"{oracle.name!r} (vocab fingerprint {oracle.fingerprint}) use different "
            "tokenizers; pick a draft from the oracle's model family"
        )
    if draft.vocab_size != oracle.vocab_size:
        raise VocabularyMismatch(
            f"draft {draft.name!r} has {draft.vocab_size} logits per position but oracle "
            f"{oracle.name!r} has {oracle.vocab_size}; their distributions cannot be compared"
        )


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder or a hub id, in eval mode.

    Raises ``NotFound`` when the folder (or hub id) does not exist, ``InvalidArgument``
    when it is not a causal LM, the dtype is unknown, or CUDA is asked for but absent.
    ``random:NAME`` builds a real model's shape with random weights
    (``specdec.bench.shapes``, for benchmarks).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name_or_path.startswith("random:"):  # benchmarks: a real shape, random weights
        from specdec.bench.shapes import load_random

        return load_random(name_or_path, device, dtype)  # type: ignore[no-any-return]
    torch_dtype = _parse_dtype(dtype)
    torch_device = _parse_device(device)
    source = _resolve_source(name_or_path)

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise NotFound(
            f"cannot read a model config from {name_or_path!r}: {exc}. Give a folder holding "
            "config.json (as written by save_pretrained) or a hub id available offline"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except ValueError as exc:
        raise InvalidArgument(
            f"{name_or_path!r} (model_type {getattr(config, 'model_type', '?')!r}) is not a "
            f"causal language model: {exc}"
        ) from exc
    except OSError as exc:
        raise NotFound(f"cannot load the weights of {name_or_path!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise NotFound(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from exc

    model = model.to(torch_device)  # type: ignore[arg-type]
    model.eval()
    output_embeddings = model.get_output_embeddings()
    vocab_size = (
        int(output_embeddings.weight.shape[0])
        if output_embeddings is not None
        else int(config.vocab_size)
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name_or_path,
        device=torch_device,
        dtype=torch_dtype,
        vocab_size=vocab_size,
        max_context=_max_context(config),
        eos_token_ids=_eos_token_ids(model, config, tokenizer),
        fingerprint=vocab_fingerprint(tokenizer),
    )


def _parse_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise InvalidArgument(
            f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}"
        ) from None


def _parse_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise InvalidArgument(f"unknown device {device!r}: {exc}") from exc
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(
                f"device {device!r} asked for, but CUDA is not available on this machine"
            )
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise InvalidArgument(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif torch_device.type != "cpu":
        raise InvalidArgument(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return torch_device


def _resolve_source(name_or_path: str) -> str:
    """A local folder as a string, or a hub id; a path-like name that does not exist is NotFound."""
    if not name_or_path:
        raise InvalidArgument("model name or path is empty")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidArgument(f"{name_or_path!r} is a file; give the model's folder")
        if not (path / "config.json").is_file():
            raise NotFound(f"folder {name_or_path!r} has no config.json: not a saved HF model")
        return str(path)
    # Hub ids look like "name" or "org/name"; anything else is a path that is missing.
    looks_like_path = (
        path.is_absolute()
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )
    if looks_like_path:
        raise NotFound(f"model folder {name_or_path!r} does not exist")
    return name_or_path


def _max_context(config: Any) -> int:
    for attribute in (
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
    ):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise InvalidArgument(
        f"model config ({getattr(config, 'model_type', '?')}) does not say its context length"
    )


def _eos_token_ids(model: Any, config: Any, tokenizer: Any) -> tuple[int, ...]:
    generation_config = getattr(model, "generation_config", None)
    for source in (generation_config, config, tokenizer):
        ids = _as_ids(getattr(source, "eos_token_id", None))
        if ids:
            return ids
    return ()


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    return tuple(dict.fromkeys(int(v) for v in value))


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    specials = getattr(tokenizer, "special_tokens_map", None)
    if isinstance(specials, dict):
        return specials
    return {}
