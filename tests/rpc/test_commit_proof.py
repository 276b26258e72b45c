"""Commit proofs (``specdec.rpc.commit_proof``): what a proof binds, and the keys."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from specdec.core.messages import CommitKey, CommitTicket
from specdec.core.types import TokenLogprob
from specdec.rpc.commit_proof import PROOF_BYTES, CommitChain, Keyring, new_commit_key, new_ticket

SECRET = b"s" * 32
TICKET = CommitTicket("k1", b"n" * 16)
CONTEXT = (1, 5, 9, 12)
SAMPLING: dict[str, Any] = {"temperature": 0.75, "top_k": 5, "top_p": 0.875, "seed": 77}
COMMITS = [(4, (20, 21, 22)), (7, (30,)), (8, (40, 41))]


def _chain(**changes: Any) -> CommitChain:
    terms: dict[str, Any] = {
        "secret": SECRET,
        "ticket": TICKET,
        "session_id": "session-1",
        "context": CONTEXT,
        **SAMPLING,
        **changes,
    }
    sampling = {name: terms.pop(name) for name in SAMPLING}
    return CommitChain(
        terms["secret"], terms["ticket"], terms["session_id"], terms["context"], **sampling
    )


def _proofs(chain: CommitChain) -> list[bytes]:
    return [chain.seal(base, tokens) for base, tokens in COMMITS]


def test_the_gateway_checks_what_the_oracle_sealed() -> None:
    proofs = _proofs(_chain())
    assert all(len(p) == PROOF_BYTES for p in proofs) and len(set(proofs)) == len(proofs)
    gateway = _chain()
    assert all(gateway.check(b, t, p) for (b, t), p in zip(COMMITS, proofs, strict=True))


@pytest.mark.parametrize(
    "changes",
    [
        {"secret": b"t" * 32},
        {"ticket": dataclasses.replace(TICKET, nonce=b"m" * 16)},
        {"session_id": "session-2"},
        {"context": (1, 5, 9, 13)},
        {"context": CONTEXT[:-1]},
        {"temperature": 0.0},
        {"top_k": 6},
        {"top_p": 1.0},
        {"seed": 78},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_a_proof_binds_the_turn_it_was_made_in(changes: dict[str, Any]) -> None:
    """Another key, attempt (nonce), session, context or sampling: no proof verifies."""
    proofs = _proofs(_chain())
    other = _chain(**changes)
    assert not other.check(*COMMITS[0], proofs[0])


@pytest.mark.parametrize(
    ("base", "tokens", "index"),
    [
        (5, (20, 21, 22), 0),  # shifted by one position
        (4, (20, 21), 0),  # a prefix of the tokens
        (4, (20, 21, 22, 23), 0),  # one more
        (4, (21, 21, 22), 0),  # one changed
        (4, (20, 21, 22), 1),  # the next commit's proof
        (7, (30,), 1),  # the right next commit, before the first
    ],
)
def test_a_proof_binds_position_tokens_and_order(
    base: int, tokens: tuple[int, ...], index: int
) -> None:
    proofs = _proofs(_chain())
    assert not _chain().check(base, tokens, proofs[index])


# Values exact in float32, as the oracle computes them and the protos carry them.
LOGPROBS = (TokenLogprob(-0.5, (20, 7), (-0.5, -1.25)), TokenLogprob(-2.0, (3, 21), (-1.0, -2.0)))


@pytest.mark.parametrize(
    "logprobs",
    [
        (),  # dropped
        LOGPROBS[:1],  # one dropped
        (dataclasses.replace(LOGPROBS[0], logprob=-0.25), LOGPROBS[1]),  # a value changed
        (LOGPROBS[0], dataclasses.replace(LOGPROBS[1], top_token_ids=(21, 3))),  # ids swapped
        (LOGPROBS[0], dataclasses.replace(LOGPROBS[1], top_logprobs=(-1.0, -2.5))),
        (LOGPROBS[0], TokenLogprob(-2.0)),  # alternatives dropped
    ],
    ids=["none", "one", "value", "ids", "alternative", "no-alternatives"],
)
def test_a_proof_binds_the_logprobs(logprobs: tuple[TokenLogprob, ...]) -> None:
    proof = _chain().seal(4, (20, 21), LOGPROBS)
    assert _chain().check(4, (20, 21), proof, LOGPROBS)
    assert not _chain().check(4, (20, 21), proof, logprobs)


def test_a_refused_commit_does_not_move_the_chain() -> None:
    proofs = _proofs(_chain())
    gateway = _chain()
    assert not gateway.check(*COMMITS[0], b"\0" * PROOF_BYTES)
    assert not gateway.check(4, (2**40,), proofs[0])  # beyond int32: refused, not raised
    assert gateway.check(*COMMITS[0], proofs[0])
    assert not gateway.check(*COMMITS[0], proofs[0])  # replayed: the chain moved on
    assert gateway.check(*COMMITS[1], proofs[1])


def test_keys_random_per_registration_or_derived_from_the_shared_secret() -> None:
    first, second = new_commit_key("oracle-a"), new_commit_key("oracle-a")
    assert first.key_id != second.key_id and first.secret != second.secret
    shared = "0123456789abcdef-grant-secret"
    replica_1, replica_2 = new_commit_key("oracle-a", shared), new_commit_key("oracle-a", shared)
    assert replica_1 == replica_2  # every gateway replica holds the same one
    assert new_commit_key("oracle-b", shared).secret != replica_1.secret
    assert new_commit_key("oracle-a", shared + "x").secret != replica_1.secret
    ticket, again = new_ticket(replica_1), new_ticket(replica_1)
    assert ticket.key_id == replica_1.key_id and ticket.nonce != again.nonce


async def test_an_oracle_waits_briefly_for_a_key_it_is_about_to_get() -> None:
    keyring = Keyring(size=2)
    waiting = asyncio.ensure_future(keyring.get("k1", wait_s=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    keyring.add(CommitKey("k1", b"one"))
    assert await waiting == b"one"
    assert await keyring.get("k2", wait_s=0.05) is None
    keyring.add(CommitKey("k2", b"two"))
    keyring.add(CommitKey("k3", b"three"))  # the oldest goes
    assert await keyring.get("k1", wait_s=0) is None
    assert await keyring.get("k3", wait_s=0) == b"three"
