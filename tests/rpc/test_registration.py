"""Which gateway replicas a worker dials for ``--gateway`` (``resolve_gateways``), with the
machine's real resolver. Registration at every replica of a list, end to end, is in
tests/system/test_durability.py (two gateways on Redis)."""

from __future__ import annotations

from specdec.rpc.registration import gateway_entries, resolve_gateways


def test_entries_are_the_comma_separated_addresses() -> None:
    assert gateway_entries(" a:1, b:2 ,,") == ["a:1", "b:2"]


async def test_addresses_are_dialled_as_given() -> None:
    targets = await resolve_gateways("127.0.0.1:50051,[::1]:50052")
    assert targets == {"127.0.0.1:50051": "", "[::1]:50052": ""}


async def test_a_name_of_one_gateway_is_dialled_by_name_once() -> None:
    # localhost is 127.0.0.1 and ::1: one gateway, which must not get two streams
    # from one worker (each registration would replace the other).
    assert await resolve_gateways("localhost:50051") == {"localhost:50051": ""}


async def test_a_name_that_does_not_resolve_yet_is_dialled_by_name() -> None:
    assert await resolve_gateways("gateway.invalid:50051") == {"gateway.invalid:50051": ""}
