"""Commit proofs: only the oracle decides what a turn commits.

A draft relays the oracle's verdicts to the gateway, and the gateway must not take its
word for them: edge devices are the least trusted machines of the system, and one stolen
device holds a worker token. So the oracle signs every commit with a key only it and the
gateway hold, and the gateway applies no commit whose proof does not verify.

    secret   one per oracle registration: Registered.commit_key, sent to that oracle only
    K        = HMAC(secret, "specdec-commit.v1" | session id | nonce)      one per turn
    h_0      = HMAC(K, "open" | temperature | top_k | top_p | seed | context tokens)
    h_i      = HMAC(K, "commit" | h_(i-1) | base_i | tokens_i | logprobs_i)  the i-th commit
    proof_i  = h_i[:16]

HMAC-SHA256 throughout; every variable-length field is length-prefixed; logprobs_i
are the commit's ``TokenLogprob``s (none: an empty list), each value as the float32
that carries it. The gateway picks the nonce for each attempt of a turn
(``CommitTicket``) and both sides run the same chain: the oracle seals each verdict it
commits (``CommitChain.seal``), the gateway checks each commit a worker reports
(``CommitChain.check``). A proof therefore binds the session, the attempt, the context
and the sampling the oracle verified under, the position, the tokens and their
logprobs, and every commit before it: forged proofs, proofs replayed from another turn
or session, tokens shifted, altered or reordered, and an oracle opened on another
context, temperature or seed all fail. 128 bits of tag leave a forger one chance in
2^128 per try, and a refused commit ends its worker's turn.

Without ``--grant-secret`` the gateway draws a random secret per oracle registration;
with it, every gateway replica derives the same secret per oracle from it, so that a
replica can check the commits of a turn another one assigned.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from specdec.core.messages import CommitKey, CommitTicket
from specdec.core.types import TokenLogprob

VERSION = b"specdec-commit.v1"
PROOF_BYTES = 16
NONCE_BYTES = 16
# Keys an oracle keeps: one per gateway it is registered at, and a few of their
# previous registrations whose turns may still be running.
KEYRING_SIZE = 32


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(parts), "sha256")


def _field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _tokens(tokens: Sequence[int]) -> bytes:
    """Length, then each id as a little-endian int32 (ids beyond it: ValueError)."""
    try:
        packed = array("i", tokens)
    except OverflowError as exc:
        raise ValueError(f"not int32 token ids: {exc}") from None
    if packed.itemsize != 4:  # (no platform this runs on has another C int)
        raise ValueError("array('i') is not 32-bit here")
    if sys.byteorder == "big":
        packed.byteswap()
    return struct.pack("<I", len(packed)) + packed.tobytes()


def _logprobs(logprobs: Sequence[TokenLogprob]) -> bytes:
    """Count, then per token its logprob, its top ids and their logprobs; each value as
    the float32 the protos carry it as (what the oracle sends is what the gateway reads)."""
    parts = [struct.pack("<I", len(logprobs))]
    for lp in logprobs:
        values = struct.pack(f"<{1 + len(lp.top_logprobs)}f", lp.logprob, *lp.top_logprobs)
        parts += [_field(values), _tokens(lp.top_token_ids)]
    return b"".join(parts)


def new_ticket(key: CommitKey) -> CommitTicket:
    """The ticket of one attempt of a turn: ``key`` and a fresh random nonce."""
    return CommitTicket(key.key_id, secrets.token_bytes(NONCE_BYTES))


def new_commit_key(oracle_id: str, shared_secret: str = "") -> CommitKey:
    """The key of one oracle registration: random, or derived from ``shared_secret``
    (``--grant-secret``) so that every gateway replica holds the same one."""
    if not shared_secret:
        return CommitKey("r-" + secrets.token_hex(8), secrets.token_bytes(32))
    derived = _mac(shared_secret.encode(), VERSION, b"key", _field(oracle_id.encode()))
    return CommitKey("d-" + _mac(derived, b"id")[:8].hex(), derived)


class CommitChain:
    """The proofs of one attempt's commits, in order (see the module docstring)."""

    def __init__(
        self,
        secret: bytes,
        ticket: CommitTicket,
        session_id: str,
        context: Sequence[int],
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
    ) -> None:
        self._key = _mac(secret, VERSION, _field(session_id.encode()), _field(ticket.nonce))
        sampling = struct.pack("<fifQ", temperature, top_k, top_p, seed & (2**64 - 1))
        self._head = _mac(self._key, b"open", sampling, _tokens(context))

    def _next(
        self, base_length: int, tokens: Sequence[int], logprobs: Sequence[TokenLogprob]
    ) -> bytes:
        return _mac(
            self._key,
            b"commit",
            self._head,
            struct.pack("<q", base_length),
            _tokens(tokens),
            _logprobs(logprobs),
        )

    def seal(
        self, base_length: int, tokens: Sequence[int], logprobs: Sequence[TokenLogprob] = ()
    ) -> bytes:
        """The oracle: the proof of committing ``tokens`` (with their ``logprobs``, when
        the stream asks for them) after ``base_length`` tokens."""
        self._head = self._next(base_length, tokens, logprobs)
        return self._head[:PROOF_BYTES]

    def check(
        self,
        base_length: int,
        tokens: Sequence[int],
        proof: bytes,
        logprobs: Sequence[TokenLogprob] = (),
    ) -> bool:
        """The gateway: whether ``proof`` is the oracle's for this commit, next in the
        chain. Only a commit that passes moves the chain on."""
        try:
            head = self._next(base_length, tokens, logprobs)
        except (ValueError, TypeError, struct.error, OverflowError):
            return False
        if not hmac.compare_digest(head[:PROOF_BYTES], proof):
            return False
        self._head = head
        return True


class Keyring:
    """An oracle's commit keys, by id, as its gateways hand them out (newest kept)."""

    def __init__(self, size: int = KEYRING_SIZE) -> None:
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._size = size
        self._changed = asyncio.Event()

    def add(self, key: CommitKey) -> None:
        self._keys[key.key_id] = key.secret
        self._keys.move_to_end(key.key_id)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()

    async def get(self, key_id: str, wait_s: float) -> bytes | None:
        """The secret of ``key_id``; waits up to ``wait_s`` for it (a turn may reach the
        oracle before the gateway's registration answer does). None: unknown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while key_id not in self._keys:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return None
        return self._keys[key_id]
