"""Byte-level BPE for Python source, and parallel encoding of the corpus into one token stream.

Byte-level BPE (GPT-2 pre-tokenizer and decoder, the 256 byte symbols always in the
alphabet) is lossless: decode(encode(text)) == text for any string, indentation, tabs,
CRLF and non-ASCII included; ``clean_up_tokenization_spaces`` is off so the HF wrapper
keeps that property. ``<|endoftext|>`` is the only special token; it separates files in the
stream and is BOS, EOS and padding. Encoding adds no special tokens on its own.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from specdec.core.errors import InvalidArgument

EOT = "<|endoftext|>"


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, max_bytes: int | None = None, min_frequency: int = 2
) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (at most ``max_bytes`` of them, in order)."""
    if vocab_size < 257 + 1:
        raise InvalidArgument(f"vocab_size must exceed 257 (bytes + EOT), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def sample() -> Iterator[str]:
        budget = max_bytes
        for text in texts:
            if budget is not None and budget <= 0:
                return
            yield text
            if budget is not None:
                budget -= len(text)

    tok.train_from_iterator(sample(), trainer=trainer)
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} should be id 0 after training, got {tok.token_to_id(EOT)}")
    return tok


def eot_id(tok: Tokenizer) -> int:
    """Id of ``<|endoftext|>`` (0 for tokenizers trained here)."""
    tid = tok.token_to_id(EOT)
    if tid is None:
        raise InvalidArgument(f"tokenizer has no {EOT} token")
    return int(tid)


def to_hf(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap as a PreTrainedTokenizerFast with BOS = EOS = PAD = ``<|endoftext|>``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(hf_tok: PreTrainedTokenizerFast, folder: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json loadable by AutoTokenizer (v4 and v5)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # v5 writes its own class name ("TokenizersBackend"); the v4 name loads on both.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["clean_up_tokenization_spaces"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def encode_texts(tok: Tokenizer, texts: Sequence[str], chunk: int = 256) -> list[array]:
    """Token ids of each text (no special tokens), encoded in parallel by tokenizers' pool.

    The pool size is RAYON_NUM_THREADS, read once when tokenizers first encodes.
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out: list[array] = []
    for start in range(0, len(texts), chunk):
        for enc in encode(list(texts[start : start + chunk]), add_special_tokens=False):
            out.append(array("i", enc.ids))
    return out


def build_stream(encoded: Sequence[array], eot_id: int) -> torch.Tensor:
    """One int32 stream: EOT, file 1, EOT, file 2, ..., EOT (EOT between files and at both ends)."""
    total = sum(len(ids) for ids in encoded) + len(encoded) + 1
    buf = array("i", [eot_id])
    for ids in encoded:
        buf.extend(ids)
        buf.append(eot_id)
    if len(buf) != total:
        raise RuntimeError(f"stream length {len(buf)} != expected {total}")
    return torch.frombuffer(bytearray(buf.tobytes()), dtype=torch.int32)
