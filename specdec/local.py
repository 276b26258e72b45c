"""`specdec up`: the whole system on one machine, as three separate processes.

Starts the gateway, then an oracle and a draft that dial into it, waits until
both have registered, prints where everything listens, and then either runs
one generation (``--generate``) or serves until Ctrl-C; it always stops the
three processes on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

from specdec.serving.healthcheck import check

READY_TIMEOUT_S = 300.0


def _spawn(command: str, flags: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", command, *flags],
        env=env,
        start_new_session=True,  # Ctrl-C reaches us; we stop the children ourselves
    )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))
        if process.poll() is None:
            process.kill()


def _wait_ready(address: str, want_draft: bool, processes: list[subprocess.Popen[bytes]]) -> None:
    from specdec.client import Client

    deadline = time.monotonic() + READY_TIMEOUT_S
    with Client(address, timeout=2) as client:
        while time.monotonic() < deadline:
            for process in processes:
                if process.poll() is not None:
                    raise SystemExit(f"a service exited with code {process.returncode}")
            if check(address, timeout_s=1):
                kinds = {w.kind for w in client.list_workers()}
                if 2 in kinds and (1 in kinds or not want_draft):  # ORACLE, DRAFT
                    return
            time.sleep(0.25)
    raise SystemExit(f"the services were not ready within {READY_TIMEOUT_S:.0f}s")


def run_local(args: argparse.Namespace) -> None:
    gateway = f"localhost:{args.port}"
    oracle_port = args.oracle_port or args.port + 1
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    processes = [_spawn("gateway", ["--port", str(args.port)], env)]
    try:
        oracle_flags = [
            "--port", str(oracle_port),
            "--gateway", gateway,
            "--advertise-address", f"localhost:{oracle_port}",
            "--device", args.device,
        ]  # fmt: skip
        if args.oracle_model:
            oracle_flags += ["--model", args.oracle_model]
        processes.append(_spawn("oracle", oracle_flags, env))
        if not args.no_draft:
            draft_flags = ["--gateway", gateway, "--health-port", "-1"]
            if args.draft_model:
                draft_flags += ["--model", args.draft_model]
            processes.append(_spawn("draft", draft_flags, env))
        _wait_ready(gateway, not args.no_draft, processes)
        print(
            f"specdec is up: gateway {gateway}, oracle localhost:{oracle_port}"
            f"{'' if args.no_draft else ', 1 draft'}",
            flush=True,
        )
        if args.generate is not None:
            from specdec.cli import main as cli_main

            cli_main(
                ["generate", args.generate, "--gateway", gateway,
                 "--max-new-tokens", str(args.max_new_tokens)]
            )  # fmt: skip
            return
        print("press Ctrl-C to stop", flush=True)
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        raise SystemExit("a service exited; stopping the others")
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        _stop(processes)
