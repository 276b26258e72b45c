"""The most any speculative system can gain with a draft-oracle pair on this machine.

Usage: python scripts/speedup_ceiling.py [--oracle PATH] [--draft PATH] [--prompts 4]
                                         [--new-tokens 128] [--ks 1,2,3,4,6,8]
                                         [--replicas 64] [--hf-forward] [--out ceiling.json]

Offline, in one process, on the prompts of ``specdec bench`` (held-out code, 192 tokens):

1. Acceptance. The oracle writes ``--new-tokens`` per prompt (greedy, and T = 1), then
   one teacher-forced forward of each model gives p and q at every position. Per
   position: greedy, whether argmax q = argmax p; T = 1 coupled (the draft races q with
   the oracle's Gumbel noise, as ``--coupled-sampling`` does), whether the race winners
   agree, over ``--replicas`` noises; T = 1 rejection sampling with the draft's full q,
   accepted with probability Σ min(p, q).
2. Tokens per round. Rounds replayed along each output as a speculative turn runs them:
   a round starts where the last one ended, accepts while the positions agree (at most
   k), and commits one more token. Clustered hard stretches make this lower than the
   i.i.d. formula (1 - α^(k+1)) / (1 - α).
3. Verify cost. The oracle's forward of k + 1 tokens against one, after a 250-token
   prefix, on one thread, the sizes interleaved, on the forward the oracle service runs
   (the lean forward where the model qualifies; ``--hf-forward``: HF's).

The ceiling of k is tokens per round ÷ (t(k+1) / t(1)): the speedup with drafting,
round trips and every other overhead free. A measured speedup (``specdec bench``) can only
come below it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from specdec.engine.models import LoadedModel


def tokens_per_round(agree: list[list[bool]], k: int) -> float:
    """Rounds replayed along each output (``agree[i][t]``: position t would be accepted)."""
    tokens = rounds = 0
    for row in agree:
        t = 0
        while t < len(row):
            n = 0
            while n < k and t + n < len(row) and row[t + n]:
                n += 1
            t += n + 1
            rounds += 1
        tokens += len(row)
    return tokens / max(rounds, 1)


def _continue(model: Any, prompt: list[int], new_tokens: int, sample: bool) -> torch.Tensor:
    """``prompt`` and ``new_tokens`` more of ``model``'s own (greedy, or T = 1, untruncated)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample,
        temperature=1.0, top_k=None, top_p=None, pad_token_id=0,
    )  # fmt: skip
    return out[0]


def agreement(
    oracle: Any, draft: Any, prompts: list[list[int]], new_tokens: int, replicas: int
) -> dict[str, list[list[bool]]]:
    """Per mode (greedy, coupled, rejection), per output (replica), per position."""
    gen = torch.Generator().manual_seed(0)
    modes: dict[str, list[list[bool]]] = {"greedy": [], "t1_coupled": [], "t1_rejection": []}
    for prompt in prompts:
        for sample in (False, True):
            seq = _continue(oracle, prompt, new_tokens, sample)
            start = len(prompt) - 1  # row predicting the first new token
            with torch.no_grad():
                logp = oracle(seq[None, :-1]).logits[0, start:].float().log_softmax(-1)
                logq = draft(seq[None, :-1]).logits[0, start:].float().log_softmax(-1)
            if not sample:
                modes["greedy"].append((logp.argmax(-1) == logq.argmax(-1)).tolist())
                continue
            # [replicas, T, V] Gumbel noise, one T at a time to bound memory.
            coupled = torch.zeros(replicas, len(logp), dtype=torch.bool)
            for t in range(len(logp)):
                u = torch.rand(replicas, logp.shape[-1], generator=gen).clamp_min(1e-20)
                g = -torch.log(-torch.log(u))
                coupled[:, t] = (logp[t] + g).argmax(-1) == (logq[t] + g).argmax(-1)
            overlap = torch.minimum(logp.exp(), logq.exp()).sum(-1)  # [T]
            rejection = torch.rand(replicas, len(logp), generator=gen) < overlap
            modes["t1_coupled"] += coupled.tolist()
            modes["t1_rejection"] += rejection.tolist()
    return modes


def verify_ms(
    oracle: LoadedModel, sizes: list[int], lean: bool, context: int = 250, reps: int = 30
) -> dict[int, float]:
    """Median ms of the oracle's forward of n tokens after a ``context`` prefix, for each
    n of ``sizes``, interleaved so that the machine's drift falls on every size alike. The
    forward is the oracle service's (``lean``: its default, the lean forward; else HF's)."""
    from specdec.engine.oracle import Oracle

    times: dict[int, list[float]] = {n: [] for n in sizes}
    engine = Oracle(oracle, lean=lean)
    prefix = torch.randint(0, oracle.vocab_size, (context,)).tolist()
    for _ in range(reps):
        for n in sizes:
            cache = engine.new_cache()
            cache.extend(prefix, logits_to_keep=1)
            block = torch.randint(0, oracle.vocab_size, (n,)).tolist()
            start = time.perf_counter()
            cache.extend(block)
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.bench.workload import heldout_prompts
    from specdec.engine.models import DEMO_DRAFT, DEMO_ORACLE, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oracle", default=str(DEMO_ORACLE))
    p.add_argument("--draft", default=str(DEMO_DRAFT))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ks", default="1,2,3,4,6,8")
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument(
        "--hf-forward",
        action="store_true",
        help="time HF's forward instead of the oracle service's default (--no-lean-forward)",
    )
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.oracle)
    oracle = AutoModelForCausalLM.from_pretrained(args.oracle, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    prompts = heldout_prompts(lambda text: tokenizer(text)["input_ids"], args.prompts)
    modes = agreement(oracle, draft, prompts, args.new_tokens, args.replicas)
    ks = [int(k) for k in args.ks.split(",")]
    del oracle  # timed below as the service loads and runs it
    served = load_model(args.oracle)
    timed = verify_ms(served, [1, *(k + 1 for k in ks)], lean=not args.hf_forward)
    one, ms = timed[1], {k: timed[k + 1] for k in ks}
    cost = {k: ms[k] / one for k in ks}
    rows = []
    for k in ks:
        row: dict[str, Any] = {
            "k": k,
            "verify_ms": round(ms[k], 2),
            "verify_cost": round(cost[k], 3),
        }
        for mode, agree in modes.items():
            per_round = tokens_per_round(agree, k)
            row[f"{mode}_tokens_per_round"] = round(per_round, 3)
            row[f"{mode}_ceiling"] = round(per_round / cost[k], 3)
        rows.append(row)
    rates = {m: round(statistics.mean(x for r in a for x in r), 3) for m, a in modes.items()}
    print(f"per-token agreement: {rates}; oracle forward of 1 token: {one:.1f} ms")
    print("  k  t(k+1)/t(1)  greedy tok/rnd  ceiling  T=1 coupled  ceiling  T=1 rejection  ceiling")
    for r in rows:
        print(
            f"{r['k']:>3}  {r['verify_cost']:>11.2f}  {r['greedy_tokens_per_round']:>14.2f}  "
            f"{r['greedy_ceiling']:>6.2f}x  {r['t1_coupled_tokens_per_round']:>11.2f}  "
            f"{r['t1_coupled_ceiling']:>6.2f}x  {r['t1_rejection_tokens_per_round']:>13.2f}  "
            f"{r['t1_rejection_ceiling']:>6.2f}x"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": vars(args), "agreement": rates, "oracle_1_ms": one,
                       "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
