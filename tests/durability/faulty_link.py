"""A TCP link between the gateway and a real server that a test can break the ways networks break.

``FaultyLink`` listens on a loopback port and forwards every connection to an upstream server (moto's
S3 here). A test switches it between:

- ``forward``: bytes pass both ways;
- ``blackhole``: connections are accepted and held, and nothing passes either way (a hung endpoint:
  the client waits for its own timeouts);
- ``refuse``: the listener is closed, so a connect gets ECONNREFUSED, and every open connection is
  reset.

Leaving ``blackhole`` or ``refuse`` resets the connections held meanwhile, as a router that comes
back does for flows it forgot. It runs in the test's event loop; nothing here knows the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

MODES = ("forward", "blackhole", "refuse")
CHUNK = 256 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN, as a link that lost the flow does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultyLink:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.mode = "forward"
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._passing = asyncio.Event()
        self._passing.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FaultyLink:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self._cut_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == self.mode:
            return
        previous, self.mode = self.mode, mode
        if mode == "forward":
            self._cut_all()  # flows held in the dark are forgotten, not resumed
            self._passing.set()
            if previous == "refuse":
                await self._listen()
        elif mode == "blackhole":
            self._passing.clear()
        else:
            self._passing.clear()
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            self._cut_all()

    async def _listen(self) -> None:
        # The same port again after ``refuse``: the gateway's endpoint URL does not change.
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def _cut_all(self) -> None:
        for writer in list(self._open):
            _reset(writer)
        self._open.clear()

    async def _accepted(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(client_writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(client_writer)
            self._open.discard(client_writer)
            return
        self._open.add(upstream_writer)
        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, client_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for writer in (client_writer, upstream_writer):
                self._open.discard(writer)
                writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                await self._passing.wait()  # a blackhole holds what it got; nothing reaches the other side
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()
