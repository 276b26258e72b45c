"""Session grants: the gateway's signed permission for one oracle to serve one session.

An oracle with a ``grant_secret`` opens a Verify stream only for an ``OpenVerify``
whose ``grant`` the gateway issued: so a draft (or anything else that can reach
the oracle) cannot spend its GPU on work the gateway never assigned.

    grant   = "v1." + P + "." + b64url(HMAC-SHA256(secret, "specdec-grant.v1." + P))
    P       = b64url(json {"sid": session id, "oid": oracle id, "exp": expiry unix seconds})

The MAC binds all three fields: changing any of them invalidates the signature,
and only holders of the secret (the gateway and the oracles) can make one. The
gateway issues a fresh grant for every turn (Assignment.grant for a draft, its
own OpenVerify on the oracle-alone and n-gram paths); the oracle checks it once,
when the stream opens, so a turn may outlive its grant's expiry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable

from specdec.core.errors import InvalidArgument, PermissionDenied

VERSION = "v1"
_DOMAIN = b"specdec-grant." + VERSION.encode() + b"."
DEFAULT_TTL_S = 600.0
MIN_SECRET_CHARS = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GrantSigner:
    """Issues (gateway) and checks (oracle) grants under one shared secret."""

    def __init__(
        self,
        secret: str,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise InvalidArgument(
                f"--grant-secret must have at least {MIN_SECRET_CHARS} characters "
                "(e.g. `openssl rand -hex 32`), the same on the gateway and every oracle"
            )
        if ttl_s <= 0:
            raise InvalidArgument(f"--grant-ttl-s must be > 0, got {ttl_s}")
        self._key = secret.encode()
        self._ttl_s = ttl_s
        self._clock = clock

    def _mac(self, payload_b64: str) -> str:
        digest = hmac.new(self._key, _DOMAIN + payload_b64.encode(), hashlib.sha256).digest()
        return _b64(digest)

    def issue(self, session_id: str, oracle_id: str, ttl_s: float | None = None) -> str:
        """A grant for ``oracle_id`` to serve ``session_id`` until now + ttl."""
        expiry = int(self._clock() + (self._ttl_s if ttl_s is None else ttl_s))
        payload = json.dumps(
            {"sid": session_id, "oid": oracle_id, "exp": expiry}, separators=(",", ":")
        )
        payload_b64 = _b64(payload.encode())
        return f"{VERSION}.{payload_b64}.{self._mac(payload_b64)}"

    def verify(self, grant: str, session_id: str, oracle_id: str) -> None:
        """Return if ``grant`` lets this oracle serve ``session_id``; else PermissionDenied
        saying why (missing, malformed, bad signature, other session/oracle, expired)."""
        if not grant:
            raise PermissionDenied(
                "OpenVerify.grant is missing: this oracle serves only sessions the gateway "
                "assigned to it (a draft passes on the grant of its Assignment)"
            )
        version, _, rest = grant.partition(".")
        payload_b64, _, mac = rest.partition(".")
        if version != VERSION or not payload_b64 or not mac:
            raise PermissionDenied(f"OpenVerify.grant is malformed (not a {VERSION} grant)")
        # Signature first: nothing of an unsigned payload is trusted or echoed.
        if not hmac.compare_digest(mac.encode(), self._mac(payload_b64).encode()):
            raise PermissionDenied(
                "OpenVerify.grant has a bad signature: forged, or the gateway and this "
                "oracle have different --grant-secret"
            )
        try:
            payload = json.loads(_unb64(payload_b64))
            granted_session, granted_oracle = str(payload["sid"]), str(payload["oid"])
            expiry = int(payload["exp"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise PermissionDenied("OpenVerify.grant is malformed (bad payload)") from None
        if not hmac.compare_digest(granted_session.encode(), session_id.encode()):
            raise PermissionDenied("OpenVerify.grant was issued for another session")
        if granted_oracle and granted_oracle != oracle_id:
            raise PermissionDenied(
                f"OpenVerify.grant was issued for oracle {granted_oracle!r}, not {oracle_id!r}"
            )
        late = self._clock() - expiry
        if late > 0:
            raise PermissionDenied(
                f"OpenVerify.grant expired {late:.0f}s ago; the gateway issues a fresh one "
                "for every turn"
            )
