"""Connections on the device listener: a cap, slow-client timeouts, and a maximum age.

aiohttp has no header-read timeout and its keep-alive timeout is fixed at start, so each accepted
connection's protocol is wrapped in ``_GuardedProtocol``, which keeps one timer per connection:

    accepted / next byte after idle -> header timer (header_timeout_secs): complete headers or close
    request headers complete        -> no timer (the body has its own deadlines, see body_deadline)
    response done                   -> idle timer (idle_timeout_secs): a next request or close,
                                       or, if part of a next request is already buffered (pipelined),
                                       the header timer counted from that part's first byte

``_Framing`` tells where a request ends in the byte stream (headers, then Content-Length bytes or a
chunked body), so bytes pipelined behind a complete request cannot pass for an idle connection.

A client that shuts down its sending side right after a complete request (``shutdown(SHUT_WR)``)
is still answered: the transport stays open for the answers to every complete request, then
closes. Its records land either way; unanswered, a device would resend the same body for ever. A
request whose body that EOF cut short is answered 400 (malformed) the same way, as is one whose
chunked framing the parser refused midway (``_Framing.body_refused``).

Beyond ``max_connections`` (or what the open-files limit leaves for connections, if that is lower:
gateway/open_files.py) a connection is answered 503 and closed at once, so a flood of sockets cannot
exhaust file descriptors; but first the connection that has waited longest for its client (one that
never sent a byte, or a kept-alive one between requests) is closed to make room, as nginx reuses its
idle keep-alive connections, so sockets opened and left silent or idle cannot keep devices out. One
source address holds at most ``max_connections_per_source``. A process that accepts late (its event
loop is busy) sheds at accept: while more than ``max_accept_queue`` connections wait in the kernel's
accept queue, the one being accepted gets 503 at once, so no request waits seconds where no limit
can count it (connections are accepted by ``Acceptor``, acceptor.py, all that wait at each wake-up).
After ``max_age_secs`` (with jitter) a response carries ``Connection: close``: behind an ALB,
kept-alive connections would otherwise stay pinned to the instances that were up first. Within an
instance a worker holding more than its share of its siblings' connections (one restarted, or
started later, holds none) closes one after an answer every ``REBALANCE_INTERVAL_SECS`` until it
does not (counted as ``edge_gateway_connections_closed_total{reason="rebalance"}``). All settings
are read live, so SIGHUP changes them.

A source that would be refused anyway (it holds its share of in-flight requests, or its failed
authentications put it in deficit) is answered at accept, from a fixed response, without building a
request; and a source that keeps coming back while refused gets its answers late (tarpit.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.errors import ApiError, MalformedBody, RequestTimeout, Unavailable
from gateway.edge.accept_share import SiblingConnections
from gateway.edge.closing_answer import closing_answer
from gateway.edge.acceptor import AcceptQueue, Acceptor
from gateway.edge.proxy import plain_address
from gateway.edge.settings import ConnectionSettings
from gateway.edge.tarpit import Tarpit
from gateway.listeners import bind_listener
from gateway.open_files import connection_budget
from gateway.responses import malformed_request, parser_refusal

log = logging.getLogger(__name__)

# How often a worker over its share of its siblings' connections closes one (after an answer).
REBALANCE_INTERVAL_SECS = 0.25
_REFUSAL_BODY = b'{"error":"unavailable","message":"the gateway has too many open connections; retry"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


def fixed_response(error: ApiError) -> bytes:
    """The whole HTTP/1.1 answer to a refusal, closing the connection (the API's JSON shape)."""
    return closing_answer(error.status, orjson.dumps({"error": error.code, "message": error.message}), error.retry_after_secs)


HEADER_TIMEOUT_JITTER = 0.25


@functools.lru_cache(maxsize=16)
def _overloaded(retry_after_secs: int) -> bytes:
    return fixed_response(
        Unavailable("the gateway is overloaded (connections are waiting to be accepted); retry later", retry_after_secs=retry_after_secs)
    )


@dataclass(slots=True)
class _Conn:
    transport: asyncio.Transport
    created: float
    max_age: float  # 0: no limit
    source: str
    active: int = 0
    idle: bool = False  # between requests: the next byte starts the header timer
    spoke: bool = False  # has sent at least one byte
    timer: asyncio.TimerHandle | None = None
    header_since: float | None = None  # when buffered bytes of a not yet complete request began
    parsed: int = 0  # requests whose headers were parsed
    answered: int = 0  # requests whose handler returned
    half_closed: bool = False  # the client sent EOF after complete requests: answer them, then close


class ConnectionGuard:
    def __init__(
        self,
        settings: Callable[[], ConnectionSettings],
        *,
        on_close: Callable[[str], None] = lambda reason: None,
        shared_source: Callable[[str], bool] = lambda address: False,
        source_refusal: Callable[[str], ApiError | None] = lambda address: None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        file_budget: int | None = None,
        overload_retry_after: Callable[[], int] = lambda: 1,
    ) -> None:
        self._settings = settings
        self._overload_retry_after = overload_retry_after  # spread like the admission's refusals
        # Connections this process's open-files limit leaves room for, whatever max_connections says.
        self.file_budget = connection_budget() if file_budget is None else file_budget
        self._on_close = on_close
        self._shared_source = shared_source
        self._source_refusal = source_refusal
        self.tarpit = Tarpit(lambda: settings().refusal_delay_secs, clock=clock)
        self._rng = rng
        self._clock = clock
        self._conns: dict[Any, _Conn] = {}  # keyed by aiohttp's protocol (what request.protocol is), oldest first
        self._per_source: dict[str, int] = {}
        # Connections waiting for their client's next byte (silent since accepted, or kept alive
        # between requests), in the order they began to wait: the first makes room at the cap.
        self._waiting: dict[Any, None] = {}
        self._accept_queue: AcceptQueue | None = None
        # Called as a connection opens or closes (the Acceptor tells sibling workers how many it holds).
        self.count_changed: Callable[[], None] = lambda: None
        # Whether this worker holds more than its share of its siblings' connections (the Acceptor's).
        self.over_share: Callable[[], bool] = lambda: False
        self._last_rebalance = -REBALANCE_INTERVAL_SECS

    @property
    def open(self) -> int:
        return len(self._conns)

    def max_open(self) -> int:
        """The connections this worker holds at most: max_connections, unless open files allow fewer."""
        return min(self._settings().max_connections, self.file_budget)

    def watch_accept_queue(self, queue: AcceptQueue) -> None:
        """Read how many connections wait in the listener's accept ``queue`` as each one is accepted."""
        self._accept_queue = queue

    def shed_queued(self, sock: socket.socket) -> bool:
        """As ``sock`` is accepted, before any transport: 503 and close when more than
        ``max_accept_queue`` connections still wait in the kernel's queue behind it."""
        s = self._settings()
        if self._accept_queue is None or not s.max_accept_queue or self._accept_queue.depth() <= s.max_accept_queue:
            return False
        # Connections are waiting for this process to get to them: it is behind, and each one
        # accepted now would wait on top. Shed cheaply so the queue (and every wait in it) stays short.
        self._on_close("accept_queue")
        try:
            sock.send(_overloaded(self._overload_retry_after()))
        except OSError:
            pass  # the client is gone already
        sock.close()
        return True

    def protocol_factory(self, server: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        # aiohttp's protocol is built only for an accepted connection: a refusal costs no request handler.
        return lambda: _GuardedProtocol(self, server)

    # -- called by the protocol wrapper -----------------------------------------------------------

    def _accept(self, make_inner: Callable[[], Any], transport: asyncio.Transport) -> Any:
        """aiohttp's protocol for an accepted connection, or None when it was refused (and answered)."""
        s = self._settings()
        peer = transport.get_extra_info("peername")
        source = plain_address(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        shared = self._shared_source(source)
        if not shared and (refusal := self._source_refusal(source)) is not None:
            return self._refuse_source(transport, source, refusal)
        if self._per_source.get(source, 0) >= s.max_connections_per_source and not shared:
            return self._refuse(transport, "connection_cap_per_source")
        if len(self._conns) >= self.max_open() and not self.make_room():
            return self._refuse(transport, "connection_cap")
        age = s.max_age_secs * (1 + s.max_age_jitter * (2 * self._rng() - 1)) if s.max_age_secs else 0.0
        inner = make_inner()
        conn = self._conns[inner] = _Conn(transport, self._clock(), age, source)
        self._waiting[inner] = None
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self.count_changed()
        # Up to a quarter early: connections opened together (a reconnect storm, a flood of silent
        # sockets) then time out spread over seconds rather than all in one turn of the loop.
        self._arm(conn, s.header_timeout_secs * (1 - HEADER_TIMEOUT_JITTER * self._rng()), "header_timeout")
        return inner

    def _refuse(self, transport: asyncio.Transport, reason: str, answer: bytes | None = None) -> None:
        self._on_close(reason)
        transport.write(answer or _REFUSAL)
        transport.close()

    def _refuse_source(self, transport: asyncio.Transport, source: str, refusal: ApiError) -> None:
        """Answer a source that would be refused anyway without building a request (late, if it insists)."""
        self._on_close("source_refused")
        answer = fixed_response(refusal)

        def answer_and_close() -> None:
            if not transport.is_closing():
                transport.write(answer)
                transport.close()

        delay = self.tarpit.delay(source, refusal.retry_after_secs or 1)
        if delay:
            transport.pause_reading()
            self.tarpit.later(delay, answer_and_close)
        else:
            answer_and_close()

    def make_room(self) -> bool:
        """Close the connection that has waited longest for its client's next byte: one that never
        sent any, or a kept-alive one between requests; False when every one is inside a request."""
        # The first in waiting order: a device that has just connected, or is between two requests
        # of a burst, has waited a moment only.
        longest = next((inner for inner in self._waiting if not self._conns[inner].transport.is_closing()), None)
        if longest is None:
            return False
        conn = self._conns[longest]
        self._on_close("idle_preempted" if conn.spoke else "silent_preempted")
        conn.transport.close()  # a client may close a kept-alive connection at any time, and so may we
        self._lost(longest)
        return True

    def _data(self, inner: Any, conn: _Conn) -> None:
        if conn.idle or not conn.spoke:
            self._waiting.pop(inner, None)
        conn.spoke = True
        if conn.idle:
            conn.idle = False
            self._arm(conn, self._settings().header_timeout_secs, "header_timeout")

    def _header_begins(self, conn: _Conn) -> None:
        if conn.header_since is None:
            conn.header_since = self._clock()

    def _lost(self, inner: Any) -> None:
        conn = self._conns.pop(inner, None)
        if conn is None:
            return
        self._waiting.pop(inner, None)
        self.count_changed()
        if conn.timer is not None:
            conn.timer.cancel()
        left = self._per_source.get(conn.source, 1) - 1
        if left > 0:
            self._per_source[conn.source] = left
        else:
            self._per_source.pop(conn.source, None)

    def _arm(self, conn: _Conn, delay: float, reason: str) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = asyncio.get_running_loop().call_later(delay, self._expire, conn, reason)

    def _expire(self, conn: _Conn, reason: str) -> None:
        conn.timer = None
        if conn.active == 0 and not conn.transport.is_closing():
            self._on_close(reason)
            conn.transport.close()

    # -- the middleware: request start and end ----------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        conn = self._conns.get(request.protocol)
        if conn is None:  # a listener without the guard (tests building the app alone)
            return await handler(request)
        conn.active += 1
        conn.idle = False
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        try:
            response = await handler(request)
            if conn.half_closed and conn.parsed <= conn.answered + 1:
                response.force_close()  # the last answer the client is waiting for
            if response.status in (429, 503) and not self._shared_source(conn.source):
                # Asked again before its Retry-After was over: this source's answers come late.
                retry_after = response.headers.get("Retry-After", "1")
                delay = self.tarpit.delay(conn.source, int(retry_after) if retry_after.isdigit() else 1)
                if delay:
                    await self.tarpit.hold(delay)
            if response.status == RequestTimeout.status:
                response.force_close()  # the rest of the body is not worth waiting for
            elif conn.max_age and self._clock() - conn.created > conn.max_age:
                self._on_close("max_age")
                response.force_close()
            elif response.keep_alive is not False and self._rebalance_due():  # not one closing anyway
                self._on_close("rebalance")
                response.force_close()
            if request.content.exception() is not None:
                # Last, after any hold: the body was refused (cut short, or its framing broke) while
                # the request was here. Nothing after it on this connection can be trusted, and
                # aiohttp, left to read the rest of it after the answer, would meet the refusal
                # again and log it as an unhandled exception.
                request.content.feed_eof()
                response.force_close()
            return response
        finally:
            conn.active -= 1
            conn.answered += 1
            if conn.active == 0:
                self._after_response(request.protocol, conn)

    def _rebalance_due(self) -> bool:
        """Whether to close this answer's connection, its client reconnecting to a sibling with fewer:
        while this worker holds more than its share, one connection per ``REBALANCE_INTERVAL_SECS``
        (a stalled sibling that takes none costs its clients a reconnection now and then, no more)."""
        now = self._clock()
        if now - self._last_rebalance < REBALANCE_INTERVAL_SECS or not self.over_share():
            return False
        self._last_rebalance = now
        return True

    def _answers_after_eof(self, conn: _Conn) -> bool:
        """The client sent EOF: keep the connection open to answer the requests it sent, if any (one
        whose body was cut short by the EOF is answered 400).

        Not over TLS: its transport closes at EOF whatever the protocol says (and warns if asked not to).
        """
        if conn.transport.get_extra_info("sslcontext") is not None:
            return False
        if conn.active or conn.parsed > conn.answered:
            conn.half_closed = True
            return True
        return False

    def _after_response(self, inner: Any, conn: _Conn) -> None:
        s = self._settings()
        if conn.half_closed and conn.parsed <= conn.answered:
            # Nothing more can come: an answer that did not close it (a handler that raised) still must.
            self._arm(conn, s.header_timeout_secs, "header_timeout")
        elif conn.header_since is None:
            conn.idle = True
            self._waiting[inner] = None
            self._arm(conn, s.idle_timeout_secs, "idle_timeout")
        else:
            # Part of a pipelined request is waiting: its header deadline runs from its first byte.
            left = s.header_timeout_secs - (self._clock() - conn.header_since)
            self._arm(conn, max(0.0, left), "header_timeout")


class _GuardedProtocol(asyncio.Protocol):
    """Delegates to aiohttp's protocol; tells the guard when a connection opens, speaks, and closes."""

    __slots__ = ("_guard", "_make_inner", "_inner", "_accepted", "_framing")

    def __init__(self, guard: ConnectionGuard, make_inner: Callable[[], Any]) -> None:
        self._guard = guard
        self._make_inner = make_inner
        self._inner: Any = None
        self._accepted = False
        self._framing = _Framing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner = self._guard._accept(self._make_inner, transport)  # type: ignore[arg-type]
        self._accepted = self._inner is not None
        if self._accepted:
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._accepted:
            return
        inner, guard = self._inner, self._guard
        conn = guard._conns.get(inner)
        if conn is None:
            inner.data_received(data)
            return
        guard._data(inner, conn)
        framing = self._framing
        for piece, starts_request in framing.pieces(data):
            if starts_request:
                guard._header_begins(conn)
            parsed = getattr(inner, "_request_count", 0)
            inner.data_received(piece)
            if getattr(inner, "_request_count", 0) != parsed and inner._messages:
                message, payload = inner._messages[-1]
                if not starts_request and (refusal := getattr(message, "exc", None)) is not None:
                    # The parser refused a chunk of the body being read, and queued its refusal as a
                    # next request: the body's reader would wait for bytes that never come (408).
                    framing.body_refused(malformed_request(getattr(refusal, "message", None) or str(refusal)))
                conn.header_since = None
                conn.parsed += 1
                framing.request_parsed(message, payload)

    def eof_received(self) -> bool | None:
        if not self._accepted:
            return None
        conn = self._guard._conns.get(self._inner)
        if conn is not None:
            between = self._framing.between_requests()
            if self._guard._answers_after_eof(conn):
                if not between:  # the body being read will never be whole: its reader fails now
                    self._framing.body_refused(MalformedBody("the body ended before its declared length"))
                return True  # the transport stays open for writing; the last answer closes it
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._accepted:
            self._guard._lost(self._inner)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._accepted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._accepted:
            self._inner.resume_writing()


class _Framing:
    """Where the request being received ends, from the bytes fed to aiohttp's parser.

    Input is cut into pieces at each end of headers (``\\r\\n\\r\\n``) and at the end of a
    Content-Length body, so after each piece the parser is known to be between requests or not.
    """

    __slots__ = ("_body_left", "_chunked", "_payload")

    def __init__(self) -> None:
        self._body_left = 0  # Content-Length bytes of the current request still to come
        self._chunked = False  # the current request's body is chunked and has not ended yet
        self._payload = None  # the payload of the last request parsed, chunked or not

    def between_requests(self) -> bool:
        if self._chunked and self._payload.is_eof():
            self._chunked = False
        return self._body_left == 0 and not self._chunked

    def request_parsed(self, message: Any, payload: Any) -> None:
        self._payload = payload
        self._chunked = bool(getattr(message, "chunked", False))
        length = "0" if self._chunked else getattr(message, "headers", {}).get("Content-Length", "0")
        self._body_left = int(length) if length.isascii() and length.isdigit() else 0

    def body_refused(self, error: Exception) -> None:
        """The body being received cannot be whole (the parser refused it, or the client's EOF cut it):
        its reader fails with ``error`` at once."""
        if self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(error)

    def pieces(self, data: bytes) -> Iterator[tuple[bytes, bool]]:
        """``data`` cut where a request's headers or body end; each piece says if it starts a request."""
        start = 0
        while start < len(data):
            between = self.between_requests()
            if self._body_left:
                end = min(len(data), start + self._body_left)
                self._body_left -= end - start
            else:
                found = data.find(b"\r\n\r\n", start)
                end = len(data) if found < 0 else found + 4
            yield (data[start:end] if start or end < len(data) else data), between
            start = end


class MalformedRequestLogs(logging.Filter):
    """aiohttp logs every unparseable request at ERROR with a traceback: anyone could fill the log.

    Installed on the ``aiohttp.server`` logger, it turns client errors (a 4xx from the HTTP parser)
    into one WARNING line without a traceback, at most ``per_second`` a second, counting the rest.
    """

    def __init__(self, per_second: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._per_second = per_second
        self._clock = clock
        self._budget = per_second
        self._updated = clock()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 0) < 500:
            return True
        now = self._clock()
        self._budget = min(self._per_second, self._budget + (now - self._updated) * self._per_second)
        self._updated = now
        if self._budget < 1:
            self.suppressed += 1
            return False
        self._budget -= 1
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "malformed request refused (%d): %s", (exc.code, str(exc.message).splitlines()[0][:200])
        record.exc_info = record.exc_text = None
        if self.suppressed:
            record.msg += " (%d more not logged)"
            record.args = (*record.args, self.suppressed)
            self.suppressed = 0
        return True


_MALFORMED_LOGS = MalformedRequestLogs()


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a ``ConnectionGuard`` (and a TLS handshake deadline)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        handshake_timeout_secs: float,
        sock: socket.socket | None = None,
        siblings: SiblingConnections | None = None,
        serving: Callable[[], bool] = lambda: True,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._guard = guard
        self._handshake_timeout_secs = handshake_timeout_secs
        self._sock = sock  # a socket the supervisor bound for all its workers
        self._siblings = siblings  # the other workers on that socket
        self._serving = serving  # False while this worker's WAL has no room

    async def start(self) -> None:
        server_log = logging.getLogger("aiohttp.server")
        if _MALFORMED_LOGS not in server_log.filters:
            server_log.addFilter(_MALFORMED_LOGS)
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        if self._sock is not None:
            listener = self._sock  # bound by the supervisor for every worker; the site closes its own copy
        else:
            listener = bind_listener(self._host or "0.0.0.0", self._port, self._backlog)
        self._server = Acceptor(  # type: ignore[assignment]  # offers what the site uses of a server
            listener,
            self._guard.protocol_factory(_request_handlers(server)),
            ssl_context=self._ssl_context,
            handshake_timeout_secs=self._handshake_timeout_secs,
            shed=self._guard.shed_queued,
            make_room=self._guard.make_room,
            siblings=self._siblings,
            held=lambda: self._guard.open,
            serving=self._serving,
        )
        self._guard.watch_accept_queue(self._server.queue)
        self._guard.count_changed = self._server.publish_held
        self._guard.over_share = self._server.over_share
        self._bound_port = listener.getsockname()[1]


class _JsonRefusingRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, answering a request its HTTP parser refuses in the
    device API's JSON; everything else (logging the refusal included) is aiohttp's."""

    __slots__ = ()

    def handle_error(self, request, status=500, exc=None, message=None):
        response = super().handle_error(request, status, exc, message)
        return parser_refusal(exc, message) if status == 400 else response


def _request_handlers(server: web.Server) -> Callable[[], RequestHandler]:
    # What calling the server does, with the subclass, built from the arguments the server keeps.
    return lambda: _JsonRefusingRequestHandler(server, loop=server._loop, **server._kwargs)


class BodyDeadline:
    """``async with BodyDeadline(s): ... deadline.progress(n)`` raises ``RequestTimeout`` on a slow body.

    Slow means: past ``body_timeout_secs`` in all, a pause longer than ``body_idle_timeout_secs``, or,
    after ``body_rate_grace_secs``, fewer than ``min_body_bytes_per_sec`` on average.
    """

    __slots__ = ("_loop", "_started", "_until", "_idle", "_cm", "_received", "_rate", "_grace")

    def __init__(self, settings: ConnectionSettings) -> None:
        self._loop = asyncio.get_running_loop()
        now = self._started = self._loop.time()
        self._until = now + settings.body_timeout_secs
        self._idle = settings.body_idle_timeout_secs
        self._rate = settings.min_body_bytes_per_sec
        self._grace = settings.body_rate_grace_secs
        self._received = 0
        self._cm = asyncio.timeout_at(self._next_deadline(now))

    def _next_deadline(self, now: float) -> float:
        deadline = min(self._until, now + self._idle)
        if self._rate > 0:
            # When the average rate would fall below the minimum if nothing more arrived.
            deadline = min(deadline, max(self._started + self._grace, self._started + self._received / self._rate))
        return deadline

    def progress(self, nbytes: int = 0) -> None:
        self._received += nbytes
        self._cm.reschedule(self._next_deadline(self._loop.time()))

    async def __aenter__(self) -> BodyDeadline:
        await self._cm.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool | None:
        try:
            return await self._cm.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if self._cm.expired():
                raise RequestTimeout("the request body arrived too slowly; the connection is closed") from None
            raise
