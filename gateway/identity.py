"""Who a worker registration comes from, and whether it may take the id it names.

A worker's id names it in routing, in the sessions that remember it and in the logs.
A second registration under the id of a live worker must not push that worker out: an
impostor pointing at a dead address would silently take its place. What a
registration proves about its sender:

* ``device``: the principal of its per-device worker token (``--worker-tokens``);
  "" for the shared worker token, or without tokens;
* ``peer``: the identity its mTLS client certificate names (SANs, else the CN); ""
  without a client certificate.

A live worker's id is taken over only by a registration proving the same non-empty
identity (the same device token and certificate identity: the same worker,
reconnecting before the gateway noticed its old stream die); anything else is
ALREADY_EXISTS until the first one's stream is gone. A device token registers drafts
only: oracles hold the shared worker token, as they prove the commits that drafts
merely relay (``specdec.rpc.commit_proof``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specdec.core.errors import AlreadyExists, PermissionDenied, quoted
from specdec.core.messages import WorkerKind, WorkerRegistration
from specdec.rpc.security import WORKER_PRINCIPAL, current_principal


@dataclass(frozen=True)
class WorkerIdentity:
    """What a registration proved about its sender (see the module docstring)."""

    device: str = ""
    peer: str = ""

    @property
    def proven(self) -> bool:
        return bool(self.device or self.peer)

    def __str__(self) -> str:
        parts = [f"device {self.device!r}"] if self.device else []
        parts += [f"certificate {self.peer!r}"] if self.peer else []
        return " and ".join(parts) or "no identity of its own (shared token, no certificate)"


def identity_of(context: Any) -> WorkerIdentity:
    """The identity of the caller of the current RPC (its token's principal, set by the
    auth interceptor, and its certificate as the TLS handshake verified it)."""
    principal = current_principal()
    peer = b",".join(context.peer_identities() or ()).decode(errors="replace")
    return WorkerIdentity(principal if principal != WORKER_PRINCIPAL else "", peer)


def check_role(info: WorkerRegistration, identity: WorkerIdentity) -> None:
    """A device token registers drafts only."""
    if identity.device and info.kind is WorkerKind.ORACLE:
        raise PermissionDenied(
            f"device {identity.device!r} presented its own worker token (--worker-tokens), "
            "which registers drafts only; an oracle presents the shared --worker-token"
        )


def check_takeover(
    worker_id: str, live: WorkerIdentity, newcomer: WorkerIdentity, since_s: float
) -> None:
    """A registration under the id of a live worker: allowed only to that same worker."""
    if newcomer.proven and newcomer == live:
        return
    raise AlreadyExists(
        f"worker id {quoted(worker_id)} belongs to a live worker (connected {since_s:.0f}s "
        f"ago), and this registration does not prove to be it ({newcomer}): choose another "
        "id (--draft-id, --oracle-id), or register once its stream is gone"
    )
