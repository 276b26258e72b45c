"""Tests of specdec.core.stopping: where generation ends, fed round by round.

Unit tests use a toy vocabulary whose decode is plain concatenation; the last test checks
the same semantics against HF ``generate(stop_strings=..., eos_token_id=...)`` with a tiny
byte-level BPE tokenizer and a tiny random Llama.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason, StopChecker, StopResult

VOCAB = ["a", "b", "st", "op", "stop", "las", "topper", "<eos>", " ", "x", "é"]
A, B, ST, OP, STOP, LAS, TOPPER, EOS, SP, X, E_ACUTE = range(len(VOCAB))


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def checker(
    max_new: int = 100, stop: tuple[str, ...] = (), stop_ids: tuple[int, ...] = ()
) -> StopChecker:
    params = SamplingParams(max_new_tokens=max_new, stop=stop, stop_token_ids=stop_ids)
    return StopChecker(params, eos_token_ids=[EOS], decode=decode)


def test_max_new_tokens_cuts_inside_a_round() -> None:
    c = checker(max_new=5)
    assert c.feed([A, B, A]) == StopResult(3, None)
    assert c.feed([B, A, B]) == StopResult(2, FinishReason.LENGTH)
    assert c.num_generated == 5 and c.finished
    assert c.feed([A]) == StopResult(0, FinishReason.LENGTH)


def test_eos_is_kept_and_ends() -> None:
    assert checker().feed([A, EOS, B]) == StopResult(2, FinishReason.EOS)


def test_stop_token_ids() -> None:
    assert checker(stop_ids=(X,)).feed([A, X, EOS]) == StopResult(2, FinishReason.STOP_TOKEN)
    # EOS listed among the stop ids (as callers do) is still reported as EOS.
    assert checker(stop_ids=(X, EOS)).feed([A, EOS]) == StopResult(2, FinishReason.EOS)


def test_stop_string_across_rounds() -> None:
    c = checker(stop=("stop",))
    assert c.feed([A, ST]) == StopResult(2, None)
    assert c.feed([OP, A]) == StopResult(1, FinishReason.STOP_STRING)
    assert c.matched_stop == "stop" and c.num_generated == 3


@pytest.mark.parametrize(
    "tokens",
    [[STOP], [ST, OP], [LAS, TOPPER], [A, ST, OP], [ST, OP, A]],
)
def test_stop_string_ends_at_the_completing_token(tokens: list[int]) -> None:
    # HF's own examples: ["st","op"], ["stop"], ["las","topper"] all match "stop".
    end = next(j + 1 for j in range(len(tokens)) if "stop" in decode(tokens[: j + 1]))
    assert checker(stop=("stop",)).feed(tokens) == StopResult(end, FinishReason.STOP_STRING)


def test_first_trigger_in_a_round_wins() -> None:
    c = checker(stop=("ab",))
    assert c.feed([A, B, EOS]) == StopResult(2, FinishReason.STOP_STRING)
    assert checker(stop=("ab",)).feed([EOS, A, B]) == StopResult(1, FinishReason.EOS)
    # One token that is both: the id is reported.
    assert checker(stop=("<eos>",)).feed([A, EOS]) == StopResult(2, FinishReason.EOS)
    # Stop string on the last allowed token: the string is the reason.
    assert checker(max_new=2, stop=("ab",)).feed([A, B]) == StopResult(2, FinishReason.STOP_STRING)
    assert checker(max_new=2).feed([A, EOS]) == StopResult(2, FinishReason.EOS)


def test_stop_string_after_a_long_output_and_multibyte_text() -> None:
    c = checker(max_new=1000, stop=("éx",))
    for _ in range(300):
        assert c.feed([A]) == StopResult(1, None)
    assert c.feed([E_ACUTE]) == StopResult(1, None)
    assert c.feed([X, X]) == StopResult(1, FinishReason.STOP_STRING)


def test_stop_strings_need_a_decoder() -> None:
    with pytest.raises(InvalidArgument, match="tokenizer"):
        StopChecker(SamplingParams(stop=("x",)), eos_token_ids=[EOS], decode=None)
    StopChecker(SamplingParams(), eos_token_ids=[EOS], decode=None).feed([A])


def test_decodes_only_a_tail_window() -> None:
    lengths: list[int] = []

    def recording_decode(ids: list[int]) -> str:
        lengths.append(len(ids))
        return decode(ids)

    params = SamplingParams(max_new_tokens=1000, stop=("xyz", "ab"))
    c = StopChecker(params, eos_token_ids=[EOS], decode=recording_decode)
    rng = random.Random(0)
    while not c.finished:
        c.feed([rng.choice([A, X, SP, ST]) for _ in range(rng.randint(1, 6))])
    # Window: len("xyz") + 2 tokens; one round's check decodes at most window - 1 + 6.
    assert c.finish_reason == FinishReason.LENGTH
    assert max(lengths) <= 3 + 2 - 1 + 6


def reference_end(
    tokens: list[int], max_new: int, stop: tuple[str, ...], stop_ids: set[int]
) -> tuple[int, FinishReason | None]:
    """Spec, token by token on the full generated text (no windows, no rounds)."""
    for j, t in enumerate(tokens[:max_new]):
        if t == EOS:
            return j + 1, FinishReason.EOS
        if t in stop_ids:
            return j + 1, FinishReason.STOP_TOKEN
        if any(s in decode(tokens[: j + 1]) for s in stop):
            return j + 1, FinishReason.STOP_STRING
        if j + 1 == max_new:
            return j + 1, FinishReason.LENGTH
    return min(len(tokens), max_new), None


def chunks(tokens: list[int], rng: random.Random) -> Iterator[list[int]]:
    i = 0
    while i < len(tokens):
        n = rng.randint(1, 8)
        yield tokens[i : i + n]
        i += n


def test_rounds_of_any_size_match_the_token_by_token_spec() -> None:
    rng = random.Random(1)
    stops = [("stop",), ("ab", "bx"), ("pé",), ("aaa",), ()]
    reasons = set()
    for trial in range(400):
        stop = stops[trial % len(stops)]
        tokens = [rng.randrange(len(VOCAB)) for _ in range(rng.randint(0, 40))]
        tokens = [t if t != EOS or rng.random() < 0.3 else A for t in tokens]
        max_new = rng.randint(1, 45)
        c = checker(max_new=max_new, stop=stop, stop_ids=(X,) if trial % 3 == 0 else ())
        kept, reason = 0, None
        for part in chunks(tokens, rng):
            kept_now, reason = c.feed(part)
            kept += kept_now
        expected = reference_end(tokens, max_new, stop, {X} if trial % 3 == 0 else set())
        assert (kept, reason) == expected, (tokens, stop, max_new)
        reasons.add(reason)
    assert reasons == {
        None,
        FinishReason.LENGTH,
        FinishReason.EOS,
        FinishReason.STOP_TOKEN,
        FinishReason.STOP_STRING,
    }


# ---------------------------------------------------------------------------
# against HF generate
# ---------------------------------------------------------------------------

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "stop here and there, then stop again!",
    "hello world, hello tokenizer; speculative decoding is fun.",
    "a draft proposes tokens and an oracle verifies them in one pass.",
]


@pytest.fixture(scope="module")
def hf_pair() -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return tokenizer, LlamaForCausalLM(config).eval()


def test_matches_hf_generate(hf_pair: tuple[PreTrainedTokenizerFast, LlamaForCausalLM]) -> None:
    tokenizer, model = hf_pair

    def hf_decode(ids: list[int]) -> str:
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        assert isinstance(text, str)
        return text

    # Sample only printable-ASCII tokens, so the text holds words to stop on.
    suppress = [
        i
        for i in range(len(tokenizer))
        if not (s := hf_decode([i])) or not all(32 <= ord(ch) < 127 for ch in s)
    ]
    prompt_text = "hello world"
    prompt = tokenizer(prompt_text, return_tensors="pt").input_ids
    max_new = 48

    def generate(seed: int, **kw: object) -> list[int]:
        torch.manual_seed(seed)
        out = model.generate(
            prompt,
            do_sample=True,
            top_k=0,
            max_new_tokens=max_new,
            suppress_tokens=suppress,
            pad_token_id=tokenizer.pad_token_id,
            **{"eos_token_id": None, **kw},
        )
        return out[0, prompt.shape[1] :].tolist()

    rng = random.Random(0)
    compared = 0
    for seed in range(2):
        full = generate(seed)
        assert len(full) == max_new
        text = hf_decode(full)
        cases: list[tuple[tuple[str, ...], list[int]]] = []
        while len(cases) < 5:
            start = rng.randrange(len(text) - 6)
            s = text[start : start + rng.randint(1, 6)]
            # HF also matches strings straddling the prompt; keep ones that cannot.
            if (prompt_text + text).find(s) >= len(prompt_text):
                cases.append(((s,), []))
        cases.append((("zqzqzq",), []))  # never generated: ends on length
        cases.append(((), [full[20]]))  # an EOS id from the middle of the stream
        cases.append(((cases[0][0][0],), [full[12]]))  # both; whichever comes first
        for stop, eos in cases:
            kw: dict[str, object] = {}
            if stop:
                kw.update(stop_strings=list(stop), tokenizer=tokenizer)
            if eos:
                kw.update(eos_token_id=eos)
            hf_out = generate(seed, **kw)
            assert hf_out == full[: len(hf_out)]
            params = SamplingParams(temperature=1.0, max_new_tokens=max_new, stop=stop)
            c = StopChecker(params, eos_token_ids=eos, decode=hf_decode)
            kept = sum(c.feed(part).keep for part in chunks(full, rng))
            assert kept == len(hf_out), (stop, eos, text)
            compared += 1
    assert compared == 16
