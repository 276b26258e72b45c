"""A TCP proxy that injects network faults between two services, for the fault tests.

Put it in front of an oracle (its ``--public-address`` for the drafts, or its
``--advertise-address`` for everyone) and then, while traffic flows:

* ``delay_s``: every chunk is forwarded ``delay_s / 2`` late in each direction
  (a slow link, so a generation lasts long enough for a fault to land mid-way);
* ``cut()``: close every open connection (FIN), as a peer that hangs up;
* ``reset()``: abort every open connection with a TCP RST (SO_LINGER 0), as a
  crashed middlebox;
* ``stall()`` / ``resume()``: keep connections open but forward nothing (a
  black hole: only a timeout can notice it), then deliver what was held.

New connections are accepted in every mode (a stalled proxy stalls them too).
The proxy runs its own event loop in a daemon thread so synchronous tests can
drive it; every public method is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client's side and the target's side."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``, faults on demand."""

    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.accepted = 0  # connections accepted so far
        self.port = 0
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._call(self._start())

    # -- control (any thread) ---------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def cut(self) -> int:
        """Close every open connection gracefully (FIN); returns how many."""
        return self._call(self._drop(reset=False))

    def reset(self) -> int:
        """Abort every open connection with an RST; returns how many."""
        return self._call(self._drop(reset=True))

    def stall(self) -> None:
        """Stop forwarding (both directions, all connections, new ones too)."""
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        """Forward again, held data first."""
        self._call(self._set_flowing(True))

    def close(self) -> None:
        """Stop listening, drop every connection, end the thread."""
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the proxy's loop -------------------------------------------------------

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop(reset=False)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _drop(self, *, reset: bool) -> int:
        pairs = list(self._pairs)
        self._pairs.clear()
        for pair in pairs:
            for task in pair.tasks:
                task.cancel()
            for writer in (pair.client, pair.target):
                if reset:
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            # Linger on, 0 s: close() sends RST instead of FIN.
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                    writer.transport.abort()
                else:
                    writer.close()
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()  # target down: the client sees the connection fail
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        pair.tasks = [
            asyncio.create_task(self._pump(pair, reader, up_writer, up=True)),
            asyncio.create_task(self._pump(pair, up_reader, writer, up=False)),
        ]

    async def _pump(
        self, pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """Copy reader -> writer, each chunk held until due and while the proxy flows."""
        assert self._flowing is not None
        flowing = self._flowing
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await flowing.wait()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                await queue.put((time.monotonic() + self.delay_s / 2, data))
            await queue.put((0.0, b""))
            await sender
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            # One side ended: end the other too, as a real connection would.
            if pair in self._pairs:
                self._pairs.discard(pair)
                for other in (pair.client, pair.target):
                    with contextlib.suppress(Exception):
                        other.close()
