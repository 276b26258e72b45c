"""One way to fill a service's configuration: flags, then ``SPECDEC_*`` variables, then defaults.

Each service declares a dataclass whose fields carry ``help`` metadata;
``load_config`` turns it into an argparse parser where every flag's default
comes from the environment variable ``SPECDEC_<FIELD>``. The settings every
service has are declared once here (``SecuritySettings``, ``TelemetrySettings``),
and the tools that are not services (``specdec generate``) read their
``SPECDEC_*`` defaults through ``env_default``. Nothing else in the project reads
``SPECDEC_*`` variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "SPECDEC_"


# Draft weights: int8 where it runs (auto), always (int8, warns where it cannot), never.
QUANTIZE_CHOICES = ("auto", "int8", "none")


def setting(
    default: Any, help: str, *, choices: Sequence[str] | None = None, group: str | None = None
) -> Any:
    """A config field: its default, the help text of its flag, allowed values, and the
    titled group its flag is listed under in ``--help`` (None: with the service's own)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "group": group}
    )


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def settings_in_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every ``SPECDEC_*`` variable set, by name (what a benchmark records of its run)."""
    env = os.environ if env is None else env
    return {k: v for k, v in sorted(env.items()) if k.startswith(ENV_PREFIX)}


def env_default(
    field_name: str, default: str | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """``SPECDEC_<FIELD>`` when set and not empty, else ``default``: the default of a
    flag of a tool that is not a service (``specdec generate --gateway``)."""
    value = (os.environ if env is None else env).get(env_name(field_name), "")
    return value or default


SECURITY = "security (docs/security.md; all off by default)"
TELEMETRY = "telemetry (tracing itself is set by the OTEL_* variables)"


@dataclass
class SecuritySettings:
    """Transport security and the worker token, the same in every service
    (``specdec.rpc.security`` says how each is used)."""

    tls_cert: str = setting(
        "",
        "PEM certificate: served with --tls-key where this service listens (TLS), "
        "presented as its client certificate where it dials",
        group=SECURITY,
    )
    tls_key: str = setting("", "PEM private key of --tls-cert", group=SECURITY)
    tls_ca: str = setting(
        "",
        "PEM CA bundle (set: TLS on where this service dials): verifies the services it "
        "dials; where it listens, callers must present a certificate it signed (mTLS)",
        group=SECURITY,
    )
    tls_server_name: str = setting(
        "",
        "name the dialled services' certificates must carry (default: the dialled host)",
        group=SECURITY,
    )
    auth_token: str = setting(
        "",
        "bearer token. Oracle, draft: the worker token, presented to the services they "
        "dial and (oracle) required of its callers. Gateway: the applications' token "
        "(principal 'default') and, unless --worker-token, the workers'",
        group=SECURITY,
    )


@dataclass
class TelemetrySettings:
    """Metrics and the local span file, the same in every service."""

    metrics_port: int = setting(0, "Prometheus scrape port (0 = off)", group=TELEMETRY)
    trace_file: str = setting(
        "",
        "also append finished spans to this JSON-lines file, which `specdec traces` "
        "reads without a tracing backend (empty = off)",
        group=TELEMETRY,
    )


def _field_type(cls: type, field: dataclasses.Field[Any]) -> type:
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint  # type: ignore[no-any-return]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def _convert(kind: type, text: str, name: str) -> Any:
    try:
        if kind is bool:
            return _parse_bool(text)
        if kind is list or typing.get_origin(kind) is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        return kind(text)
    except ValueError as exc:
        raise SystemExit(f"invalid value for {name}: {exc}") from None


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, env: Mapping[str, str] | None = None
) -> None:
    """Add one flag per field of dataclass ``cls``, defaulting to its SPECDEC_ variable
    in ``env`` (None: the process's environment)."""
    env = os.environ if env is None else env
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        title = field.metadata.get("group")
        target: Any = parser
        if title is not None:
            target = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        kind = _field_type(cls, field)
        flag = "--" + field.name.replace("_", "-")
        variable = env_name(field.name)
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if variable in env:
            default = _convert(kind, env[variable], variable)
        help_text = f"{field.metadata.get('help', '')} [env {variable}; default: {default!r}]"
        choices = field.metadata.get("choices")
        if kind is bool:
            target.add_argument(
                flag, default=default, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif kind is list or typing.get_origin(kind) is list:

            def split(text: str, name: str = variable) -> Any:
                return _convert(list, text, name)

            target.add_argument(
                flag, default=default, type=split, help=help_text + " (comma-separated)"
            )
        else:
            target.add_argument(flag, default=default, type=kind, choices=choices, help=help_text)


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build ``cls`` from parsed flags (extra attributes of the namespace are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})


def load_config(
    cls: type[T], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> T:
    """Parse ``argv`` (default: sys.argv) into ``cls``, flags overriding SPECDEC_ variables."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    add_arguments(parser, cls, env)
    return from_namespace(cls, parser.parse_args(argv))
