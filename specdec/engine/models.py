"""Loading a causal LM and its tokenizer, and deciding whether two of them can be paired.

A draft and an oracle can only be compared token for token when their ids mean the
same strings: the verifier indexes the oracle's distribution p with the draft's token
ids and compares it with the draft's q. ``vocab_fingerprint`` names a tokenizer by a
short hash of its token → id map, so two processes (edge draft, GPU oracle) can check
compatibility by exchanging a string instead of a vocabulary.

Logit rows past the tokenizer's ids (embedding matrices padded to a multiple of 64 or
128, differently within one family) are dropped at load: the model's logits are then
exactly its logits over the ids its tokenizer can produce, which is the padded rows
masked to −∞, probability zero, for the draft and the oracle alike, in every forward
path. ``check_compatible`` applies ``specdec.core.vocab.vocabulary_mismatch``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.core.errors import InvalidArgument, NotFound, VocabularyMismatch
from specdec.core.vocab import vocabulary_mismatch

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

    vocab_size: the width V of the model's logits, which are those of the ids the
        tokenizer can produce (padded rows past them were dropped at load).
    padded_logits: how many padded logit rows were dropped (0 for most models).
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
    padded_logits: int = 0

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids`` (special tokens kept, as HF's stop-string matching sees them)."""
        return str(self.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False))


def vocab_fingerprint(tokenizer: Any) -> str:
    """Short sha256 hex of the sorted (token -> id) map of every id the tokenizer produces.

    Two tokenizers with the same fingerprint give every id the same string, which is
    all verification needs. Which tokens are BOS, EOS or padding is left out: a base
    model and its instruct sibling share the vocabulary but not those settings, and the
    oracle's stopping rules are the ones that count.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps(vocab, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:FINGERPRINT_HEX_CHARS]


def usable_vocab_size(tokenizer: Any, logits: int) -> int:
    """The ids a model can emit: those its tokenizer produces, within its ``logits`` rows."""
    ids = tokenizer.get_vocab().values()
    return min(logits, max(ids) + 1) if ids else logits


def check_compatible(draft: LoadedModel, oracle: LoadedModel) -> None:
    """Raise ``VocabularyMismatch`` unless ``draft`` can propose tokens for ``oracle``."""
    reason = vocabulary_mismatch(
        draft.fingerprint, draft.vocab_size, oracle.fingerprint, oracle.vocab_size
    )
    if reason is not None:
        raise VocabularyMismatch(
            f"draft {draft.name!r} cannot draft for oracle {oracle.name!r}: {reason}"
        )


def drop_padded_logits(model: Any, usable: int) -> int:
    """Keep the first ``usable`` rows of the input and output embeddings; returns how many
    rows were dropped. Logits over the kept ids are unchanged, bit for bit."""
    output_embeddings = model.get_output_embeddings()
    rows = int(output_embeddings.weight.shape[0]) if output_embeddings is not None else usable
    if rows <= usable:
        return 0
    model.resize_token_embeddings(usable, mean_resizing=False)
    return rows - usable


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

    output_embeddings = model.get_output_embeddings()
    logits = (
        int(output_embeddings.weight.shape[0])
        if output_embeddings is not None
        else int(config.vocab_size)
    )
    vocab_size = usable_vocab_size(tokenizer, logits)
    padded = drop_padded_logits(model, vocab_size)
    model = model.to(torch_device)  # type: ignore[arg-type]
    model.eval()
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
        padded_logits=padded,
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
