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
    add_arguments(parser, cls)
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


def add_speculation_flags(parser: Any) -> None:
    """The flags of a request's speculation settings (``specdec.core.types.Speculation``);
    unset = the server's default."""
    from specdec.core.types import (
        MAX_SPECULATIVE_TOKENS,
        SPECULATION_DEFAULTS,
        SPECULATION_RANGES,
        DrafterKind,
    )

    def bounds(name: str) -> str:
        low, high = SPECULATION_RANGES[name]
        return f"in [{low}, {high}]"

    defaults = SPECULATION_DEFAULTS
    parser.add_argument(
        "-k",
        "--num-speculative-tokens",
        type=int,
        default=None,
        help=f"tokens drafted per round, at most {MAX_SPECULATIVE_TOKENS} (0 = the oracle "
        f"alone; default: the gateway's, {defaults.k} unless it was started otherwise); "
        "without --adaptive, exactly k",
    )
    parser.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose k per round, 0 (the oracle alone) included, from the measured "
        "acceptance and costs; -k is its upper bound (default: the gateway's, on unless "
        "it was started otherwise, when -k is not given; off when it is)",
    )
    parser.add_argument(
        "--drafter",
        choices=[d.value for d in DrafterKind],
        default=None,
        help=f"who drafts (default: {defaults.drafter.value}: a draft model when one is "
        "registered, else the oracle alone)",
    )
    parser.add_argument(
        "--pipeline-depth",
        type=int,
        default=None,
        help=f"blocks in flight to the oracle, {bounds('pipeline_depth')} (1 = wait for each "
        f"verdict; default: the draft's, {defaults.pipeline_depth} unless started otherwise)",
    )
    parser.add_argument(
        "--branches",
        type=int,
        default=None,
        help=f"likely corrections drafted ahead per block (greedy, or sampled with a coupled "
        f"draft), {bounds('branches')} "
        f"(0 = none; default: the draft's, {defaults.branches} unless started otherwise)",
    )
    parser.add_argument(
        "--rescue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the oracle draft a block itself after a miss (default: the "
        f"draft's, {'on' if defaults.rescue else 'off'} unless started otherwise)",
    )


def speculation_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request keywords (``specdec.client.build_request``) of the flags of
    ``add_speculation_flags``; ``InvalidArgument`` names a flag out of range."""
    from specdec.core.types import DrafterKind, Speculation

    speculation = Speculation(
        k=args.num_speculative_tokens,
        adaptive=args.adaptive,
        drafter=DrafterKind(args.drafter) if args.drafter else Speculation.drafter,
        pipeline_depth=args.pipeline_depth,
        branches=args.branches,
        rescue=args.rescue,
    )
    flags = {"k": "--num-speculative-tokens"}
    speculation.validate(lambda name: flags.get(name, "--" + name.replace("_", "-")))
    return {
        "k": speculation.k,
        "adaptive": speculation.adaptive,
        "drafter": speculation.drafter,
        "pipeline_depth": speculation.pipeline_depth,
        "branches": speculation.branches,
        "rescue": speculation.rescue,
    }


def _add_generate(sub: Any) -> None:
    from specdec.config import env_default

    p = sub.add_parser("generate", help="stream a generation through a gateway")
    p.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message, rendered with the model's chat template "
        "(in a --session: the conversation goes on)",
    )
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument(
        "--gateway",
        default=env_default("gateway", "localhost:50051"),
        help="[env SPECDEC_GATEWAY]",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    add_speculation_flags(p)
    p.add_argument("--session", default="", help="continue this session")
    p.add_argument(
        "--token", default=env_default("auth_token"), help="bearer token [env SPECDEC_AUTH_TOKEN]"
    )
    p.add_argument("--tls-ca", default=env_default("tls_ca"), help="CA verifying the gateway (TLS)")
    p.add_argument("--tls-cert", default=env_default("tls_cert"), help="client cert")
    p.add_argument("--tls-key", default=env_default("tls_key"), help="its key")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    request = dict(
        session_id=args.session,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        **speculation_request(args),
    )
    tls = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}
    prompt: Any = args.prompt
    if args.system is not None and not args.chat:
        sys.exit("error: --system needs --chat")
    if args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            prompt.insert(0, {"role": "system", "content": args.system})
    print_generation(args.gateway, prompt, request, token=args.token, tls=tls)


def print_generation(
    gateway: str,
    prompt: Any,
    request: dict[str, Any],
    *,
    token: str | None = None,
    tls: dict[str, str | None] | None = None,
) -> None:
    """Stream one generation to stdout, then its statistics to stderr; exit on an error.

    prompt: text, or chat messages (``specdec.client.Prompt``);
    request: ``specdec.client.build_request``'s keywords; tls: its ca, cert and key
    (TLS when ca or cert is set)."""
    import grpc

    from specdec.client import Client, Completion
    from specdec.core.errors import SpecdecError

    completion = Completion()
    tls = tls or {}
    try:
        if tls.get("ca") or tls.get("cert"):
            client = Client.tls(gateway, **tls, token=token)  # type: ignore[arg-type]
        else:
            client = Client(gateway, token=token)
        with client:
            for response in client.stream(prompt, **request):
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
    p.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="the gateway's OpenAI-compatible HTTP API (-1 = off)",
    )
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
    p.add_argument("--max-new-tokens", type=int, default=128, help="of the --generate request")
    add_speculation_flags(p.add_argument_group("speculation of the --generate request"))
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> None:
    from specdec.up import run_local_system

    run_local_system(args)


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
