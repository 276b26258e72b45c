"""Which cache a session of the oracle gets outside a KV pool, and on how many threads a
long CPU prefill runs (``specdec.engine.oracle``; oracle ``--lean-forward`` and
``--prefill-threads``)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from oracle_service.config import OracleConfig
from specdec.config import load_config
from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams
from specdec.core.types import DraftBlock
from specdec.engine.kv_cache import SequenceCache
from specdec.engine.lean_forward import LeanCache
from specdec.engine.models import LoadedModel
from specdec.engine.oracle import Oracle


def test_sessions_outside_a_pool_take_the_lean_forward_where_it_runs(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    """The oracle's ``--lean-forward`` (on by default; SPECDEC_LEAN_FORWARD as the draft's)
    gives sessions outside a KV pool a ``LeanCache``; a model the lean forward does not
    run keeps HF's."""
    assert load_config(OracleConfig, [], env={}).kv_settings().lean_forward
    off = load_config(OracleConfig, [], env={"SPECDEC_LEAN_FORWARD": "false"})
    assert not off.kv_settings().lean_forward
    assert not load_config(OracleConfig, ["--no-lean-forward"], env={}).kv_settings().lean_forward
    llama, gpt2 = loaded("llama", "oracle"), loaded("gpt2", "oracle")
    assert type(Oracle(llama, lean=True).new_cache()) is LeanCache
    assert type(Oracle(llama, lean=False).new_cache()) is SequenceCache
    assert type(Oracle(gpt2, lean=True).new_cache()) is SequenceCache


def test_a_long_cpu_prefill_runs_on_more_threads_and_changes_no_token(
    loaded: Callable[[str, str], LoadedModel],
) -> None:
    """``prefill_threads`` (oracle ``--prefill-threads``): a prefill of 32 tokens or more
    runs on that many torch threads, a verify on the process's own; the threads are put
    back and the outputs are the one-thread oracle's."""
    model = loaded("llama", "oracle")
    seen: list[tuple[int, int]] = []  # (tokens fed, torch threads) per forward
    embed = model.model.model.embed_tokens
    hook = embed.register_forward_hook(
        lambda _m, args, _o: seen.append((args[0].shape[-1], torch.get_num_threads()))
    )
    before = torch.get_num_threads()
    prompt = [(7 * i) % model.vocab_size for i in range(40)]
    outputs = []
    try:
        for threads in (1, before + 1):
            oracle = Oracle(model, lean=True, prefill_threads=threads)
            cache, committed = oracle.new_cache(), list(prompt)
            for _ in range(6):
                verdict = oracle.verify(cache, committed, DraftBlock(()), SamplingParams(), 0)
                committed.append(verdict.next_token)
            outputs.append(committed)
            cache.rollback(0)
            oracle.prefill(cache, prompt[:20])  # short: the process's threads
    finally:
        hook.remove()
    assert outputs[0] == outputs[1]
    assert torch.get_num_threads() == before
    assert seen[-8:] == [(39, before + 1)] + [(1, before)] * 6 + [(19, before)]
    auto = load_config(OracleConfig, [], env={})
    assert auto.resolved_prefill_threads() == min(8, len(os.sched_getaffinity(0)))
    assert (
        load_config(OracleConfig, ["--prefill-threads", "3"], env={}).resolved_prefill_threads()
        == 3
    )
    with pytest.raises(InvalidArgument, match="--prefill-threads"):
        load_config(OracleConfig, ["--prefill-threads", "-1"], env={}).validate()
