"""The `specdec` command: run a service, the whole system, a generation, training.

    specdec up [--port 50051] [--generate PROMPT]   all three services locally, demo models
    specdec generate "PROMPT"                       stream a generation through a gateway
    specdec gateway | oracle | draft [flags]        one service (flags or SPECDEC_* variables)
    specdec healthcheck HOST:PORT                   exit 0 iff the service is SERVING
    specdec traces FILE [--trace-id ID | --last N]  a request round by round, from span files
    specdec traces FILE --tail [P]                  what the slowest inter-token gaps are made of
    specdec train | eval-pair                       build and measure the demo model pair
    specdec distill --oracle DIR --data PATH --out DIR   a draft for your oracle and text

Imports are lazy so that `specdec train` needs only torch and transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

SERVICES: dict[str, tuple[str, str, str]] = {
    # name: (config module, config class, main module)
    "gateway": ("gateway.config", "GatewayConfig", "gateway.main"),
    "oracle": ("oracle_service.config", "OracleConfig", "oracle_service.main"),
    "draft": ("draft_service.config", "DraftConfig", "draft_service.main"),
}


def _import(module: str) -> Any:
    import importlib

    return importlib.import_module(module)


def _add_service(sub: Any, name: str) -> None:
    from specdec.config import add_arguments

    config_module, config_class, _ = SERVICES[name]
    cls = getattr(_import(config_module), config_class)
    parser = sub.add_parser(name, help=cls.__doc__, description=cls.__doc__)
    add_arguments(parser, cls, os.environ)
    parser.set_defaults(func=_run_service, service=name)


def _run_service(args: argparse.Namespace) -> None:
    import asyncio

    from specdec.config import from_namespace
    from specdec.rpc.logs import configure_logging

    config_module, config_class, main_module = SERVICES[args.service]
    config = from_namespace(getattr(_import(config_module), config_class), args)
    configure_logging(config.log_level, args.service)  # type: ignore[attr-defined]
    from specdec.core.errors import SpecdecError

    try:
        asyncio.run(_import(main_module).serve(config))
    except KeyboardInterrupt:
        pass
    except SpecdecError as exc:
        sys.exit(f"specdec {args.service}: {exc}")


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="stream a generation through a gateway")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--gateway", default=os.environ.get("SPECDEC_GATEWAY", "localhost:50051"))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument(
        "-k",
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="tokens drafted per round (0 = oracle alone; default: the gateway's)",
    )
    p.add_argument("--adaptive", action="store_true", help="adapt k per round")
    p.add_argument("--drafter", choices=["model", "ngram", "none"], default=None)
    p.add_argument(
        "--pipeline-depth",
        type=int,
        default=None,
        help="blocks in flight to the oracle (1 = wait for each verdict; default: the draft's)",
    )
    p.add_argument(
        "--branches",
        type=int,
        default=None,
        help="likely corrections drafted ahead per block, greedy (0 = none; default: the draft's)",
    )
    p.add_argument(
        "--rescue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="greedy: let the oracle draft a block itself after a miss (default: the draft's)",
    )
    p.add_argument("--session", default="", help="continue this session")
    p.add_argument("--token", default=os.environ.get("SPECDEC_AUTH_TOKEN") or None)
    env = os.environ.get
    p.add_argument(
        "--tls-ca", default=env("SPECDEC_TLS_CA") or None, help="CA verifying the gateway (TLS)"
    )
    p.add_argument("--tls-cert", default=env("SPECDEC_TLS_CERT") or None, help="client cert")
    p.add_argument("--tls-key", default=env("SPECDEC_TLS_KEY") or None, help="its key")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    import grpc

    from specdec.client import Client, Completion
    from specdec.core.errors import SpecdecError

    completion = Completion()
    try:
        if args.tls_ca or args.tls_cert:
            client = Client.tls(
                args.gateway, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, token=args.token
            )
        else:
            client = Client(args.gateway, token=args.token)
        with client:
            for response in client.stream(
                args.prompt,
                session_id=args.session,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                stop=args.stop,
                ignore_eos=args.ignore_eos,
                k=args.num_speculative_tokens,
                adaptive=args.adaptive,
                drafter=args.drafter,
                pipeline_depth=args.pipeline_depth,
                branches=args.branches,
                rescue=args.rescue,
            ):
                completion.add(response)
                sys.stdout.write(response.text)
                sys.stdout.flush()
    except grpc.RpcError as exc:
        sys.exit(f"\nerror: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
    except SpecdecError as exc:  # e.g. an unreadable --tls-ca
        sys.exit(f"error: {exc}")
    print()
    print(format_stats(completion), file=sys.stderr)


def format_stats(completion: Any) -> str:
    """One readable summary line of a Completion's statistics."""
    s = completion.stats
    seconds = s.total_ns / 1e9 or float("nan")
    return (
        f"[{completion.finish_reason}] {s.output_tokens} tokens in {seconds:.2f}s "
        f"({s.output_tokens / seconds:.1f} tok/s, "
        f"first token {s.time_to_first_token_ns / 1e6:.0f} ms)"
        f" | {s.rounds} rounds, accepted {s.accepted_tokens}/{s.proposed_tokens} drafted "
        f"({100 * s.acceptance_rate:.0f}%), {s.mean_tokens_per_round:.2f} tokens/round"
        f" | oracle {s.oracle_id or '-'}, draft {s.draft_id or '-'}"
    )


def _add_up(sub: Any) -> None:
    p = sub.add_parser("up", help="run gateway, oracle and draft locally (demo models)")
    p.add_argument("--port", type=int, default=50051, help="gateway port")
    p.add_argument("--oracle-port", type=int, default=0, help="oracle port (0 = port + 1)")
    p.add_argument("--oracle-model", default="", help="default: the demo oracle")
    p.add_argument("--draft-model", default="", help="default: the demo draft")
    p.add_argument("--device", default="cpu", help="oracle device")
    p.add_argument("--no-draft", action="store_true", help="oracle only")
    p.add_argument(
        "--generate",
        metavar="PROMPT",
        default=None,
        help="run one generation once ready, print it, then stop everything",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> None:
    from specdec.up import run_local

    run_local(args)


def _add_healthcheck(sub: Any) -> None:
    p = sub.add_parser("healthcheck", help="exit 0 iff the gRPC service at ADDRESS is SERVING")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=_healthcheck)


def _healthcheck(args: argparse.Namespace) -> None:
    from specdec.rpc.healthcheck import check

    ok = check(args.address, args.service, args.timeout)
    print("SERVING" if ok else "NOT SERVING")
    sys.exit(0 if ok else 1)


def _add_traces(sub: Any) -> None:
    p = sub.add_parser(
        "traces", help="show a request round by round from a SPECDEC_TRACE_FILE (no backend)"
    )
    p.add_argument("file", help="the JSON-lines span file the services wrote")
    p.add_argument("--trace-id", default=None, help="this trace (an id prefix is enough)")
    p.add_argument("--last", type=int, default=1, help="the last N requests (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per trace")
    p.add_argument(
        "--tail",
        type=float,
        nargs="?",
        const=99.0,
        default=None,
        metavar="P",
        help="instead: what the rounds at the P-th percentile (default 99) of inter-token "
        "gaps are made of, over every request in the file",
    )
    p.set_defaults(func=_traces)


def _traces(args: argparse.Namespace) -> None:
    from specdec.core.errors import SpecdecError
    from specdec.telemetry.report import show
    from specdec.telemetry.tail import show_tail

    try:
        if args.tail is not None:
            show_tail(args.file, args.tail, args.json, sys.stdout)
        else:
            show(args.file, args.trace_id, args.last, as_json=args.json)
    except SpecdecError as exc:
        sys.exit(f"error: {exc}")


# Subcommands whose parsers live in modules that import torch: `main` hands them their
# argv without importing those modules otherwise, so that every other command (`specdec
# healthcheck` in a container's HEALTHCHECK included) starts in a fraction of a second.
DELEGATED: dict[str, tuple[str, str]] = {
    # name: (module with main(argv), help)
    "train": ("specdec.training.cli", "train the demo model pair (see `specdec train -h`)"),
    "eval-pair": ("specdec.training.cli", "measure a draft/oracle pair"),
    "distill": ("specdec.training.cli", "distill a draft for your oracle from your text"),
    "bench": ("specdec.bench.run", "benchmark against the oracle alone and HF"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec", description="Distributed speculative decoding for LLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(sub)
    _add_generate(sub)
    for name in SERVICES:
        _add_service(sub, name)
    _add_healthcheck(sub)
    _add_traces(sub)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed here, parsed there
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from specdec.core.errors import SpecdecError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            sys.exit(_import(DELEGATED[argv[0]][0]).main(argv))
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], None] = args.func
        func(args)
    except SpecdecError as exc:  # e.g. a bad benchmark flag: the message, no traceback
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
