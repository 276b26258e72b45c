"""Greedy speculative decoding returns exactly HF ``generate`` of the oracle alone.

Token for token, for every architecture, drafter and k, including where it stops
(EOS, max_new_tokens, stop strings, the context limit). Also the oracle's cache
invariant and the loop's input validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.core.errors import InvalidArgument, VocabularyMismatch
from specdec.core.sampling import (
    RACE_STREAM,
    SamplingParams,
    logits_to_probs,
    position_generator,
)
from specdec.core.stopping import FinishReason
from specdec.core.types import DraftBlock
from specdec.drafters.model_drafter import ModelDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.engine.models import load_model
from specdec.engine.oracle import Oracle
from specdec.engine.quantize import int8_weights
from specdec.generate import GenerationResult, speculative_generate
from tests.conftest import (
    ARCHS,
    EOS_ID,
    OTHER_CORPUS,
    VOCAB_SIZE,
    build_model,
    build_tokenizer,
    save_model,
)

MAX_NEW = 30
# (drafter role or "ngram"/"none", k). close_draft agrees often: partial and full accepts.
DRAFTERS = [
    ("none", 0),
    ("ngram", 4),
    ("close_draft", 1),
    ("close_draft", 2),
    ("close_draft", 4),
    ("close_draft", 8),
    ("draft", 4),
    ("close_draft_int8", 4),  # the draft's Linear layers with int8 weights
]


def make_prompt(length: int) -> list[int]:
    """Deterministic prompt; longer ones repeat a phrase so prompt lookup finds matches."""
    generator = torch.Generator().manual_seed(length)
    phrase = torch.randint(3, VOCAB_SIZE, (min(length, 7),), generator=generator).tolist()
    return (phrase * (length // len(phrase) + 1))[:length]


def make_drafter(loaded: Callable[..., Any], arch: str, role: str) -> Any:
    if role == "none":
        return None
    if role == "ngram":
        return NgramDrafter()
    if role.endswith("_int8"):
        return ModelDrafter(int8_weights(loaded(arch, role.removesuffix("_int8"))))
    return ModelDrafter(loaded(arch, role))


def hf_greedy(
    model: Any,
    prompt: Sequence[int],
    max_new_tokens: int = MAX_NEW,
    eos: Sequence[int] = (EOS_ID,),
    stop: Sequence[str] = (),
) -> list[int]:
    """The oracle alone: HF generate, greedy."""
    kwargs: dict[str, Any] = {}
    if stop:
        kwargs = {"stop_strings": list(stop), "tokenizer": model.tokenizer}
    out = model.model.generate(
        torch.tensor([list(prompt)]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos),
        pad_token_id=eos[0],
        **kwargs,
    )
    return list(out[0, len(prompt) :].tolist())


def speculative(
    loaded: Callable[..., Any],
    arch: str,
    role: str,
    k: int,
    prompt: Sequence[int],
    max_new_tokens: int = MAX_NEW,
    eos: Sequence[int] = (EOS_ID,),
    stop: Sequence[str] = (),
) -> GenerationResult:
    oracle = Oracle(loaded(arch, "oracle"))
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(stop))
    drafter = make_drafter(loaded, arch, role)
    return speculative_generate(prompt, oracle, drafter, params, k, eos_token_ids=eos)


@pytest.fixture(scope="module")
def reference(loaded: Callable[..., Any]) -> Callable[[str, tuple[int, ...]], list[int]]:
    """reference(arch, prompt) -> HF greedy output (EOS_ID, MAX_NEW), computed once."""
    cache: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def get(arch: str, prompt: tuple[int, ...]) -> list[int]:
        if (arch, prompt) not in cache:
            cache[arch, prompt] = hf_greedy(loaded(arch, "oracle"), prompt)
        return cache[arch, prompt]

    return get


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("prompt_length", [1, 5, 17])
@pytest.mark.parametrize(("role", "k"), DRAFTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_hf_greedy(
    arch: str,
    role: str,
    k: int,
    prompt_length: int,
    loaded: Callable[..., Any],
    reference: Callable[..., list[int]],
) -> None:
    prompt = make_prompt(prompt_length)
    expected = reference(arch, tuple(prompt))
    result = speculative(loaded, arch, role, k, prompt)
    assert result.tokens == expected
    ends_with_eos = len(expected) < MAX_NEW or expected[-1] == EOS_ID
    assert result.finish_reason == (FinishReason.EOS if ends_with_eos else FinishReason.LENGTH)
    stats = result.stats
    assert stats.accepted <= stats.proposed <= k * stats.rounds
    # Every round commits accepted + 1 tokens, bar the cut of the last one.
    assert len(result.tokens) <= stats.accepted + stats.rounds


@pytest.mark.parametrize("arch", ARCHS)
def test_close_draft_has_partial_and_full_acceptance(arch: str, loaded: Callable[..., Any]) -> None:
    # The equivalence above is only meaningful if both verdict paths actually ran.
    rounds = [
        r
        for length in (5, 17)
        for r in speculative(loaded, arch, "close_draft", 4, make_prompt(length)).rounds
    ]
    assert any(r.accepted == r.proposed == 4 for r in rounds)  # bonus token
    assert any(0 < r.accepted < r.proposed for r in rounds)  # partial, recovered token
    assert any(r.accepted == 0 for r in rounds)


@pytest.mark.parametrize(("role", "k"), [("none", 0), ("close_draft", 4), ("ngram", 4)])
@pytest.mark.parametrize("arch", ARCHS)
def test_stops_at_eos_like_hf(
    arch: str, role: str, k: int, loaded: Callable[..., Any], reference: Callable[..., list[int]]
) -> None:
    # An EOS id the oracle really emits, a few tokens in (or its last one, if it ends early).
    prompt = make_prompt(5)
    generated = reference(arch, tuple(prompt))
    eos = generated[min(6, len(generated) - 1)]
    expected = hf_greedy(loaded(arch, "oracle"), prompt, eos=(eos,))
    assert expected[-1] == eos and len(expected) <= 7
    result = speculative(loaded, arch, role, k, prompt, eos=(eos,))
    assert result.tokens == expected
    assert result.finish_reason == FinishReason.EOS


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stops_at_max_new_tokens_like_hf(
    arch: str, max_new_tokens: int, loaded: Callable[..., Any]
) -> None:
    prompt = make_prompt(5)
    expected = hf_greedy(loaded(arch, "oracle"), prompt, max_new_tokens=max_new_tokens)
    result = speculative(loaded, arch, "close_draft", 8, prompt, max_new_tokens=max_new_tokens)
    assert result.tokens == expected
    assert len(result.tokens) == max_new_tokens


@pytest.mark.parametrize(("role", "k"), [("none", 0), ("close_draft", 4), ("close_draft", 8)])
@pytest.mark.parametrize("arch", ARCHS)
def test_stop_strings_like_hf(
    arch: str, role: str, k: int, loaded: Callable[..., Any], reference: Callable[..., list[int]]
) -> None:
    oracle = loaded(arch, "oracle")
    prompt = make_prompt(17)
    generated = reference(arch, tuple(prompt))
    # The last 3 characters of the text of the first 8 generated tokens: HF stops there
    # (or earlier, if they already appeared).
    stop = oracle.tokenizer.decode(generated[:8]).strip()[-3:]
    assert len(stop) == 3
    expected = hf_greedy(oracle, prompt, stop=[stop])
    assert len(expected) <= 8
    result = speculative(loaded, arch, role, k, prompt, stop=[stop])
    assert result.tokens == expected
    assert result.finish_reason == FinishReason.STOP_STRING


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stops_at_the_context_limit(arch: str, loaded: Callable[..., Any]) -> None:
    oracle = loaded(arch, "oracle")
    room = 5
    prompt = make_prompt(oracle.max_context - room)
    # HF alone, asked for exactly what fits.
    expected = hf_greedy(oracle, prompt, max_new_tokens=room, eos=(VOCAB_SIZE - 1,))
    for role, k in [("none", 0), ("close_draft", 8)]:
        result = speculative(loaded, arch, role, k, prompt, max_new_tokens=50, eos=())
        assert result.tokens == expected
        assert result.finish_reason == FinishReason.CONTEXT_LIMIT


# --------------------------------------------------------------------------- sampling path


def test_sampled_oracle_alone_matches_a_plain_sampling_loop(loaded: Callable[..., Any]) -> None:
    # k = 0: every round is a bonus draw at position t: the Gumbel-max draw with the
    # noise of position_generator(seed, t, RACE_STREAM), G = -log(-log(1 - u)).
    model = loaded("llama", "oracle")
    params = SamplingParams(temperature=0.9, top_k=20, seed=123, max_new_tokens=12)
    prompt = make_prompt(5)
    result = speculative_generate(prompt, Oracle(model), None, params, 0)
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            logits = model.model(torch.tensor([tokens])).logits[0, -1].float()
            probs = logits_to_probs(logits, params).double()
            gen = position_generator(123, len(tokens), RACE_STREAM)
            u = torch.rand(probs.shape[0], generator=gen, dtype=torch.float64)
            gumbel = -torch.log(-torch.log1p(-u))
            tokens.append(int((torch.log(probs) + gumbel).argmax()))
    assert result.tokens == tokens[len(prompt) :]


def test_sampled_speculation_is_reproducible(loaded: Callable[..., Any]) -> None:
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=25)
    oracle = Oracle(loaded("qwen2", "oracle"))
    runs = [
        speculative_generate(
            make_prompt(5), oracle, ModelDrafter(loaded("qwen2", "close_draft")), params, 4
        )
        for _ in range(2)
    ]
    assert runs[0].tokens == runs[1].tokens
    assert all(0 <= t < VOCAB_SIZE for t in runs[0].tokens)
    assert runs[0].stats.accepted > 0


# --------------------------------------------------------------------------- oracle


def test_verify_leaves_cache_at_new_committed_minus_last(loaded: Callable[..., Any]) -> None:
    oracle = Oracle(loaded("gpt2", "oracle"))
    drafter = ModelDrafter(loaded("gpt2", "close_draft"))
    cache = oracle.new_cache()
    committed = make_prompt(6)
    prefill = oracle.prefill(cache, committed)
    assert (prefill.reused, prefill.computed) == (0, 5)
    for _ in range(6):
        block = drafter.propose(committed, 4, SamplingParams())
        verdict = oracle.verify(cache, committed, block, SamplingParams(), seed=0)
        committed = [*committed, *block.token_ids[: verdict.num_accepted], verdict.next_token]
        assert cache.tokens == committed[:-1]
    # A fresh cache catches up by itself and gives the same verdict.
    block = drafter.propose(committed, 4, SamplingParams())
    fresh = oracle.new_cache()
    assert oracle.verify(fresh, committed, block, SamplingParams(), 0) == oracle.verify(
        cache, committed, block, SamplingParams(), 0
    )


def test_verify_rejects_bad_blocks_without_touching_the_cache(
    loaded: Callable[..., Any],
) -> None:
    model = loaded("llama", "oracle")
    oracle = Oracle(model)
    cache = oracle.new_cache()
    committed = make_prompt(5)
    oracle.prefill(cache, committed)
    before = list(cache.tokens)
    with pytest.raises(InvalidArgument):
        oracle.verify(cache, committed, DraftBlock((3, VOCAB_SIZE)), SamplingParams(), 0)
    with pytest.raises(InvalidArgument):
        oracle.verify(cache, committed, DraftBlock((3,) * 33), SamplingParams(), 0)
    long_context = make_prompt(model.max_context - 2)
    with pytest.raises(InvalidArgument, match="context"):
        oracle.verify(cache, long_context, DraftBlock((3, 4, 5)), SamplingParams(), 0)
    assert cache.tokens == before
    with pytest.raises(InvalidArgument):
        oracle.prefill(cache, [])


def test_verify_timing_is_reported(loaded: Callable[..., Any]) -> None:
    oracle = Oracle(loaded("llama", "oracle"))
    cache = oracle.new_cache()
    _, timing = oracle.verify_timed(cache, make_prompt(9), DraftBlock((4, 5)), SamplingParams(), 0)
    assert timing.prefill_computed == 8
    assert 0 < timing.forward_ns <= timing.verify_ns
    assert timing.prefill_ns <= timing.verify_ns


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("prompt", "k", "match"),
    [
        ([], 2, "empty"),
        ([3, VOCAB_SIZE], 2, "token id"),
        ([3, -1], 2, "token id"),
        ([3] * 128, 2, "context"),
        ([3, 4], -1, "k \\(num_speculative_tokens\\) must be"),
        ([3, 4], 33, "k \\(num_speculative_tokens\\) must be"),
    ],
)
def test_generate_rejects_bad_requests(
    prompt: list[int], k: int, match: str, loaded: Callable[..., Any]
) -> None:
    oracle = Oracle(loaded("llama", "oracle"))
    with pytest.raises(InvalidArgument, match=match):
        speculative_generate(prompt, oracle, None, SamplingParams(), k)


def test_generate_rejects_a_draft_with_another_vocabulary(
    tmp_path: Path, loaded: Callable[..., Any]
) -> None:
    other = build_tokenizer(OTHER_CORPUS, vocab_size=VOCAB_SIZE)
    draft = load_model(str(save_model(build_model("llama", seed=3), other, tmp_path / "m")))
    with pytest.raises(VocabularyMismatch):
        speculative_generate(
            [3, 4], Oracle(loaded("llama", "oracle")), ModelDrafter(draft), SamplingParams(), 2
        )
