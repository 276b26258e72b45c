"""Shared fixtures: tiny random causal LMs (llama, gpt2, qwen2, mistral) saved as HF folders.

Every model shares one tiny BPE tokenizer trained here on a few lines, so draft
and oracle are vocabulary-compatible. Per architecture there are three roles:

* ``oracle``: 2 layers, fixed seed.
* ``draft``: a different, smaller random model (it disagrees with the oracle a lot).
* ``close_draft``: the oracle's weights plus small noise, so it agrees most of
  the time but not always: rounds with partial and full acceptance both occur.

Weights are initialised wider than HF's default (initializer_range) so the
top-1/top-2 logit gap is large: a batched forward and a one-token-at-a-time
forward differ by float rounding, which must never flip a greedy argmax.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ARCHS = ("llama", "gpt2", "qwen2", "mistral")
ROLES = ("oracle", "draft", "close_draft")
VOCAB_SIZE = 96
MAX_POSITIONS = 128
BOS_ID, EOS_ID = 1, 2

# Tiny models are dominated by per-op overhead; several threads only contend on the
# two shared CPU cores of CI-like machines.
torch.set_num_threads(1)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts tokens and the oracle verifies them",
    "a cat sat on the mat and the dog sat on the log",
    "hello world, this is a tiny tokenizer for tests.",
    "every token the draft proposes is checked by one forward of the oracle",
]
OTHER_CORPUS = ["zebras quietly graze", "xylophones vibrate quickly", "jovial wizards box"]


def build_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = VOCAB_SIZE) -> Any:
    """A BPE tokenizer (sentencepiece-style spaces) with exactly ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>"]) == [BOS_ID, EOS_ID]
    return tokenizer


# ChatML, as Qwen's instruct models write it; <|im_end|> closes every message.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_VOCAB_SIZE = 160  # the specials, the printable ASCII bytes, newline and a few merges


def build_chat_tokenizer() -> Any:
    """A byte-level BPE tokenizer (GPT-2's and Qwen's kind: text round-trips exactly) with
    ChatML's special tokens and template, ``CHAT_VOCAB_SIZE`` ids. Its bytes are ASCII
    only, so that whatever a random model generates decodes to valid text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # The byte-level alphabet's character of each byte (GPT-2's bytes_to_unicode):
    # printable ASCII stands for itself, space is U+0120 and newline U+010A.
    ascii_chars = [chr(b) for b in range(0x21, 0x7F)] + [chr(0x100 + 0x20), chr(0x100 + 0x0A)]
    trainer = trainers.BpeTrainer(
        vocab_size=CHAT_VOCAB_SIZE,
        special_tokens=CHAT_SPECIALS,
        initial_alphabet=ascii_chars,
        limit_alphabet=len(ascii_chars),
    )
    backend.train_from_iterator([*CORPUS, "user\nassistant\nsystem\n"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=CHAT_SPECIALS[3:],
    )
    tokenizer.chat_template = CHATML
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>"]) == [BOS_ID, EOS_ID]
    assert len(tokenizer) == CHAT_VOCAB_SIZE, len(tokenizer)
    return tokenizer


def tiny_config(
    arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, init: float = 0.3
) -> Any:
    """An HF config of ``arch`` with ``layers`` layers of width ``hidden``."""
    import transformers

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "initializer_range": init,
        "tie_word_embeddings": False,
    }
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=MAX_POSITIONS, **common
        )
    llama_like = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
        **common,
    }
    if arch == "llama":
        return transformers.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if arch == "mistral":
        # A window shorter than the test sequences, so the window really applies.
        return transformers.MistralConfig(sliding_window=12, **llama_like)
    raise ValueError(arch)


def build_model(
    arch: str, seed: int, hidden: int = 32, layers: int = 2, vocab_size: int = VOCAB_SIZE
) -> Any:
    """A random causal LM of ``arch``, deterministic in ``seed``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, hidden=hidden, layers=layers)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = EOS_ID
    return model.eval()


def perturb(model: Any, noise: float, seed: int) -> Any:
    """``model`` with every weight w replaced by w + noise * std(w) * N(0, 1), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = float(parameter.std()) if parameter.numel() > 1 else 1.0
            parameter.add_(noise * scale * torch.randn(parameter.shape, generator=generator))
    return model


def build_role(arch: str, role: str, vocab_size: int = VOCAB_SIZE) -> Any:
    """The random model for (``arch``, ``role``); see the module docstring."""
    if role == "oracle":
        return build_model(arch, seed=1234, vocab_size=vocab_size)
    if role == "draft":
        return build_model(arch, seed=99, hidden=32, layers=1, vocab_size=vocab_size)
    if role == "close_draft":
        return perturb(build_model(arch, seed=1234, vocab_size=vocab_size), noise=0.02, seed=7)
    raise ValueError(role)


def save_model(model: Any, tokenizer: Any, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any
) -> Callable[[str, str], Path]:
    """model_dir(arch, role) -> folder holding that tiny model and the shared tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, role: str = "oracle") -> Path:
        if (arch, role) not in made:
            made[arch, role] = save_model(
                build_role(arch, role), tiny_tokenizer, root / arch / role
            )
        return made[arch, role]

    return get


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """chat_model_dir(role) -> folder of the llama ``role`` (a vocabulary of
    ``CHAT_VOCAB_SIZE``) with the ChatML tokenizer."""
    root = tmp_path_factory.mktemp("tiny_chat_models")
    tokenizer = build_chat_tokenizer()
    made: dict[str, Path] = {}

    def get(role: str = "oracle") -> Path:
        if role not in made:
            model = build_role("llama", role, CHAT_VOCAB_SIZE)
            made[role] = save_model(model, tokenizer, root / role)
        return made[role]

    return get


@pytest.fixture(scope="session")
def loaded(model_dir: Callable[[str, str], Path]) -> Callable[[str, str], Any]:
    """loaded(arch, role) -> LoadedModel (fp32, CPU), loaded once per session. Do not mutate."""
    from specdec.engine.models import load_model

    cache: dict[tuple[str, str], Any] = {}

    def get(arch: str, role: str = "oracle") -> Any:
        if (arch, role) not in cache:
            cache[arch, role] = load_model(str(model_dir(arch, role)))
        return cache[arch, role]

    return get
