"""Structured JSON logs on stderr: one object per line, extra fields included, ready for shipping.

- Warnings and errors repeating the same message are throttled per message (a burst, then one a
  second); the next line let through says how many were ``suppressed``.
- The access log (``log.access_log``) is one JSON line per request; beyond
  ``log.access_log_max_per_sec`` lines a second the rest are counted, not written, and the next
  line written carries ``skipped``.
- ``DEBUG`` turns on the gateway's own detail (objects landed, registry reloads, peers); the
  libraries it uses stay at ``INFO`` so their chatter does not bury it.
- ``serve`` writes from a thread of its own (``BackgroundStreamHandler``): a reader of stderr that
  stops reading (a stalled log shipper, Docker's blocking log driver, a paused terminal) fills the
  pipe, and a write from the event loop would then stop every acknowledgement and health check.
  Lines beyond ``MAX_PENDING_LINES`` waiting are dropped, and the next line written says how many.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from gateway.edge.proxy import plain_address

if TYPE_CHECKING:  # every command configures logs; only a worker serves HTTP
    from aiohttp.abc import AbstractAccessLogger

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_QUIET_LIBRARIES = ("aiobotocore", "botocore", "urllib3", "asyncio", "grpc", "tritonclient", "moto")

ACCESS_LOGGER = "gateway.access"
THROTTLE_BURST = 10
THROTTLE_PER_SEC = 1.0
# Lines a stalled stderr may hold back before new ones are dropped (a few MiB at most).
MAX_PENDING_LINES = 10_000
# At exit, how long the last lines may take to reach a reader that has stopped reading.
EXIT_FLUSH_SECS = 5.0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class ThrottleFilter(logging.Filter):
    """Per message template: ``burst`` lines at once, then ``per_sec``; criticals always pass."""

    def __init__(self, burst: int = THROTTLE_BURST, per_sec: float = THROTTLE_PER_SEC, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._burst, self._rate, self._clock = burst, per_sec, clock
        self._buckets: dict[tuple[str, str], list[float]] = {}  # key -> [tokens, updated, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.CRITICAL:
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 10_000:  # messages are templates; this bounds a pathological caller
                self._buckets.clear()
            bucket = self._buckets[key] = [float(self._burst), now, 0]
        bucket[0] = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if bucket[0] < 1:
            bucket[2] += 1
            return False
        bucket[0] -= 1
        if bucket[2]:
            record.suppressed, bucket[2] = int(bucket[2]), 0
        return True


class BackgroundStreamHandler(logging.Handler):
    """Formats a record on the caller's thread and leaves the write to a thread of its own, so that a
    stream that blocks never blocks the caller; past ``max_pending`` lines waiting, drops and counts."""

    def __init__(self, stream, max_pending: int = MAX_PENDING_LINES) -> None:
        super().__init__()
        self.stream = stream
        self._max_pending = max_pending
        self._pending: collections.deque[str] = collections.deque()
        self._dropped = 0
        self._writing = False  # lines taken from the queue and not written yet
        self._wake = threading.Condition(threading.Lock())
        self._closed = False
        self._stalled = False  # a flush waited for the stream in vain
        self._thread = threading.Thread(target=self._write_forever, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._wake:
            if len(self._pending) >= self._max_pending:
                self._dropped += 1
                return
            self._pending.append(line)
            self._wake.notify_all()  # the writer, and not only a flush() waiting on the same condition

    def flush(self, timeout: float = EXIT_FLUSH_SECS) -> None:
        """Wait until every line taken so far is written, or ``timeout`` passed. Once a flush has
        waited in vain, the stream is taken as stalled and later ones do not wait (logging's exit
        flushes, then closes, and a close flushes too)."""
        deadline = time.monotonic() + (0.0 if self._stalled else timeout)
        with self._wake:
            while (self._pending or self._writing) and self._thread.is_alive():
                if time.monotonic() >= deadline:
                    self._stalled = True
                    return
                self._wake.wait(deadline - time.monotonic())

    def close(self) -> None:
        self.flush()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        super().close()

    def _write_forever(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                lines, self._pending = list(self._pending), collections.deque()
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            if dropped:
                lines.append(self._dropped_line(dropped))
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: nothing can be told
            with self._wake:
                self._writing = self._stalled = False
                self._wake.notify_all()

    def _dropped_line(self, dropped: int) -> str:
        record = logging.LogRecord(__name__, logging.WARNING, "", 0, "log lines dropped: stderr was not read fast enough", (), None)
        record.log_lines_dropped = dropped
        return self.format(record)


def configure(level: str, *, background: bool = False) -> None:
    """JSON lines on stderr at ``level``; ``background``: written by a thread of their own (``serve``)."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    if not ours or background != isinstance(ours[0], BackgroundStreamHandler):
        handler = BackgroundStreamHandler(sys.stderr) if background else logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ThrottleFilter())
        root.handlers[:] = [h for h in root.handlers if h not in ours] + [handler]
        for old in ours:
            old.close()
    set_level(level)


def set_level(level: str) -> None:
    """The gateway's level, and its libraries' (never more detailed than INFO)."""
    root = logging.getLogger()
    root.setLevel(level)
    quiet = max(logging.getLevelName(level), logging.INFO)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    # aiohttp's own access logger (its text format) stays off: ours writes JSON (access_logger_class).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)


def access_logger_class(settings: Callable[[], object]) -> type[AbstractAccessLogger]:
    """An aiohttp access logger that follows the live ``[log]`` section (SIGHUP turns it on or off)."""
    from aiohttp.abc import AbstractAccessLogger

    class JsonAccessLogger(AbstractAccessLogger):
        __slots__ = ()
        _window = [0.0, 0, 0]  # second it counts, lines written in it, lines skipped since the last written

        def log(self, request, response, time_secs: float) -> None:
            log_settings = settings().log
            if not log_settings.access_log:
                return
            window = self._window
            now = time.monotonic()
            if now - window[0] >= 1.0:
                window[0], window[1] = now, 0
            if window[1] >= log_settings.access_log_max_per_sec:
                window[2] += 1
                return
            window[1] += 1
            extra = {
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time_secs * 1000, 3),
                "bytes_in": request.content_length or 0,
                "bytes_out": response.body_length,
                "remote": plain_address(request.remote) if request.remote else None,
                "device_id": request.headers.get("X-Device-Id", "")[:128] or None,
            }
            if window[2]:
                extra["skipped"], window[2] = window[2], 0
            self.logger.info("request", extra=extra)

    JsonAccessLogger._window = [0.0, 0, 0]  # one window per class, i.e. per gateway
    return JsonAccessLogger
