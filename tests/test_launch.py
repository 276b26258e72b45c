"""The ports ``specdec.launch`` hands to local services: free now, below the kernel's
ephemeral range (where an outgoing connection could take them before the service binds),
and never the same one twice."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from specdec import launch
from specdec.launch import free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = launch._ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if low - launch.PORT_FLOOR >= 1000:
        assert all(launch.PORT_FLOOR <= port < low for port in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    low = launch._ephemeral_low()
    if low - launch.PORT_FLOOR < 1000:
        pytest.skip("no room below this machine's ephemeral range")
    with socket.socket() as held:
        for taken in range(low - 1, launch.PORT_FLOOR, -1):  # a port free now, then held
            try:
                held.bind(("127.0.0.1", taken))
                break
            except OSError:
                continue
        held.listen()
        picks: Iterator[int] = iter([taken, taken - 1, taken - 2, taken - 3])
        monkeypatch.setattr(launch.random, "randrange", lambda a, b: next(picks))
        port = free_port()
    assert port != taken and port in (taken - 1, taken - 2, taken - 3)
