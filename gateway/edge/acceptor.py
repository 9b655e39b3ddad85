"""Accepting connections: everything the kernel has queued, in one turn of the event loop.

uvloop's server accepts one connection each time the loop polls its sockets (strace: one
``accept4`` per ``epoll_pwait``, never one that finds the queue empty). A busy worker turns every
10-40 ms, so it accepted 25-100 connections a second: when a few hundred arrived at once (a load
balancer reconnecting, a fleet coming back after a ``Retry-After``) they waited up to 0.6 s in the
kernel's queue before the gateway saw them, and even a refusal reached them that late. The
``Acceptor`` takes every waiting connection each time the listener is readable (up to
``ACCEPT_BURST``), so a connection waits at most one turn; the ``ConnectionGuard`` still decides
each one (connections.py), with the kernel's queue depth as it is behind that connection. Where
several workers share the listener, each takes only its share of what waits (accept_share.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from gateway.edge.accept_share import SiblingConnections

log = logging.getLogger(__name__)

# Connections accepted per wake-up at most, so that a flood of them cannot hold the loop for long.
ACCEPT_BURST = 256
# Out of file descriptors: accepting pauses this long, so the loop does not spin on a queue it cannot take.
PAUSE_WHEN_OUT_OF_FILES_SECS = 0.1
# ... or only this long, when an idle connection was closed to free one (its descriptor is released
# as its transport finishes closing, a turn of the loop later).
PAUSE_AFTER_MAKING_ROOM_SECS = 0.005
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A worker that left connections to its siblings looks again this long later and takes its share of
# what waits then; what still waits the next time, it takes whole.
LEFT_FOR_SIBLINGS_SECS = 0.01


class AcceptQueue:
    """The depth of a listening socket's accept queue: connections the kernel has completed that this
    process has not accepted yet (Linux reports it in ``tcp_info.tcpi_unacked`` for a listener)."""

    _UNACKED = struct.Struct("=I")
    _OFFSET = 24  # after 8 one-byte fields and rto, ato, snd_mss, rcv_mss

    def __init__(self, listener: Any) -> None:
        self._listener = listener
        self._supported = hasattr(socket, "TCP_INFO") and listener.family in (socket.AF_INET, socket.AF_INET6)

    def depth(self) -> int:
        if not self._supported:
            return 0
        try:
            info = self._listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        except OSError:
            self._supported = False
            return 0
        return self._UNACKED.unpack_from(info, self._OFFSET)[0]

    def someone_waits(self) -> bool:
        """Whether a connection waits to be accepted (taken as yes where the depth cannot be read)."""
        return self.depth() > 0 or not self._supported


class Acceptor:
    """Serves ``protocol_factory`` on ``listener``; ``shed(sock)`` may answer and close a connection
    before any transport is built for it (it returns True when it did). With ``siblings`` (other
    workers on the same listener) it takes its share of the waiting connections, counting the
    ``held()`` connections it serves already; while ``serving()`` is False (its WAL has no room) it
    leaves new connections to them and takes only what they leave. Out of file descriptors, it asks
    ``make_room()`` to close an idle connection (True when it did) before it pauses."""

    def __init__(
        self,
        listener: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_secs: float | None = None,
        shed: Callable[[socket.socket], bool] = lambda sock: False,
        make_room: Callable[[], bool] = lambda: False,
        siblings: SiblingConnections | None = None,
        held: Callable[[], int] = lambda: 0,
        serving: Callable[[], bool] = lambda: True,
    ) -> None:
        self._listener = listener
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._handshake_timeout_secs = handshake_timeout_secs if ssl_context is not None else None
        self._shed = shed
        self._make_room = make_room
        self._loop = asyncio.get_running_loop()
        self._connecting: set[asyncio.Task[Any]] = set()
        self._siblings = siblings
        self._held = held
        self._serving = serving
        self.queue = AcceptQueue(listener)  # also read by the ConnectionGuard, to shed when it is deep
        self._left_for_siblings: asyncio.TimerHandle | None = None
        self._left_once = False  # connections were left to the siblings and the timer fired once since
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
        if self._left_for_siblings is not None:
            self._left_for_siblings.cancel()
        if self._siblings is not None:
            self._siblings.close()  # they leave nothing waiting for this worker any more
        self._listener.close()

    def publish_held(self) -> None:
        """Tell the siblings how many connections this worker holds (as one opens or closes)."""
        if self._siblings is not None and not self._closed:
            if self._serving():
                self._siblings.publish(self._held() + len(self._connecting))
            else:
                self._siblings.stop_accepting()  # its siblings leave it nothing while it has no room

    def over_share(self) -> bool:
        """Whether this worker holds more than its share of its siblings' connections."""
        return self._siblings is not None and not self._closed and self._siblings.over_share(self._held() + len(self._connecting))

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

    def _quota(self) -> int:
        if self._siblings is None:
            return ACCEPT_BURST
        if not self._serving():
            return 0  # a sibling with room takes them; what none takes is taken a little later
        waiting = max(1, self.queue.depth())  # woken, so at least one waits (0: the kernel does not say)
        return min(ACCEPT_BURST, self._siblings.quota(self._held() + len(self._connecting), waiting))

    def _take_what_siblings_left(self) -> None:
        self._left_for_siblings = None
        if self._closed:
            return
        self._resume()
        if self._left_once:  # still waiting a second time: no sibling is taking them
            self._left_once = False
            self._accept_waiting(quota=ACCEPT_BURST)
        else:
            # Connections that arrived while every worker waited out its timer: the first to look again
            # takes its share only; they are everyone's, not left over.
            self._left_once = True
            self._accept_waiting()

    def _accept_waiting(self, quota: int | None = None) -> None:
        quota = self._quota() if quota is None else quota
        try:
            self._accept(quota)
        finally:
            self.publish_held()

    def _accept(self, quota: int) -> None:
        for _ in range(quota):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                self._left_once = False  # nothing waits: nothing was left
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FILES:
                    self._out_of_files(exc)
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
            task.add_done_callback(self._connected)
        if quota < ACCEPT_BURST:
            # The rest is the siblings' share: stop being woken for it (a woken reader that takes
            # nothing would spin), and take what they leave.
            self._pause()
            if self._left_for_siblings is None:
                self._left_for_siblings = self._loop.call_later(LEFT_FOR_SIBLINGS_SECS, self._take_what_siblings_left)

    def _out_of_files(self, exc: OSError) -> None:
        self._pause()
        # accept() fails so at the limit even when nobody waits: close an idle connection only for one that does.
        if exc.errno == errno.EMFILE and self.queue.someone_waits() and self._make_room():
            # This process's own limit, and a connection that was waiting idle gave its descriptor up.
            log.warning("out of file descriptors: closed an idle connection to accept a new one", extra={"error": str(exc)})
            self._loop.call_later(PAUSE_AFTER_MAKING_ROOM_SECS, self._resume)
            return
        log.error("cannot accept connections: out of file descriptors or memory; pausing", extra={"error": str(exc)})
        self._loop.call_later(PAUSE_WHEN_OUT_OF_FILES_SECS, self._resume)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        self.publish_held()

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
