"""Security end to end: mutual TLS on every link, bearer tokens, session binding, grants.

One cluster of real processes runs with everything on: the gateway, an oracle and a
draft each hold a certificate from a CA made here (tests/pki.py), every server
requires client certificates, applications present per-principal tokens, workers a
worker token, and the oracle serves only sessions the gateway granted. Two rogue
drafts start beside them: one without a client certificate, one with a wrong token.
The oracle's certificate names only ``oracle.specdec.internal`` (as an oracle dialled
by pod IP would), so the gateway and the draft reach it only through
``--tls-server-name``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec.client import Client
from specdec.core.errors import InvalidArgument, PermissionDenied
from specdec.launch import Cluster, Service, cluster, free_port
from specdec.rpc.channels import open_channel
from specdec.rpc.grants import GrantSigner
from specdec.rpc.healthcheck import check
from specdec.rpc.security import (
    AuthInterceptor,
    ChannelSecurity,
    TokenTable,
    current_principal,
    gateway_auth,
    parse_principal_tokens,
    tls_credentials,
)
from specdec.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    oracle_pb2,
    oracle_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.pki import Pki

ALICE, BOB, WORKER = "alice-t0ken", "bob-t0ken", "w0rker-t0ken"
GRANT_SECRET = "0123456789abcdef-grant-secret"
ORACLE_NAME = "oracle.specdec.internal"
ORACLE_ID = "oracle-s"
PROMPT = [1, 5, 9, 12]


def reference(model_path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF greedy generate of the oracle alone, in this process: no network at all."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, len(prompt) :]]


@dataclass
class Secure:
    cluster: Cluster
    pki: Pki
    oracle_path: Path
    oracle: Service
    gateway_health: int
    oracle_health: int
    rogues: dict[str, Service]
    app_cert: Path
    app_key: Path

    def client(self, token: str | None = ALICE, timeout: float = 60) -> Client:
        return Client.tls(
            self.cluster.address,
            ca=self.pki.ca_path,
            cert=self.app_cert,
            key=self.app_key,
            token=token,
            timeout=timeout,
        )


def _wait_workers(secure: Secure, oracles: int, drafts: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with secure.client(timeout=2) as client:
        while time.monotonic() < deadline:
            for service in secure.cluster.services:
                if not service.alive():
                    raise RuntimeError(f"{service.name} exited:\n{service.log()[-3000:]}")
            try:
                kinds = [int(w.kind) for w in client.list_workers()]
            except grpc.RpcError:
                kinds = []
            if kinds.count(2) >= oracles and kinds.count(1) >= drafts:
                return
            time.sleep(0.2)
    logs = "\n".join(f"--- {s.name}\n{s.log()[-2000:]}" for s in secure.cluster.services)
    raise TimeoutError(f"workers not registered in {timeout}s\n{logs}")


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str, str], Path]
) -> Iterator[Secure]:
    oracle_path = model_dir("llama", "oracle")
    draft_path = model_dir("llama", "close_draft")
    pki = Pki(tmp_path_factory.mktemp("pki"))
    gw_cert, gw_key = pki.add("gateway", ["127.0.0.1", "localhost", ORACLE_NAME])
    or_cert, or_key = pki.add("oracle", [ORACLE_NAME])  # not its IP: needs the name override
    dr_cert, dr_key = pki.add("draft", server=False)
    app_cert, app_key = pki.add("app", server=False)
    ca = str(pki.ca_path)
    gateway_health, oracle_health = free_port(), free_port()
    with cluster(tmp_path_factory.mktemp("secure")) as c:
        c.start_gateway(
            "--tokenizer", str(oracle_path),
            "--tls-cert", str(gw_cert), "--tls-key", str(gw_key), "--tls-ca", ca,
            "--tls-server-name", ORACLE_NAME,
            "--auth-tokens", f"alice:{ALICE},bob:{BOB}", "--worker-token", WORKER,
            "--grant-secret", GRANT_SECRET, "--health-port", str(gateway_health),
        )  # fmt: skip
        oracle = c.start_oracle(
            oracle_path,
            "--tls-cert", str(or_cert), "--tls-key", str(or_key), "--tls-ca", ca,
            "--auth-token", WORKER, "--grant-secret", GRANT_SECRET,
            "--health-port", str(oracle_health),
            oracle_id=ORACLE_ID,
        )  # fmt: skip
        draft_tls = ["--tls-ca", ca, "--tls-server-name", ORACLE_NAME]
        client_cert = ["--tls-cert", str(dr_cert), "--tls-key", str(dr_key)]
        c.start_draft(
            draft_path, *draft_tls, *client_cert, "--auth-token", WORKER, draft_id="draft-s"
        )
        rogues = {
            "no client certificate": c.start_draft(
                draft_path, *draft_tls, "--auth-token", WORKER, draft_id="rogue-nocert"
            ),
            "wrong worker token": c.start_draft(
                draft_path, *draft_tls, *client_cert, "--auth-token", "guess", draft_id="rogue-tok"
            ),
        }
        secure = Secure(
            c, pki, oracle_path, oracle, gateway_health, oracle_health, rogues, app_cert, app_key
        )
        _wait_workers(secure, oracles=1, drafts=1)
        yield secure


# ---- the whole system, secured -------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 4])
def test_generation_over_mutual_tls_with_tokens_equals_the_oracle_alone(
    secure: Secure, k: int
) -> None:
    # k=4: gateway -> draft (Assignment.grant) -> oracle; k=0: gateway -> oracle itself.
    with secure.client() as client:
        result = client.generate(PROMPT, max_new_tokens=16, k=k, ignore_eos=True)
    assert result.token_ids == reference(secure.oracle_path, PROMPT, 16)
    assert result.stats.oracle_id == ORACLE_ID
    assert result.stats.draft_id == ("draft-s" if k else "")
    if k:
        assert result.stats.proposed_tokens > 0


def test_client_must_trust_the_gateway_and_present_a_certificate(secure: Secure) -> None:
    address = secure.cluster.address
    attempts = {
        "wrong CA": Client.tls(
            address, ca=secure.pki.other_ca_path, cert=secure.app_cert, key=secure.app_key
        ),
        "system roots": Client.tls(address, cert=secure.app_cert, key=secure.app_key),
        "no client certificate": Client.tls(address, ca=secure.pki.ca_path),
        "plaintext": Client(address),
    }
    for why, client in attempts.items():
        with client, pytest.raises(grpc.RpcError) as error:
            client.list_workers()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, why


@pytest.mark.parametrize(
    ("token", "says"),
    [(None, "needs a bearer token"), ("guess", "not a valid"), (WORKER, "not a valid")],
)
def test_applications_need_a_valid_token(secure: Secure, token: str | None, says: str) -> None:
    with secure.client(token=token) as client:
        for call in (
            lambda: client.generate(PROMPT, max_new_tokens=2),
            client.create_session,
            client.list_workers,
        ):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert says in (error.value.details() or "")


def test_sessions_are_bound_to_the_principal_that_created_them(secure: Secure) -> None:
    with secure.client(ALICE) as alice, secure.client(BOB) as bob:
        session = alice.create_session()
        first = alice.generate(PROMPT, session_id=session, max_new_tokens=4, k=2)
        unknown = "x" * len(session)
        for who in (session, unknown):  # foreign and non-existent look the same
            for call in (
                lambda s=who: bob.get_session(s),
                lambda s=who: bob.generate([7], session_id=s, max_new_tokens=2),
                lambda s=who: bob.close_session(s),
            ):
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.NOT_FOUND
        # Claiming to be alice in metadata proves nothing: the token decides.
        credentials = tls_credentials(secure.pki.ca_path, secure.app_cert, secure.app_key)
        with grpc.secure_channel(secure.cluster.address, credentials) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.GetSession(
                    gateway_pb2.GetSessionRequest(session_id=session),
                    metadata=(("authorization", f"Bearer {BOB}"), ("x-specdec-principal", "alice")),
                    timeout=10,
                )
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        # Alice's session is untouched by all of that.
        state = alice.get_session(session)
        assert list(state.token_ids) == PROMPT + first.token_ids
        assert alice.close_session(session) == len(PROMPT) + len(first.token_ids)


def test_rogue_drafts_cannot_register(secure: Secure) -> None:
    expected = {"no client certificate": "UNAVAILABLE", "wrong worker token": "UNAUTHENTICATED"}
    deadline = time.monotonic() + 60
    for why, rogue in secure.rogues.items():
        while f": {expected[why]}" not in rogue.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f": {expected[why]}" in rogue.log(), (why, rogue.log()[-2000:])
        assert "registered at gateway" not in rogue.log(), why
    with secure.client() as client:
        workers = {w.worker_id for w in client.list_workers()}
    assert workers == {ORACLE_ID, "draft-s"}


async def _connect(address: str, security: ChannelSecurity) -> grpc.StatusCode:
    """The status a worker gets when it tries to register with ``security``."""
    channel = open_channel(address, security)
    try:
        stub = registry_pb2_grpc.WorkerRegistryStub(channel)
        register = registry_pb2.RegisterWorker(
            worker_id="intruder", kind=gateway_pb2.WORKER_KIND_DRAFT
        )

        async def requests() -> Any:
            await asyncio.sleep(0.3)  # after the verdict on the headers: grpc/grpc#36066
            yield registry_pb2.ConnectRequest(register=register)
            await asyncio.sleep(30)

        call = stub.Connect(requests(), timeout=10)
        try:
            async for _ in call:
                return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    finally:
        await channel.close()


async def test_registration_needs_a_certificate_and_the_worker_token(secure: Secure) -> None:
    pki, address = secure.pki, secure.cluster.address
    ca, cert, key = str(pki.ca_path), str(secure.app_cert), str(secure.app_key)

    async def status(**settings: str) -> grpc.StatusCode:
        return await _connect(address, ChannelSecurity.from_settings(**settings))

    assert await status(tls_ca=ca, token=WORKER) == grpc.StatusCode.UNAVAILABLE  # no cert
    for token in ("", "guess", ALICE):  # an application token is not a worker token
        assert (
            await status(tls_ca=ca, tls_cert=cert, tls_key=key, token=token)
            == grpc.StatusCode.UNAUTHENTICATED
        ), token
    assert await status(tls_ca=ca, tls_cert=cert, tls_key=key, token=WORKER) == grpc.StatusCode.OK


def test_probes_and_reflection_stay_open(secure: Secure) -> None:
    # Plaintext health ports, for probes that speak neither TLS nor tokens.
    assert check(f"127.0.0.1:{secure.gateway_health}")
    assert check(f"127.0.0.1:{secure.oracle_health}", "specdec.v1.Oracle")
    # The main port wants mutual TLS from everyone, but no token for health/reflection.
    assert not check(secure.cluster.address)
    credentials = tls_credentials(secure.pki.ca_path, secure.app_cert, secure.app_key)
    with grpc.secure_channel(secure.cluster.address, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([request]), timeout=10
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"specdec.v1.Gateway", "specdec.v1.WorkerRegistry"} <= names


# ---- the oracle: worker token and grants ------------------------------------------------------


def _oracle_channel(secure: Secure) -> grpc.Channel:
    cert, key = secure.pki.folder / "draft.crt", secure.pki.folder / "draft.key"
    credentials = tls_credentials(secure.pki.ca_path, cert, key)
    return grpc.secure_channel(
        f"127.0.0.1:{secure.oracle.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", ORACLE_NAME)],
    )


def _open(secure: Secure, grant: str, session_id: str = "s-rogue", token: str = WORKER) -> Any:
    """Open a Verify stream directly at the oracle, as a rogue draft would."""
    with _oracle_channel(secure) as channel:
        request = oracle_pb2.VerifyRequest(
            open=oracle_pb2.OpenVerify(session_id=session_id, token_ids=PROMPT, grant=grant)
        )
        metadata = (("authorization", f"Bearer {token}"),)
        stub = oracle_pb2_grpc.OracleStub(channel)
        (reply,) = stub.Verify(iter([request]), metadata=metadata, timeout=30)
        return reply


@pytest.mark.parametrize(
    ("grant", "says"),
    [
        (lambda: "", "missing"),
        (lambda: GrantSigner("another-secret-of-16+").issue("s-rogue", ORACLE_ID), "signature"),
        (lambda: GrantSigner(GRANT_SECRET).issue("s-rogue", ORACLE_ID, ttl_s=-5), "expired"),
        (lambda: GrantSigner(GRANT_SECRET).issue("s-other", ORACLE_ID), "another session"),
        (lambda: GrantSigner(GRANT_SECRET).issue("s-rogue", "oracle-b"), "oracle-b"),
        (lambda: "v1.e30." + GrantSigner(GRANT_SECRET).issue("s", "o").split(".")[2], "sig"),
    ],
    ids=["missing", "forged", "expired", "other-session", "other-oracle", "spliced"],
)
def test_oracle_refuses_verify_without_a_valid_grant(
    secure: Secure, grant: Callable[[], str], says: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _open(secure, grant())
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert says in (error.value.details() or "")


def test_oracle_serves_a_granted_session_to_the_worker_token_only(secure: Secure) -> None:
    grant = GrantSigner(GRANT_SECRET).issue("s-rogue", ORACLE_ID)
    assert _open(secure, grant).opened.committed_length == len(PROMPT)  # the control
    with pytest.raises(grpc.RpcError) as error:
        _open(secure, grant, token=ALICE)  # an application token is not a worker token
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _oracle_channel(secure) as channel:
        with pytest.raises(grpc.RpcError) as error:
            oracle_pb2_grpc.OracleStub(channel).GetInfo(oracle_pb2.GetInfoRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- pieces, in process ------------------------------------------------------------------------


def test_grants_bind_session_oracle_and_expiry() -> None:
    now = [1000.0]
    signer = GrantSigner(GRANT_SECRET, ttl_s=60, clock=lambda: now[0])
    grant = signer.issue("s1", "o1")
    signer.verify(grant, "s1", "o1")
    now[0] += 59
    signer.verify(grant, "s1", "o1")
    now[0] += 2
    with pytest.raises(PermissionDenied, match="expired"):
        signer.verify(grant, "s1", "o1")
    # Every character of the payload is covered by the MAC.
    version, payload, mac = grant.split(".")
    for i in range(len(payload)):
        flipped = payload[:i] + ("A" if payload[i] != "A" else "B") + payload[i + 1 :]
        with pytest.raises(PermissionDenied):
            signer.verify(f"{version}.{flipped}.{mac}", "s1", "o1")
    with pytest.raises(InvalidArgument, match="at least"):
        GrantSigner("short")


def test_token_settings() -> None:
    assert parse_principal_tokens("alice:t1, bob:t2") == {"t1": "alice", "t2": "bob"}
    for bad in ("alice", "alice:", ":t1", "a:t1,b:t1"):
        with pytest.raises(InvalidArgument):
            parse_principal_tokens(bad)
    with pytest.raises(InvalidArgument, match="worker-token"):
        gateway_auth("", "alice:t1", "")
    assert gateway_auth("", "", "") is None
    table = TokenTable({"t1": "alice", "t2": "bob"})
    assert (table.principal_of("t2"), table.principal_of("t3"), table.principal_of("")) == (
        "bob",
        None,
        None,
    )
    with pytest.raises(InvalidArgument):
        ChannelSecurity.from_settings(tls_cert="x.crt")  # without its key


async def test_auth_interceptor_guards_all_four_rpc_shapes() -> None:
    """Each shape: refused without a token, and the handler sees the token's principal."""

    async def unary(request: bytes, context: Any) -> bytes:
        return current_principal().encode()

    async def client_stream(requests: Any, context: Any) -> bytes:
        return b"".join([r async for r in requests]) + current_principal().encode()

    async def server_stream(request: bytes, context: Any) -> Any:
        yield current_principal().encode()

    async def bidi(requests: Any, context: Any) -> Any:
        async for r in requests:
            yield r + current_principal().encode()

    handlers = grpc.method_handlers_generic_handler(
        "t.Echo",
        {
            "UU": grpc.unary_unary_rpc_method_handler(unary),
            "SU": grpc.stream_unary_rpc_method_handler(client_stream),
            "US": grpc.unary_stream_rpc_method_handler(server_stream),
            "SS": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )
    interceptor = AuthInterceptor({"t.Echo": TokenTable({"t1": "alice", "t2": "bob"})})
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def calls(token: str) -> list[Any]:
        """Per shape: what the handler answered, or the status of the refusal."""

        async def two() -> Any:
            # A refused call ends before its requests are read; a request written after
            # that end is reported as INTERNAL instead of the server's status by grpc.aio
            # (grpc/grpc#36066), so the first write waits for the verdict on the headers.
            await asyncio.sleep(0.3)
            yield b"a"
            yield b"b"

        async with ChannelSecurity(token=token).open(f"127.0.0.1:{port}") as channel:
            shapes = [
                lambda: channel.unary_unary("/t.Echo/UU")(b"", timeout=5),
                lambda: channel.stream_unary("/t.Echo/SU")(two(), timeout=5),
                lambda: _collect(channel.unary_stream("/t.Echo/US")(b"", timeout=5)),
                lambda: _collect(channel.stream_stream("/t.Echo/SS")(two(), timeout=5)),
            ]
            answers: list[Any] = []
            for shape in shapes:
                try:
                    answers.append(await shape())
                except grpc.aio.AioRpcError as exc:
                    answers.append(exc.code())
            return answers

    try:
        assert await calls("t2") == [b"bob", b"abbob", [b"bob"], [b"abob", b"bbob"]]
        assert await calls("t1") == [b"alice", b"abalice", [b"alice"], [b"aalice", b"balice"]]
        for token in ("", "t3"):
            assert await calls(token) == [grpc.StatusCode.UNAUTHENTICATED] * 4
    finally:
        await server.stop(None)


async def _collect(call: Any) -> list[bytes]:
    return [response async for response in call]
