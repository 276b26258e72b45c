"""Transport security and caller identity: TLS / mutual TLS, bearer tokens, principals.

The services' ``specdec.config.SecuritySettings`` (``tls_cert``, ``tls_key``,
``tls_ca``, and ``tls_server_name`` for the dialling side) decide the transport:

* a server with ``tls_cert`` + ``tls_key`` serves TLS; with ``tls_ca`` as well it
  *requires* a client certificate signed by that CA (mutual TLS);
* a dialling side uses TLS as soon as ``tls_ca`` or ``tls_cert`` is set: ``tls_ca``
  verifies the server (empty: the system's roots), ``tls_cert`` + ``tls_key`` are
  presented as the client certificate, ``tls_server_name`` replaces the dialled host
  as the name the server's certificate must carry (oracles dialled by pod IP).

Bearer tokens (``authorization: Bearer <token>``) name the caller. The server side
is ``AuthInterceptor``: per gRPC service a ``TokenTable`` (token -> principal);
services without a table (health, reflection) stay open. The principal of the
current RPC is ``current_principal()``, set by the interceptor for the handler:
a client cannot choose it, only prove it with its token. The client side is
``ChannelSecurity``: one object per dialling service that opens channels with
the right credentials and adds the token to every call.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from specdec.config import SecuritySettings
from specdec.core.errors import InvalidArgument, Unauthenticated
from specdec.rpc.interceptors import rewrap

# The principal of the RPC being handled. grpc.aio runs each RPC in its own task, so
# a value set by the interceptor is seen by that RPC's handler and nobody else.
_PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar("specdec_principal", default="")

# The principal of the single shared token (``auth_token``).
DEFAULT_PRINCIPAL = "default"
# The principal of the shared worker token; a per-device one (``worker_tokens``) is the
# device's own name.
WORKER_PRINCIPAL = "worker"
AUTHORIZATION = "authorization"


def current_principal() -> str:
    """Who the current RPC runs as ("" when authentication is off)."""
    return _PRINCIPAL.get()


# ---- files ----------------------------------------------------------------------------


def read_pem(source: str | Path | bytes, setting: str) -> bytes:
    """The PEM bytes of ``source`` (a path, or the PEM itself as bytes)."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {setting} {str(source)!r}: {exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{setting} {str(source)[:80]!r} is not a PEM file")
    return data


def check_tls_settings(config: SecuritySettings, *, serves: bool) -> None:
    """Raise ``InvalidArgument`` for combinations that cannot work."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise InvalidArgument(
            "--tls-cert and --tls-key (SPECDEC_TLS_CERT, SPECDEC_TLS_KEY) go together: "
            "set both or neither"
        )
    if serves and config.tls_ca and not config.tls_cert:
        raise InvalidArgument(
            "--tls-ca makes this server require client certificates, which needs TLS: "
            "set --tls-cert and --tls-key too"
        )


def server_credentials(config: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials of a server (None: plaintext); with ``tls_ca``, mutual TLS."""
    check_tls_settings(config, serves=True)
    if not config.tls_cert:
        return None
    pair = (read_pem(config.tls_key, "--tls-key"), read_pem(config.tls_cert, "--tls-cert"))
    ca = read_pem(config.tls_ca, "--tls-ca") if config.tls_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def tls_credentials(
    ca: str | Path | bytes | None = None,
    cert: str | Path | bytes | None = None,
    key: str | Path | bytes | None = None,
) -> grpc.ChannelCredentials:
    """Client TLS credentials: ``ca`` verifies the server (None: system roots);
    ``cert`` + ``key`` (paths or PEM bytes) are the client certificate for mutual TLS."""
    if (cert is None) != (key is None):
        raise InvalidArgument("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "tls ca") if ca else None,
        private_key=read_pem(key, "tls key") if key else None,
        certificate_chain=read_pem(cert, "tls cert") if cert else None,
    )


# ---- the dialling side --------------------------------------------------------------------


def _with_token(details: Any, header: str) -> Any:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != AUTHORIZATION]
    return details._replace(metadata=grpc.aio.Metadata(*metadata, (AUTHORIZATION, header)))


# grpc.aio sorts interceptors by the first of the four types they are an instance
# of, so each RPC shape needs an interceptor object of its own.
class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _StreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._header), requests)


class _StreamStreamToken(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._header), requests)


@dataclass(frozen=True)
class ChannelSecurity:
    """How one service dials the others: TLS material, expected server name, token."""

    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str = ""
    token: str = ""

    @classmethod
    def from_settings(
        cls,
        *,
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
        tls_server_name: str = "",
        token: str = "",
    ) -> ChannelSecurity:
        """TLS when ``tls_ca`` or ``tls_cert`` is set; files are read once, here."""
        if bool(tls_cert) != bool(tls_key):
            raise InvalidArgument("--tls-cert and --tls-key go together: set both or neither")
        check_token(token, "the auth token")
        return cls(
            tls=bool(tls_ca or tls_cert),
            root_certificates=read_pem(tls_ca, "--tls-ca") if tls_ca else None,
            certificate_chain=read_pem(tls_cert, "--tls-cert") if tls_cert else None,
            private_key=read_pem(tls_key, "--tls-key") if tls_key else None,
            server_name=tls_server_name,
            token=token,
        )

    @classmethod
    def of(cls, config: SecuritySettings, token: str | None = None) -> ChannelSecurity:
        """From a service's settings; ``token`` replaces its ``auth_token``."""
        return cls.from_settings(
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            tls_ca=config.tls_ca,
            tls_server_name=config.tls_server_name,
            token=config.auth_token if token is None else token,
        )

    def interceptors(self) -> list[Any]:
        if not self.token:
            return []
        header = f"Bearer {self.token}"
        return [
            _UnaryUnaryToken(header),
            _UnaryStreamToken(header),
            _StreamUnaryToken(header),
            _StreamStreamToken(header),
        ]

    def open(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An aio channel to ``address`` with these credentials and ``options``."""
        interceptors = self.interceptors() or None
        if not self.tls:
            return grpc.aio.insecure_channel(
                address, options=list(options), interceptors=interceptors
            )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(
            address, credentials, options=[*options, *extra], interceptors=interceptors
        )


# ---- the serving side -----------------------------------------------------------------------


def check_token(token: str, what: str) -> None:
    """Tokens travel as an HTTP/2 header value: printable ASCII without spaces."""
    if token and not all(33 <= ord(c) <= 126 for c in token):
        raise InvalidArgument(f"{what} must be printable ASCII without spaces")


class TokenTable:
    """Accepted bearer tokens and the principal each proves."""

    def __init__(self, tokens: Mapping[str, str], *, what: str = "token") -> None:
        for token in tokens:
            check_token(token, what)
        self._entries = [(token.encode(), principal) for token, principal in tokens.items()]
        self.what = what

    def __bool__(self) -> bool:
        return bool(self._entries)

    def principal_of(self, token: str) -> str | None:
        """The principal ``token`` proves, or None. Every entry is compared, in constant
        time each, so the time taken does not tell which one nearly matched."""
        given = token.encode()
        found = None
        for expected, principal in self._entries:
            if hmac.compare_digest(given, expected) and found is None:
                found = principal
        return found


def parse_principal_tokens(text: str, flag: str = "--auth-tokens") -> dict[str, str]:
    """``"alice:TOKEN1,bob:TOKEN2"`` -> {TOKEN1: "alice", TOKEN2: "bob"}; ``flag`` names
    the setting in errors."""
    tokens: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        principal, sep, token = item.partition(":")
        if not sep or not principal.strip() or not token.strip():
            raise InvalidArgument(
                f"{flag} entry {principal.strip() or item[:3] + '...'!r} is not "
                "PRINCIPAL:TOKEN (comma-separated, e.g. alice:TOKEN1,bob:TOKEN2)"
            )
        if token.strip() in tokens:
            raise InvalidArgument(f"{flag}: principal {principal!r} reuses a token")
        if principal.strip() in tokens.values():
            raise InvalidArgument(f"{flag}: principal {principal.strip()!r} appears twice")
        tokens[token.strip()] = principal.strip()
    return tokens


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``authorization`` value (None: no header; "": not a bearer token)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def worker_token_table(worker_token: str, worker_tokens: str) -> dict[str, str]:
    """The tokens workers may present: the shared ``worker_token`` (principal "worker")
    and each device's own (``worker_tokens``, "edge1:TOKEN1,edge2:TOKEN2")."""
    devices = parse_principal_tokens(worker_tokens, "--worker-tokens")
    if WORKER_PRINCIPAL in devices.values():
        raise InvalidArgument(
            f"--worker-tokens: {WORKER_PRINCIPAL!r} names the shared --worker-token; "
            "give each device another name"
        )
    if worker_token in devices:
        raise InvalidArgument("--worker-tokens reuses the shared worker token; use one")
    return {**({worker_token: WORKER_PRINCIPAL} if worker_token else {}), **devices}


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            return bearer_token(str(value))
    return None


def authenticate(table: TokenTable, token: str | None, service: str, how: str) -> str:
    """The principal ``token`` proves to ``service``; ``Unauthenticated`` otherwise, its
    message saying ``how`` a client sends one."""
    if not token:
        raise Unauthenticated(f"{service} needs a bearer token: {how}")
    principal = table.principal_of(token)
    if principal is None:
        raise Unauthenticated(f"the bearer token is not a valid {table.what} for {service}")
    return principal


Check = Callable[[grpc.aio.ServicerContext], Awaitable[str]]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Requires a known bearer token on every method of the ``protected`` services.

    protected: full service name (e.g. "specdec.v1.Gateway") -> the tokens it accepts.
    Other services (health, reflection) are served to anyone. A refused call ends with
    UNAUTHENTICATED before its handler runs; an accepted one runs with its principal
    as ``current_principal()``.
    """

    def __init__(self, protected: Mapping[str, TokenTable]) -> None:
        self._protected = dict(protected)

    def _check(self, service: str, table: TokenTable) -> Check:
        async def check(context: grpc.aio.ServicerContext) -> str:
            try:
                return authenticate(
                    table,
                    _bearer(context.invocation_metadata()),
                    service,
                    f"send the metadata `authorization: Bearer <{table.what}>` "
                    "(SPECDEC_AUTH_TOKEN, Client(token=...))",
                )
            except Unauthenticated as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                raise  # not reached: abort raises

        return check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        table = self._protected.get(service)
        if handler is None or table is None:
            return handler
        check = self._check(service, table)
        return rewrap(
            handler,
            lambda behavior: _guard_unary(behavior, check),
            lambda behavior: _guard_stream(behavior, check),
        )


def _guard_unary(behavior: Callable[..., Awaitable[Any]], check: Check) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _PRINCIPAL.set(await check(context))
        return await behavior(request, context)

    return handler


def _guard_stream(behavior: Callable[..., AsyncIterator[Any]], check: Check) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        _PRINCIPAL.set(await check(context))
        async for response in behavior(request, context):
            yield response

    return handler


def _application_token_map(auth_token: str, auth_tokens: str) -> dict[str, str]:
    apps = parse_principal_tokens(auth_tokens)
    if auth_token:
        if auth_token in apps:
            raise InvalidArgument("--auth-token is also one of --auth-tokens; use one")
        apps[auth_token] = DEFAULT_PRINCIPAL
    return apps


def application_tokens(auth_token: str, auth_tokens: str) -> TokenTable:
    """The gateway's application tokens: ``auth_token`` (principal "default") and
    ``auth_tokens`` ("alice:TOKEN1,bob:TOKEN2", each its own principal); empty: no auth."""
    return TokenTable(_application_token_map(auth_token, auth_tokens), what="application token")


def gateway_auth(
    auth_token: str, auth_tokens: str, worker_token: str, worker_tokens: str = ""
) -> AuthInterceptor | None:
    """The gateway's interceptor (None: authentication off).

    Applications (service Gateway) present one of ``application_tokens``. Workers
    (service WorkerRegistry) present the worker token: ``worker_token``, or
    ``auth_token`` when that is empty (one shared token for everything), or a device's
    own token of ``worker_tokens`` (its principal is the device's name).
    """
    apps = _application_token_map(auth_token, auth_tokens)
    workers = worker_token_table(worker_token or auth_token, worker_tokens)
    if worker_tokens.strip() and not (worker_token or auth_token):
        raise InvalidArgument(
            "--worker-tokens needs --worker-token too: oracles register with the shared "
            "worker token, a device's own token registers drafts only"
        )
    if any(workers.get(token, WORKER_PRINCIPAL) != WORKER_PRINCIPAL for token in apps):
        raise InvalidArgument("a --worker-tokens token is also an application token")
    if apps and not worker_token and not auth_token:
        raise InvalidArgument(
            "--auth-tokens protects the API but workers would register unauthenticated: "
            "set --worker-token (SPECDEC_WORKER_TOKEN) and give it to the oracles and "
            "drafts as their SPECDEC_AUTH_TOKEN"
        )
    protected: dict[str, TokenTable] = {}
    if apps:
        protected["specdec.v1.Gateway"] = TokenTable(apps, what="application token")
    if workers:
        protected["specdec.v1.WorkerRegistry"] = TokenTable(workers, what="worker token")
    return AuthInterceptor(protected) if protected else None


def oracle_auth(auth_token: str, worker_tokens: str = "") -> AuthInterceptor | None:
    """The oracle's interceptor: Verify, GetInfo, ReleaseSession need the worker token
    (``auth_token``) or a device's own (``worker_tokens``, for its drafts' Verify)."""
    workers = worker_token_table(auth_token, worker_tokens)
    if not workers:
        return None
    return AuthInterceptor({"specdec.v1.Oracle": TokenTable(workers, what="worker token")})
