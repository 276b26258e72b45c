"""What one benchmark configuration measured, and the figures derived from it.

Per request (one prompt): output tokens, wall time, time to first token, the
inter-token latencies (a chunk of n tokens arriving after a gap g counts as n
tokens of g/n each), and the gateway's GenerationStats. Per configuration:
medians over requests, p50/p99 over tokens, and the theoretical speedup of
Leviathan et al. from the measured costs:

    S_theory = E(a, k) * t_token_alone / (k * t_draft + t_verify(k+1) + rtt)

with a = accepted / (accepted + rejected rounds), E(a, k) = (1 - a^(k+1)) / (1 - a),
t_token_alone = the oracle alone's measured time per token in the same run, and
t_draft, t_verify, rtt the per-token draft, per-round verify and per-round
network times of this configuration; efficiency = measured speedup / S_theory.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from specdec.core.adaptive import expected_tokens


@dataclass
class Sample:
    """One request."""

    tokens: int
    seconds: float
    ttft_s: float
    itl_s: list[float] = field(default_factory=list)
    stats: Any = None  # common_pb2.GenerationStats, or None for in-process baselines
    token_ids: list[int] = field(default_factory=list)
    last_arrival: float = 0.0  # perf_counter seconds of the last chunk
    chunks: int = 0  # streamed messages that carried tokens (where the caller counts them)

    def arrive(self, token_ids: Sequence[int], now: float, start: float) -> None:
        """A chunk of tokens arrived at ``now`` in a request sent at ``start`` (perf_counter
        seconds): the first sets the time to first token, each later one adds n tokens of
        g / n to the inter-token latencies, g being the gap since the chunk before."""
        n = len(token_ids)
        if n == 0:
            return
        if self.tokens == 0:
            self.ttft_s = now - start
        else:
            self.itl_s.extend([(now - self.last_arrival) / n] * n)
        self.last_arrival = now
        self.tokens += n
        self.token_ids.extend(token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Result:
    """One configuration's figures (JSON-ready)."""

    name: str
    workload: str
    delay_ms: float
    samples: list[Sample]
    wire_bytes: int = 0

    def summary(self, baseline: Result | None) -> dict[str, Any]:
        s = self.samples
        tokens = sum(x.tokens for x in s)
        itl = [v for x in s for v in x.itl_s]
        out: dict[str, Any] = {
            "config": self.name,
            "workload": self.workload,
            "delay_ms": self.delay_ms,
            "requests": len(s),
            "output_tokens": tokens,
            "tokens_per_s": statistics.median(x.tokens_per_s for x in s),
            "ttft_ms": 1000 * statistics.median(x.ttft_s for x in s),
            "itl_p50_ms": 1000 * percentile(itl, 50),
            "itl_p99_ms": 1000 * percentile(itl, 99),
            "wire_bytes_per_token": self.wire_bytes / tokens if tokens else 0.0,
        }
        stats = [x.stats for x in s if x.stats is not None]
        if stats:
            rounds = sum(st.rounds for st in stats)
            proposed = sum(st.proposed_tokens for st in stats)
            accepted = sum(st.accepted_tokens for st in stats)
            rejected = sum(st.rejected_rounds for st in stats)
            out.update(
                rounds=rounds,
                acceptance_rate=accepted / proposed if proposed else 0.0,
                alpha=accepted / (accepted + rejected) if accepted + rejected else 0.0,
                mean_accepted_per_round=accepted / rounds if rounds else 0.0,
                mean_k=proposed / rounds if rounds else 0.0,
                draft_ms_per_token=sum(st.draft_ns for st in stats) / 1e6 / max(proposed, 1),
                verify_ms_per_round=sum(st.verify_ns for st in stats) / 1e6 / max(rounds, 1),
                network_ms_per_round=sum(st.network_ns for st in stats) / 1e6 / max(rounds, 1),
                queue_ms_per_round=sum(st.queue_ns for st in stats) / 1e6 / max(rounds, 1),
                # Rounds whose block went out before the previous verdict; stale blocks sent.
                pipelined_share=sum(st.pipelined_rounds for st in stats) / max(rounds, 1),
                skipped_blocks=sum(st.skipped_blocks for st in stats),
                # Rounds whose block was drafted ahead for a guessed correction.
                branch_share=sum(st.branch_rounds for st in stats) / max(rounds, 1),
                # Rounds whose block the oracle drafted after a miss (rescue).
                rescue_share=sum(st.rescued_rounds for st in stats) / max(rounds, 1),
                # Rounds without speculation: nothing drafted (k = 0).
                alone_share=sum(st.oracle_alone_rounds for st in stats) / max(rounds, 1),
            )
        if baseline is not None:
            pairs = zip(self.samples, baseline.samples, strict=False)
            out["speedup"] = statistics.median(
                a.tokens_per_s / b.tokens_per_s for a, b in pairs if b.tokens_per_s > 0
            )
            if stats and out["mean_k"] > 0:
                base_token_s = 1 / statistics.median(x.tokens_per_s for x in baseline.samples)
                k = out["mean_k"]
                round_s = (
                    k * out["draft_ms_per_token"]
                    + out["verify_ms_per_round"]
                    + out["network_ms_per_round"]
                ) / 1000
                theory = expected_tokens(out["alpha"], round(k)) * base_token_s / round_s
                out["theoretical_speedup"] = theory
                out["efficiency"] = out["speedup"] / theory if theory > 0 else 0.0
        return out


COLUMNS = [
    ("config", "config", "{}"),
    ("workload", "workload", "{}"),
    ("delay_ms", "+rtt ms", "{:.0f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("vs_0ms", "vs 0 ms", "{:.0%}"),
    ("theoretical_speedup", "theory", "{:.2f}x"),
    ("efficiency", "effic.", "{:.2f}"),
    ("ttft_ms", "TTFT ms", "{:.0f}"),
    ("itl_p50_ms", "ITL p50", "{:.1f}"),
    ("itl_p99_ms", "ITL p99", "{:.1f}"),
    ("acceptance_rate", "accept", "{:.2f}"),
    ("mean_accepted_per_round", "acc/rnd", "{:.2f}"),
    ("rounds", "rounds", "{}"),
    ("pipelined_share", "piped", "{:.2f}"),
    ("branch_share", "branch", "{:.2f}"),
    ("rescue_share", "rescue", "{:.2f}"),
    ("alone_share", "alone", "{:.2f}"),
    ("mean_k", "mean k", "{:.1f}"),
    ("skipped_blocks", "skip", "{}"),
    ("wire_bytes_per_token", "B/tok", "{:.0f}"),
    ("mismatched_outputs", "diff", "{}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of summaries (missing figures shown as '-')."""
    return format_table(rows, COLUMNS)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width text table of (key, title, format) columns; '-' for a missing
    or None figure."""
    header = [title for _, title, _ in columns]
    body = [
        [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
