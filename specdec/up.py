"""`specdec up`: the whole system on one machine, as three separate processes.

Starts the gateway, then an oracle and a draft that dial into it, waits until
both have registered, prints where everything listens, and then either runs
one generation (``--generate``) or serves until Ctrl-C; it always stops the
three processes on the way out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from specdec.launch import cluster


def run_local_system(args: argparse.Namespace) -> None:
    """`specdec up`: start gateway, oracle and draft, then generate once or serve."""
    from specdec.cli import speculation_request

    # Checked before anything starts: a flag out of range stops here.
    request = {"max_new_tokens": args.max_new_tokens, **speculation_request(args)}
    with (
        tempfile.TemporaryDirectory(prefix="specdec-up-") as workdir,
        cluster(Path(workdir), echo=True) as c,
    ):
        try:
            gateway_flags = ["--tokenizer", args.oracle_model] if args.oracle_model else []
            gateway_flags += ["--http-port", str(args.http_port)]
            c.start_gateway(*gateway_flags, port=args.port)
            # On a CPU the draft's model also serves the oracle as rescue draft (after
            # a verdict none of the draft's blocks fit, the oracle drafts the next one
            # itself; on the H200 it did not pay); not the demo draft for an oracle of
            # another family.
            rescue = []
            if (
                args.device == "cpu"
                and not args.no_draft
                and (args.draft_model or not args.oracle_model)
            ):
                rescue = ["--rescue-draft", args.draft_model or "demo"]
            oracle = c.start_oracle(
                args.oracle_model or None,
                "--device", args.device, *rescue,
                port=args.oracle_port or args.port + 1,
            )  # fmt: skip
            if not args.no_draft:
                c.start_draft(args.draft_model or None)
            c.wait_workers(oracles=1, drafts=0 if args.no_draft else 1)
            http = ""
            if args.http_port >= 0:
                http = f", OpenAI API http://localhost:{args.http_port}/v1"
            print(
                f"specdec is up: gateway localhost:{args.port} (clients connect here){http}, "
                f"oracle 127.0.0.1:{oracle.port}{'' if args.no_draft else ', 1 draft'}",
                flush=True,
            )
            if args.generate is not None:
                from specdec.cli import print_generation

                print_generation(f"localhost:{args.port}", args.generate, request)
                return
            print("press Ctrl-C to stop", flush=True)
            while all(s.alive() for s in c.services):
                time.sleep(0.5)
            raise SystemExit("a service exited; stopping the others")
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
