"""``specdec.launch``: the ports it hands to local services (free now, below the kernel's
ephemeral range, where an outgoing connection could take them before the service binds,
and never the same one twice), and the CPUs and niceness it starts them with."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from specdec import launch
from specdec.core.errors import InvalidArgument
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


PINNABLE = hasattr(os, "sched_getaffinity") and shutil.which("taskset") is not None


@pytest.mark.skipif(
    not PINNABLE or len(os.sched_getaffinity(0)) < 2, reason="needs taskset and two CPUs"
)
def test_a_service_runs_niced_on_the_cpus_it_is_given(tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    nice = os.getpriority(os.PRIO_PROCESS, 0) + 5  # relative to the test's own niceness
    with launch.cluster(tmp_path) as running:
        gateway = running.start_gateway(cpus=str(cpu))
        draft = running.start_draft(None, draft_id="pinned", nice=5, cpus=f"0,{cpu}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until taskset and nice have exec'd Python
            pinned = [os.sched_getaffinity(s.process.pid) for s in (gateway, draft)]
            niceness = os.getpriority(os.PRIO_PROCESS, draft.process.pid)
            if pinned == [{cpu}, {0, cpu}] and niceness == nice:
                break
            time.sleep(0.05)
        assert pinned == [{cpu}, {0, cpu}] and niceness == nice
        running.wait_workers(oracles=0, drafts=1, timeout=120)  # and it runs as a draft


def autogroup(pid: int | str) -> str:
    """The scheduling group that Linux's autogroup puts a process in.

    "" where there is none: no autogroup support, or the default group (init's, which a
    process keeps when no ancestor started a session), whose file the kernel leaves empty.
    """
    path = Path(f"/proc/{pid}/autogroup")
    words = path.read_text().split() if path.exists() else []
    return words[0] if words else ""


def test_a_service_has_its_own_process_group_but_shares_the_launchers_cpu_group(
    tmp_path: Path,
) -> None:
    # Ctrl-C at the terminal must not reach the services (the launcher stops them in
    # order), and their nice values must count against the launcher's other processes:
    # a session of its own would put each service in an autogroup of its own, and the
    # kernel shares the CPUs equally between autogroups whatever the nice values.
    with launch.cluster(tmp_path) as running:
        gateway = running.start_gateway()
        pid = gateway.process.pid
        assert os.getpgid(pid) == pid != os.getpgid(0)
        assert os.getsid(pid) == os.getsid(0)
        assert autogroup(pid) == autogroup("self")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_a_cpu_list_is_checked_against_the_cpus_this_process_may_use() -> None:
    allowed = os.sched_getaffinity(0)
    first = min(allowed)
    assert launch.check_cpus(f"{first}", "--x") == {first}
    assert launch.check_cpus(f"{first}-{first}, {first}", "--x") == {first}
    with pytest.raises(InvalidArgument, match="--draft-cpus takes CPUs like 0-3,8"):
        launch.check_cpus("two", "--draft-cpus")
    with pytest.raises(InvalidArgument, match="--oracle-cpus '4096' names CPUs this process"):
        launch.check_cpus("4096", "--oracle-cpus")
