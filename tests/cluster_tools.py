"""Helpers shared by the fault, overload and fuzz tests: references, polling, counters;
and ``run_script`` for the benchmark scripts' tests.

The services' own counters are the ground truth these tests assert on: the
oracle's ``GetInfo`` (verify streams open, KV cache bytes), the gateway's
``ListWorkers`` (each worker's sessions and KV bytes as it last reported them)
and the processes' resident memory from /proc.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from specdec.client import Client, build_request
from specdec.v1 import gateway_pb2, gateway_pb2_grpc, oracle_pb2, oracle_pb2_grpc


@functools.cache
def _hf_model(model_path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path).eval()


@functools.cache
def _reference(
    model_path: str, prompt: tuple[int, ...], max_new_tokens: int, stops: tuple[int, ...]
) -> tuple[int, ...]:
    model = _hf_model(model_path)
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids,
            # Every position is attended: without a mask HF masks the tokens equal to
            # the pad id (0), which a long context may well contain.
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stops) or None,
            pad_token_id=0,
        )
    return tuple(int(t) for t in out[0, len(prompt) :])


def reference(
    model_path: Path, prompt: Sequence[int], max_new_tokens: int, stops: Sequence[int] = ()
) -> list[int]:
    """HF greedy generate of the oracle alone, ending after one of ``stops`` (none: EOS
    ignored): what every greedy turn must equal."""
    return list(_reference(str(model_path), tuple(prompt), max_new_tokens, tuple(stops)))


def wait_until(
    predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition", step: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; its value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except grpc.RpcError as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(step)
    raise TimeoutError(f"{what} not reached in {timeout}s (last: {last!r})")


def list_workers(address: str) -> dict[str, gateway_pb2.WorkerInfo]:
    with Client(address, timeout=5) as client:
        return {w.worker_id: w for w in client.list_workers()}


def oracle_info(port: int) -> oracle_pb2.GetInfoResponse:
    """The oracle's own view of its load (dialled directly, not through a proxy)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = oracle_pb2_grpc.OracleStub(channel)
        return stub.GetInfo(oracle_pb2.GetInfoRequest(), timeout=5)


def quiescent(address: str, timeout: float = 30.0) -> dict[str, gateway_pb2.WorkerInfo]:
    """Wait until no worker reports an active session (earlier tests' streams have ended)."""

    def idle() -> dict[str, gateway_pb2.WorkerInfo] | None:
        workers = list_workers(address)
        return workers if all(w.active_sessions == 0 for w in workers.values()) else None

    workers: dict[str, gateway_pb2.WorkerInfo] = wait_until(idle, timeout, "all workers idle")
    return workers


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def generate_stream(address: str, timeout: float = 120.0, **request: Any) -> Any:
    """A raw Generate call (an iterator of responses with ``cancel()``), prompt in ``request``."""
    channel = grpc.insecure_channel(address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    prompt = request.pop("prompt")
    call = stub.Generate(build_request(prompt, **request), timeout=timeout)
    call._test_channel = channel  # kept alive with the call
    return call


def collect(
    call: Any, after_chunks: int = 0, action: Callable[[], None] | None = None
) -> tuple[list[int], gateway_pb2.GenerateResponse]:
    """Every streamed token id in order and the last response; ``action`` runs once, after
    ``after_chunks`` chunks carrying tokens have arrived (the fault lands mid-stream)."""
    tokens: list[int] = []
    last = gateway_pb2.GenerateResponse()
    chunks = 0
    for response in call:
        tokens.extend(response.token_ids)
        last = response
        if response.token_ids:
            chunks += 1
            if action is not None and chunks == after_chunks:
                action()
    return tokens, last


def run_script(name: str, *args: str, out: Path) -> tuple[str, list[dict[str, Any]]]:
    """Run ``scripts/<name>`` with ``args`` and ``--out out``: what it printed, and the
    rows of the JSON it wrote."""
    script = Path(__file__).resolve().parent.parent / "scripts" / name
    command = [sys.executable, str(script), *args, "--out", str(out)]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return printed, json.loads(out.read_text())["rows"]


def run_bench(argv: list[str], out: Path) -> dict[str, Any]:
    """``specdec bench`` with ``argv`` (its ``--out`` among them, ``out``), in this
    process: it must exit 0; the JSON it wrote."""
    import pytest

    from specdec.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 0
    return dict(json.loads(out.read_text()))
