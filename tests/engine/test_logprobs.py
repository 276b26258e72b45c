"""Logprobs from the verify pass: every path that judges a block (one session alone, a
batch over HF caches, a batch over static KV slots, a batch over paged KV) gives each
committed token the oracle's own log-softmax, and the same verdict as without them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from specdec.core.sampling import SamplingParams
from specdec.core.types import Verdict, committed_tokens
from specdec.engine.batched import BatchItem, verify_batch
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle
from specdec.engine.paged_kv import PagedCache, PagedPool
from specdec.engine.static_kv import SlotCache, SlotPool
from tests.engine.test_batched_verify import ROWS, make_rows, next_logits, outcome_verdict

LOGPROB_ATOL = 1e-4  # float32, a batched forward against one full forward per position
TOP = 5


def expected_logprobs(
    model: LoadedModel, committed: list[int], tokens: list[int], params: SamplingParams
) -> list[tuple[float, list[int], list[float]]]:
    """Per token: log_softmax of the oracle's logits (/ T when sampling) at its position,
    from one full forward of everything before it, and the TOP likeliest."""
    out = []
    context = list(committed)
    for token in tokens:
        z = next_logits(model, context)
        if params.temperature > 0:
            z = z / params.temperature
        lp = torch.log_softmax(z.double(), dim=-1)
        top = torch.topk(lp, TOP)
        out.append((float(lp[token]), top.indices.tolist(), top.values.tolist()))
        context.append(token)
    return out


def check(model: LoadedModel, item: BatchItem, verdict: Verdict) -> None:
    tokens = committed_tokens(item.block, verdict)
    assert verdict.logprobs is not None and len(verdict.logprobs) == len(tokens)
    expected = expected_logprobs(model, list(item.committed), tokens, item.params)
    for got, (logprob, top_ids, top_values) in zip(verdict.logprobs, expected, strict=True):
        assert got.logprob == pytest.approx(logprob, abs=LOGPROB_ATOL)
        assert list(got.top_token_ids) == top_ids
        assert list(got.top_logprobs) == pytest.approx(top_values, abs=LOGPROB_ATOL)
        assert got.top_logprobs[0] >= got.logprob - LOGPROB_ATOL


def with_logprobs(items: list[BatchItem], params: SamplingParams | None) -> list[BatchItem]:
    return [
        dataclasses.replace(item, params=dataclasses.replace(params or item.params, logprobs=TOP))
        for item in items
    ]


SAMPLED = SamplingParams(temperature=0.7, top_k=40, top_p=0.9)


@pytest.mark.parametrize("path", ["alone", "batched", "slots", "paged"])
@pytest.mark.parametrize(("mode", "params"), [("greedy", None), ("q", SAMPLED)])
def test_each_committed_token_gets_the_oracles_log_softmax_and_the_same_verdict(
    path: str, mode: str, params: SamplingParams | None, loaded: Callable[[str, str], LoadedModel]
) -> None:
    model = loaded("llama", "oracle")
    plain = Oracle(model)
    accepted = set()
    for seed in (21, 22):
        # The static and paged KV paths as the GPU runs them, eagerly on the CPU (a pool
        # per batch: it holds one batch's rows; the paged one verifies them in two forwards).
        pool: SlotPool | PagedPool | None = None
        if path == "slots":
            pool = SlotPool(model, 8, cuda_graphs=False)
        elif path == "paged":
            pool = PagedPool(model, 64, max_rows=4, cuda_graphs=False, verify_tokens=40)
        oracle = Oracle(model, pool)
        rows = make_rows(model, oracle, mode, seed, ROWS, alone_oracle=plain)
        asked = with_logprobs(rows.batched, params)
        unasked = [
            dataclasses.replace(item, params=dataclasses.replace(a.params, logprobs=None))
            for item, a in zip(rows.alone, asked, strict=True)
        ]
        if path == "alone":
            verdicts = [
                oracle.verify_timed(i.cache, i.committed, i.block, i.params, i.seed)[0]
                for i in asked
            ]
        else:
            result = verify_batch(oracle, asked)
            assert result.forward_rows == len(ROWS)
            verdicts = [outcome_verdict(o) for o in result.results]
            kind = {"slots": SlotCache, "paged": PagedCache}.get(path)
            if kind is not None:
                assert all(isinstance(i.cache, kind) for i in asked)
        for item, plain_item, verdict in zip(asked, unasked, verdicts, strict=True):
            check(model, item, verdict)
            # Asking for logprobs changes no token: the verdict without them is the same.
            bare, _ = plain.verify_timed(
                plain_item.cache, plain_item.committed, plain_item.block, plain_item.params,
                plain_item.seed,
            )  # fmt: skip
            assert bare.logprobs is None  # nothing computed when not asked
            assert (bare.num_accepted, bare.next_token, bare.is_bonus) == (
                verdict.num_accepted, verdict.next_token, verdict.is_bonus,
            )  # fmt: skip
            accepted.add(verdict.num_accepted)
    assert len(accepted) > 1  # rounds stopped at different places: rows 0..n all checked
