"""A userspace TCP proxy that adds a round-trip delay and counts the bytes it carries.

The kernel's netem is not available on our machines, so the benchmark puts
this proxy between the draft and the oracle: every chunk is forwarded
``delay_s / 2`` after it arrives, in each direction, so one request/response
exchange gains ``delay_s``. Order is kept; throughput is not limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


@dataclass
class DelayProxy:
    """Forwards 127.0.0.1:<port> to ``target_host``:``target_port``."""

    target_host: str
    target_port: int
    delay_s: float = 0.0  # added round trip; may change while running
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, "bytes_up")),
            asyncio.create_task(self._pump(up_reader, writer, "bytes_down")),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                setattr(self, counter, getattr(self, counter) + len(data))
                await queue.put((time.monotonic() + self.delay_s / 2, data))
            await queue.put((0.0, b""))
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
        finally:
            with contextlib.suppress(Exception):
                writer.close()
