"""Accepting connections: everything the kernel has queued, in one turn of the event loop.

uvloop's server accepts one connection each time the loop polls its sockets (strace: one
``accept4`` per ``epoll_pwait``, never one that finds the queue empty). A busy worker turns every
10-40 ms, so it accepted 25-100 connections a second: when a few hundred arrived at once (a load
balancer reconnecting, a fleet coming back after a ``Retry-After``) they waited up to 0.6 s in the
kernel's queue before the gateway saw them, and even a refusal reached them that late. The
``Acceptor`` takes every waiting connection each time the listener is readable (up to
``ACCEPT_BURST``), so a connection waits at most one turn; the ``ConnectionGuard`` still decides
each one (connections.py), with the kernel's queue depth as it is behind that connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Connections accepted per wake-up at most, so that a flood of them cannot hold the loop for long.
ACCEPT_BURST = 256
# Out of file descriptors: accepting pauses this long, so the loop does not spin on a queue it cannot take.
PAUSE_WHEN_OUT_OF_FILES_SECS = 0.1
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Serves ``protocol_factory`` on ``listener``; ``shed(sock)`` may answer and close a connection
    before any transport is built for it (it returns True when it did)."""

    def __init__(
        self,
        listener: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_secs: float | None = None,
        shed: Callable[[socket.socket], bool] = lambda sock: False,
    ) -> None:
        self._listener = listener
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._handshake_timeout_secs = handshake_timeout_secs if ssl_context is not None else None
        self._shed = shed
        self._loop = asyncio.get_running_loop()
        self._connecting: set[asyncio.Task[Any]] = set()
        self._reading = False
        self._closed = False
        listener.setblocking(False)
        self._resume()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._listener,)

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        if self._closed:
            return
        self._closed = True
        self._pause()
        self._listener.close()

    async def wait_closed(self) -> None:
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)

    def _resume(self) -> None:
        if not self._closed and not self._reading:
            self._loop.add_reader(self._listener.fileno(), self._accept_waiting)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._listener.fileno())
            self._reading = False

    def _accept_waiting(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FILES:
                    log.error("cannot accept connections: out of file descriptors or memory; pausing", extra={"error": str(exc)})
                    self._pause()
                    self._loop.call_later(PAUSE_WHEN_OUT_OF_FILES_SECS, self._resume)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while it waited in the queue
                raise
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._shed(sock):
                continue
            task = self._loop.create_task(self._connect(sock))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(
                self._factory, sock, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout_secs
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            # A TLS handshake that failed or timed out, or a peer that left: nothing was asked yet.
            log.debug("connection ended before its first request", extra={"error": str(exc)})
            sock.close()
        except Exception:
            log.exception("could not set up an accepted connection; closing it")
            sock.close()
