"""`specdec bench --http`: the OpenAI-compatible HTTP API against gRPC Generate, side by side.

One system (gateway with its HTTP API, oracle, draft; the demo pair by default).
Every prompt goes through gRPC Generate and through ``POST /v1/completions`` with
``stream: true`` (server-sent events), one after the other and in alternating
order, each over one kept-alive connection, greedy, ``--max-new-tokens`` tokens
with EOS ignored; for the oracle alone (k = 0: a chunk per token, the HTTP layer's
worst case) and the draft (k = 4). Reports per row the median time per output
token (wall / tokens), TTFT and tokens/s, and per k the median of the paired
ratios HTTP / gRPC of the time per output token (the target: at most 1.05), and
checks that both APIs stream the same text. Beside it, timed alone, what only the HTTP
path does per chunk (``encode_cost_us``) as a share of the time per output token.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from specdec.bench.measure import Sample

# (label, k): the oracle alone streams a chunk per token; the draft a chunk per round.
CASES = (("oracle alone k=0", 0), ("draft k=4", 4))


def _http_sample(
    connection: http.client.HTTPConnection, prompt: list[int], k: int, max_new_tokens: int
) -> tuple[Sample, str]:
    """One streamed completion over HTTP: its sample and its text."""
    body = {
        "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}, "specdec": {"k": k},
    }  # fmt: skip
    start = time.perf_counter()
    try:
        response = _post(connection, body)
    except (ConnectionError, http.client.RemoteDisconnected):  # a kept-alive one timed out
        connection.close()
        start = time.perf_counter()
        response = _post(connection, body)
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    sample, text = Sample(0, 0.0, 0.0), []
    while line := response.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now = time.perf_counter()
        event = json.loads(line[6:])
        for choice in event["choices"]:
            if choice["text"] and not sample.ttft_s:
                sample.ttft_s = now - start
            text.append(choice["text"])
        if event.get("usage"):
            sample.tokens = event["usage"]["completion_tokens"]
    sample.seconds = time.perf_counter() - start
    return sample, "".join(text)


def _post(connection: http.client.HTTPConnection, body: Any) -> http.client.HTTPResponse:
    headers = {"Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    return connection.getresponse()


def _grpc_sample(client: Any, prompt: list[int], k: int, max_new_tokens: int) -> tuple[Sample, str]:
    start = time.perf_counter()
    sample, text = Sample(0, 0.0, 0.0), []
    for response in client.stream(prompt, k=k, max_new_tokens=max_new_tokens, ignore_eos=True):
        sample.arrive(response.token_ids, time.perf_counter(), start)
        sample.chunks += bool(response.token_ids)
        text.append(response.text)
    sample.seconds = time.perf_counter() - start
    return sample, "".join(text)


def encode_cost_us(chunks: int = 2000) -> float:
    """Microseconds the gateway spends per streamed chunk on what only the HTTP path does:
    the OpenAI chunk object, its JSON, the SSE line and h11's chunked framing (timed
    alone, in this process: the end-to-end ratio on a loaded machine is noisier)."""
    import h11

    from gateway.generation import Chunk
    from gateway.http.app import _sse
    from gateway.http.responses import Answer

    answer = Answer(False, "model", "", str)
    chunk = Chunk([17, 18, 19], " three tokens")
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    connection.next_event(), connection.next_event()  # the request, its (empty) body
    connection.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
    start = time.perf_counter()
    for _ in range(chunks):
        answer.add(chunk)
        event = answer.stream_chunk(chunk, first=False)
        connection.send(h11.Data(data=_sse(event)))
    return (time.perf_counter() - start) / chunks * 1e6


def _row(label: str, api: str, samples: list[Sample]) -> dict[str, Any]:
    return {
        "config": label,
        "api": api,
        "requests": len(samples),
        "output_tokens": sum(s.tokens for s in samples),
        "ms_per_output_token": 1000 * statistics.median(s.seconds / s.tokens for s in samples),
        "ttft_ms": 1000 * statistics.median(s.ttft_s for s in samples),
        "tokens_per_s": statistics.median(s.tokens_per_s for s in samples),
    }


def run_http_overhead(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from specdec.client import Client
    from specdec.launch import cluster, free_port

    env = {"OMP_NUM_THREADS": str(args.threads), "SPECDEC_LOG_LEVEL": "warning"}
    n = args.max_new_tokens
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    tokens_per_round: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir, cluster(Path(workdir), env) as c:
        http_port = free_port()
        c.start_gateway("--tokenizer", args.oracle_path, "--http-port", str(http_port))
        c.start_oracle(args.oracle_path, "--device", args.device, "--dtype", args.dtype)
        c.start_draft(args.draft_path, "--device", args.draft_device, "--dtype", args.dtype)
        c.wait_workers(oracles=1, drafts=1)
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=600)
        with Client(c.address, timeout=600) as client:
            for _, k in CASES:  # warm-up: both paths, both proposers
                _grpc_sample(client, prompts[0][:16], k, 8)
                _http_sample(connection, prompts[0][:16], k, 8)
            for label, k in CASES:
                samples: dict[str, list[Sample]] = {"grpc": [], "http": []}
                mismatched = 0
                for rep in range(args.http_reps):
                    for i, prompt in enumerate(prompts):
                        first_grpc = (i + rep) % 2 == 0  # alternate who goes first
                        texts = {}
                        for api in ("grpc", "http") if first_grpc else ("http", "grpc"):
                            if api == "grpc":
                                sample, texts[api] = _grpc_sample(client, prompt, k, n)
                            else:
                                sample, texts[api] = _http_sample(connection, prompt, k, n)
                            samples[api].append(sample)
                        mismatched += texts["grpc"] != texts["http"]
                    print(f"  {label}: repetition {rep + 1}/{args.http_reps} done", flush=True)
                pairs = zip(samples["http"], samples["grpc"], strict=True)
                paired = statistics.median(
                    (h.seconds / h.tokens) / (g.seconds / g.tokens) for h, g in pairs
                )
                rows += [_row(label, api, samples[api]) for api in ("grpc", "http")]
                chunks = sum(s.chunks for s in samples["grpc"])
                tokens_per_round[label] = sum(s.tokens for s in samples["grpc"]) / max(chunks, 1)
                comparisons.append(
                    {"config": label, "http_over_grpc_per_token": paired,
                     "mismatched_outputs": mismatched}
                )  # fmt: skip
        connection.close()
    encode_us = encode_cost_us()
    for comparison, http_row in zip(comparisons, rows[1::2], strict=True):
        # A chunk per round: tokens per chunk = tokens per round (1 for the oracle alone).
        tokens_per_chunk = tokens_per_round[comparison["config"]]
        per_token_ms = encode_us / 1000 / tokens_per_chunk
        comparison["encode_share_of_tpot"] = per_token_ms / http_row["ms_per_output_token"]
    result = {
        "max_new_tokens": n, "rows": rows, "comparisons": comparisons,
        "encode_us_per_chunk": encode_us, "tokens_per_chunk": tokens_per_round,
    }  # fmt: skip
    print(_table(result), flush=True)
    return result


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{'config':<18} {'api':<5} {'ms/token':>9} {'TTFT ms':>8} {'tok/s':>7}",
        *(
            f"{r['config']:<18} {r['api']:<5} {r['ms_per_output_token']:>9.2f} "
            f"{r['ttft_ms']:>8.1f} {r['tokens_per_s']:>7.1f}"
            for r in result["rows"]
        ),
        "",
        *(
            f"{c['config']}: HTTP / gRPC time per output token {c['http_over_grpc_per_token']:.3f} "
            f"(median of pairs), outputs differing: {c['mismatched_outputs']}; the HTTP "
            f"layer's own encoding: {100 * c['encode_share_of_tpot']:.3f} % of the TPOT"
            for c in result["comparisons"]
        ),
        f"encoding a chunk for HTTP: {result['encode_us_per_chunk']:.1f} µs",
    ]
    return "\n".join(lines)
