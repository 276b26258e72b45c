"""Start the three services as separate local processes over real sockets.

Used by `specdec up`, by `specdec bench` and by the end-to-end tests: a
``Cluster`` starts a gateway, then oracles and drafts that dial into it, and
waits until the gateway lists them; ``redis_server`` starts a local
``redis-server`` for gateway replicas sharing sessions.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.core.errors import InvalidArgument

READY_TIMEOUT_S = 300.0


# Ports handed out below the kernel's ephemeral range. A port from that range (what
# binding port 0 returns) can be taken as the source port of any outgoing connection
# between the check here and the service's own bind: "Address already in use".
PORT_FLOOR = 20000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The first port the kernel may give an outgoing connection (Linux; else 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the ephemeral range and not handed out
    before by this process (port 0's answer when that range leaves no room)."""
    low = _ephemeral_low()
    for _ in range(100):
        if low - PORT_FLOOR < 1000:
            break
        port = random.randrange(PORT_FLOOR, low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Each service runs in a process group of its own, so a Ctrl-C at the terminal reaches
# only the launcher, which stops everyone. Not in a session of its own: Linux's autogroup
# scheduling gives every session its own scheduling group and shares the CPUs equally
# between groups, whatever their nice values, so a niced draft would take as much CPU as
# the oracle it shares a host with.
_OWN_PROCESS_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
)


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, as a crashed machine."""
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


@dataclass
class Cluster:
    """A gateway plus the oracles and drafts started against it."""

    workdir: Path
    env: dict[str, str]
    echo: bool = False  # services log to this terminal instead of files
    gateway: Service | None = None  # the latest gateway started
    services: list[Service] = field(default_factory=list)
    gateway_ports: list[int] = field(default_factory=list)  # every replica's, in order

    @property
    def address(self) -> str:
        assert self.gateway is not None
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def gateway_addresses(self) -> str:
        """Every gateway replica, as workers' ``--gateway`` and clients take them."""
        return ",".join(f"127.0.0.1:{port}" for port in self.gateway_ports)

    def _start(
        self, name: str, args: Sequence[str], port: int = 0, nice: int = 0, cpus: str = ""
    ) -> Service:
        log_path = self.workdir / f"{name}-{len(self.services)}.log"
        handle = None if self.echo else log_path.open("wb")
        command = [sys.executable, "-m", "specdec.cli", *args]
        if nice:
            command = ["nice", "-n", str(nice), *command]
        if cpus:
            command = ["taskset", "--cpu-list", cpus, *command]
        process = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT if handle else None,
            env=self.env,
            **_OWN_PROCESS_GROUP,
        )
        service = Service(name, process, log_path, port)
        self.services.append(service)
        return service

    def start_gateway(self, *flags: str, port: int = 0, cpus: str = "") -> Service:
        """A gateway on ``port`` (0 = a free one; the port of one that died: its
        restart); ``cpus``: see ``check_cpus``. Its sessions are in a SQLite store
        under the work directory unless ``flags`` name another store."""
        port = port or free_port()
        args = ["gateway", "--port", str(port), *flags]
        if not {"--session-store", "--state-dir"} & set(flags):
            args += ["--state-dir", str(self.workdir / "gateway-state")]
        self.gateway = self._start("gateway", args, port, cpus=cpus)
        if port not in self.gateway_ports:
            self.gateway_ports.append(port)
        return self.gateway

    def start_oracle(
        self,
        model: Path | str | None,
        *flags: str,
        oracle_id: str = "",
        port: int = 0,
        cpus: str = "",
    ) -> Service:
        """An oracle (model None = the demo oracle) registering at this cluster's gateway."""
        port = port or free_port()
        args = [
            "oracle", "--port", str(port), "--host", "127.0.0.1",
            "--gateway", self.gateway_addresses, "--advertise-address", f"127.0.0.1:{port}",
        ]  # fmt: skip
        if model is not None:
            args += ["--model", str(model)]
        if oracle_id:
            args += ["--oracle-id", oracle_id]
        return self._start("oracle", [*args, *flags], port, cpus=cpus)

    def start_draft(
        self,
        model: Path | str | None,
        *flags: str,
        draft_id: str = "",
        nice: int = 0,
        cpus: str = "",
    ) -> Service:
        """A draft (model None = the demo draft) dialling this cluster's gateway.

        nice > 0 lowers its CPU priority: drafts that share a benchmark host with the
        oracle then do not slow the oracle's (CPU-bound, launch-bound) forward passes.
        ``cpus`` keeps it on those CPUs (``check_cpus``): apart from the oracle's, like
        an edge device.
        """
        args = ["draft", "--gateway", self.gateway_addresses, "--health-port", "-1"]
        if model is not None:
            args += ["--model", str(model)]
        if draft_id:
            args += ["--draft-id", draft_id]
        return self._start("draft", [*args, *flags], nice=nice, cpus=cpus)

    def wait_workers(
        self, oracles: int, drafts: int, timeout: float = READY_TIMEOUT_S, address: str = ""
    ) -> None:
        """Until the gateway (at ``address``; default: the latest started) lists this many
        workers of each kind."""
        from specdec.client import Client

        deadline = time.monotonic() + timeout
        with Client(address or self.address, timeout=2) as client:
            while time.monotonic() < deadline:
                for service in self.services:
                    if not service.alive() and service.process.returncode not in (0, -9):
                        raise RuntimeError(
                            f"{service.name} exited with code {service.process.returncode}:\n"
                            f"{service.log()[-3000:]}"
                        )
                with contextlib.suppress(Exception):
                    kinds = [int(w.kind) for w in client.list_workers()]
                    if kinds.count(2) >= oracles and kinds.count(1) >= drafts:
                        return
                time.sleep(0.2)
        logs = "\n".join(f"--- {s.name}\n{s.log()[-2000:]}" for s in self.services)
        raise TimeoutError(f"workers not registered in {timeout}s\n{logs}")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.terminate()


def check_cpus(text: str, flag: str) -> frozenset[int]:
    """The CPUs of a list such as ``"0-3,8"`` (what ``taskset --cpu-list`` takes), all
    of which this process may run on; InvalidArgument naming ``flag`` otherwise."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise InvalidArgument(f"{flag} takes CPUs like 0-3,8, got {text!r}") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise InvalidArgument(
            f"{flag} {text!r} names CPUs this process cannot use; it may use {sorted(allowed)}"
        )
    return frozenset(cpus)


@contextlib.contextmanager
def cluster(
    workdir: Path, env: dict[str, str] | None = None, *, echo: bool = False
) -> Iterator[Cluster]:
    """A Cluster whose services are all stopped on exit.

    Each process gets one compute thread unless ``env`` says otherwise: on a small
    machine, several processes spinning OpenMP threads slow each other down tenfold.
    """
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    environment.setdefault("SPECDEC_LOG_LEVEL", "info")
    running = Cluster(workdir, environment, echo)
    try:
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A local ``redis-server`` (append-only file on, as deployed) with its files in
    ``folder``; yields its URL, stops it on exit. ``FileNotFoundError`` without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    process = subprocess.Popen(
        [binary, *args, "--save", "", "--appendonly", "yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {process.poll()})")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
