"""What the device listener answers while an instance starts, before its gateway serves it.

Before anyone is answered, the retry ledger is caught up with every WAL (gateway/durable/
ledger_catch_up.py): after a crash that reads the WALs, and on a full disk it waits for room, as
long as an operator takes to free some. Meanwhile the listener is bound and answered from a thread
of its own, so that the host's watchdog probing ``/healthz`` sees an instance that is alive and
will serve by itself (a replacement would not free its disk, and the WAL volume goes with it), the
load balancer's ``/readyz`` sees 503 and sends nothing, and a device is told 503 with Retry-After
instead of finding its connection refused or never accepted. Each connection gets one answer and
is closed; the gateway takes over the same socket once started. The ops listener is answered the
same way, ``/metrics`` saying the instance is starting (gateway/ops/starting_metrics.py), so that a
scrape finds a start, not an instance that is down.

Only the standard library is imported here: the supervisor answers before any worker starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from gateway.edge.closing_answer import closing_answer
from gateway.ops.starting_metrics import StartingExposition

log = logging.getLogger(__name__)

HEAD_LIMIT_BYTES = 8 * 1024
HEAD_TIMEOUT_SECS = 5.0
# Reading what a client still sends after its answer, so that closing does not reset the
# connection before the client has read the answer.
LINGER_SECS = 1.0
MAX_CONNECTIONS = 256  # beyond this many at once, a connection is closed unanswered
# How long a stop waits for the connections accepted last to be made (milliseconds, but a TLS
# handshake may be under way: cancelled then) before the gateway takes over.
HANDOVER_SECS = 1.0

STARTING = "starting"
WAITING_FOR_ROOM = "waiting_for_room"
_MESSAGES = {
    STARTING: "the gateway is starting (its retry ledger is catching up with the WAL); try again shortly",
    WAITING_FOR_ROOM: "the gateway cannot start until its WAL's disk has room; another instance can take this request",
}


def answer(head: bytes, state: str, retry_after_secs: int) -> bytes:
    """The whole HTTP answer to a request whose head is ``head``, in ``state``: ``/healthz`` 200
    (alive), ``/readyz`` and everything else 503 with Retry-After."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    method = parts[0]
    path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
    if path == b"/healthz":
        status, body = 200, {"status": state}
    elif path == b"/readyz":
        status, body = 503, {"status": state}
    else:
        status, body = 503, {"error": "unavailable", "message": _MESSAGES[state]}
    retry_after = retry_after_secs if status == 503 else None
    return closing_answer(status, json.dumps(body).encode(), retry_after, head_only=method == b"HEAD")


class StartingAnswers:
    """Answers on ``listener`` (a copy of it: the instance's socket stays open) from a thread, until
    ``stop``, each request with ``respond(head, state)``; ``waiting_for_room(True)`` turns "starting"
    into "waiting_for_room"."""

    def __init__(self, listener: socket.socket, respond: Callable[[bytes, str], bytes], ssl_context=None, *, name: str = "device") -> None:
        self._listener = listener.dup()  # the server closes the socket it serves when it stops
        self._respond = respond
        self._ssl = ssl_context
        self._name = name
        self.state = STARTING
        self.answered = 0
        # Not the policy's loop (uvloop in a gateway): how ``_serve`` stops relies on this one's.
        self._loop = asyncio.SelectorEventLoop()
        self._stop = asyncio.Event()
        self._handlers: set[asyncio.Task] = set()
        self._transports: set[asyncio.BaseTransport] = set()  # every connection made and not lost yet
        self._thread = threading.Thread(target=self._run, name=f"starting-answers-{name}", daemon=True)

    def start(self) -> StartingAnswers:
        self._thread.start()
        return self

    @property
    def connections(self) -> int:
        """Connections accepted and not closed yet."""
        return len(self._handlers)

    def waiting_for_room(self, waiting: bool) -> None:
        self.state = WAITING_FOR_ROOM if waiting else STARTING

    def stop(self) -> None:
        """Stop answering (connections still being answered are closed); the thread has exited on return."""
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # its loop ended meanwhile (it could not serve the listener)
            self._thread.join()
        self._listener.close()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except Exception as exc:  # the start goes on unanswered, as it would without this
            log.error(f"cannot answer on the {self._name} listener while starting", extra={"error": f"{type(exc).__name__}: {exc}"})
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        server = await self._loop.create_server(
            self._connection, sock=self._listener, ssl=self._ssl,
            ssl_handshake_timeout=HEAD_TIMEOUT_SECS if self._ssl is not None else None,
        )
        await self._stop.wait()
        # Accept no more, but close the server only once the connections accepted last are made: in
        # asyncio 3.11 one whose transport is built after the close is dropped with its socket open,
        # and its client waits for an answer until a garbage collection finds it (over a minute, seen
        # in a start under load). Every connection is closed here; its handler then ends by itself.
        self._loop.remove_reader(self._listener.fileno())
        deadline = self._loop.time() + HANDOVER_SECS
        while (tasks := asyncio.all_tasks() - {asyncio.current_task()}) and self._loop.time() < deadline:
            for transport in list(self._transports):
                transport.abort()
            await asyncio.wait(tasks, timeout=deadline - self._loop.time(), return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:  # a TLS handshake still running: cancelled, it closes its socket
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        await asyncio.sleep(0)  # an abort closes its socket in the loop's next step

    def _connection(self) -> asyncio.StreamReaderProtocol:
        """What ``asyncio.start_server`` makes per connection, and its transport known once it is made."""
        return _TrackedConnection(self._transports, asyncio.StreamReader(limit=HEAD_LIMIT_BYTES), self._answer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        self._handlers.add(handler)
        try:
            if len(self._handlers) <= MAX_CONNECTIONS:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SECS)
                writer.write(self._respond(head, self.state))
                await writer.drain()
                self.answered += 1
                if writer.can_write_eof():
                    writer.write_eof()  # the client, reading until the end, closes its side now
                await asyncio.wait_for(_read_away(reader), LINGER_SECS)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError):
            pass  # a head too long, too slow or cut off, or a client gone: closed unanswered
        except asyncio.CancelledError:
            pass  # stopped: the gateway answers from now on
        finally:
            self._handlers.discard(handler)
            writer.close()


class _TrackedConnection(asyncio.StreamReaderProtocol):
    def __init__(self, transports: set[asyncio.BaseTransport], reader: asyncio.StreamReader, handler) -> None:
        super().__init__(reader, handler)
        self._transports = transports
        self._made: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = transport
        self._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transports.discard(self._made)
        super().connection_lost(exc)


async def _read_away(reader: asyncio.StreamReader) -> None:
    while await reader.read(64 * 1024):
        pass


class WhileStarting:
    """Every listener of the instance answered while it starts: the device listener, and the ops
    listener where there is one."""

    def __init__(self, answers: list[StartingAnswers]) -> None:
        self.answers = answers

    def waiting_for_room(self, waiting: bool) -> None:
        for answers in self.answers:
            answers.waiting_for_room(waiting)

    def stop(self) -> None:
        for answers in self.answers:
            answers.stop()


def starting_answers(listener: socket.socket, settings, ops_listener: socket.socket | None = None) -> WhileStarting:
    """``StartingAnswers`` on the instance's device ``listener`` (over TLS where the gateway serves
    TLS) and on its ``ops_listener`` where given, started."""
    context = None
    if settings.tls.enabled:
        from gateway.edge.tls import server_context

        context = server_context(settings.tls)
    answers = [StartingAnswers(listener, partial(answer, retry_after_secs=settings.wal.retry_after_secs), context).start()]
    if ops_listener is not None:
        answers.append(StartingAnswers(ops_listener, StartingExposition().answer, name="ops").start())
    return WhileStarting(answers)


@contextmanager
def answering_while_starting(listener: socket.socket, settings, ops_listener: socket.socket | None = None) -> Iterator[WhileStarting]:
    """``starting_answers`` for the duration of the block."""
    answers = starting_answers(listener, settings, ops_listener)
    try:
        yield answers
    finally:
        answers.stop()


class AnswersOnceLocked:
    """For a gateway alone, which binds its listeners itself: bound, and answering, from the moment
    its start holds the instance lock (``locked``, the gateway's ``instance_locked`` callback)
    until ``stop``; ``waiting_for_room`` is the gateway's callback of that name. Binding after the
    instance lock keeps a predecessor that is still exiting (its port and lock held by a thread
    stuck in the kernel) a wait for the lock, not a refused start."""

    def __init__(self, settings, bind: Callable[[], socket.socket], bind_ops: Callable[[], socket.socket] | None = None) -> None:
        self._settings = settings
        self._bind = bind
        self._bind_ops = bind_ops
        self.listener: socket.socket | None = None  # what the gateway serves on, once bound here
        self.ops_listener: socket.socket | None = None  # what its ops listener serves on, likewise
        self._answers: WhileStarting | None = None

    def locked(self) -> None:
        if self._answers is None:
            self.listener = self._bind()
            if self._bind_ops is not None:
                self.ops_listener = self._bind_ops()
            self._answers = starting_answers(self.listener, self._settings, self.ops_listener)

    def waiting_for_room(self, waiting: bool) -> None:
        if self._answers is not None:
            self._answers.waiting_for_room(waiting)

    def stop(self) -> None:
        if self._answers is not None:
            self._answers.stop()

    def close(self) -> None:
        """Close what was bound (a start that failed; a started gateway's servers close their own)."""
        for sock in (self.listener, self.ops_listener):
            if sock is not None:
                sock.close()
