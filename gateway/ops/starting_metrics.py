"""What the ops listener answers while an instance starts, before any worker serves ``/metrics``.

A start catches the retry ledger up with every WAL, which after a machine restart reads all of them,
and on a full disk waits for room as long as an operator takes to free some. A scrape that times
out meanwhile reads as an instance that is down; this one answers ``/metrics`` with what a start
knows, so an alert can tell a start waiting for disk room from a crash, and how long it has taken:

    edge_gateway_starting 1
    edge_gateway_start_waiting_for_room 1
    edge_gateway_start_seconds 42.5

Once serving, every worker exports ``edge_gateway_starting 0``. Only the standard library is
imported here: the supervisor answers before any worker starts.
"""

from __future__ import annotations

import platform
import time

from gateway.edge.closing_answer import closing_answer
from gateway.ops.build import version

WAITING_FOR_ROOM = "waiting_for_room"  # the state gateway/edge/while_starting.py names so
# The Prometheus text format's content type, as prometheus_client's CONTENT_TYPE_LATEST.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STARTING_HELP = "1 while the instance starts (its retry ledger catching up with the WALs) and serves no device yet"
WAITING_HELP = "1 while the start waits for room on the WAL's disk (free space there and it goes on by itself)"


class StartingExposition:
    """The exposition of a start that took the instance lock at ``began`` (``time.monotonic()``; now if not given)."""

    def __init__(self, began: float | None = None) -> None:
        self.began = time.monotonic() if began is None else began
        self._build = f'edge_gateway_build_info{{version="{_escaped(version())}",python="{platform.python_version()}"}} 1.0\n'

    def text(self, state: str) -> bytes:
        waiting = 1.0 if state == WAITING_FOR_ROOM else 0.0
        return "".join((
            "# HELP edge_gateway_build_info Always 1; the running version in its labels\n",
            "# TYPE edge_gateway_build_info gauge\n",
            self._build,
            f"# HELP edge_gateway_starting {STARTING_HELP}\n",
            "# TYPE edge_gateway_starting gauge\n",
            "edge_gateway_starting 1.0\n",
            f"# HELP edge_gateway_start_waiting_for_room {WAITING_HELP}\n",
            "# TYPE edge_gateway_start_waiting_for_room gauge\n",
            f"edge_gateway_start_waiting_for_room {waiting}\n",
            "# HELP edge_gateway_start_seconds Seconds since this start took the instance lock and began catching its retry ledger up\n",
            "# TYPE edge_gateway_start_seconds gauge\n",
            f"edge_gateway_start_seconds {time.monotonic() - self.began:.3f}\n",
        )).encode()

    def answer(self, head: bytes, state: str) -> bytes:
        """The whole HTTP answer to a request whose head is ``head``: ``/metrics`` 200, anything else
        404, as the ops listener answers once started."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        method = parts[0]
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        head_only = method == b"HEAD"
        if path == b"/metrics" and method in (b"GET", b"HEAD"):
            return closing_answer(200, self.text(state), head_only=head_only, content_type=CONTENT_TYPE)
        return closing_answer(404, b"404: Not Found", head_only=head_only, content_type="text/plain; charset=utf-8")


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
