"""How many files a ``serve`` process may hold open, and how many of them its connections may take.

A shell's soft limit is often 1,024 while ``connections.max_connections`` allows 4,096 per worker:
kept-alive connections would then take every descriptor, new devices could not even be accepted,
and a WAL segment or a spooled body could not be opened. So each process raises its soft limit to
its hard limit at start (as the Go runtime and HAProxy do), and a worker holds at most
``connection_budget()`` connections: what the limit leaves after its own files.

Only the standard library is imported here: the supervisor uses it before its children start.
"""

from __future__ import annotations

import resource

# Files a worker holds for itself, whatever its load: its WAL segment and board, the retry ledger,
# the listener and its sibling sockets, the ops listener, the log (24 measured idle, 43 under load).
RESERVED_FILES = 64
# Of what is left, connections take this share; the rest holds request bodies spooled to disk.
CONNECTIONS_SHARE = 0.75
# However low the limit, a worker keeps this many connections (it could serve nobody otherwise).
MIN_CONNECTIONS = 16
# Linux refuses a limit above fs.nr_open; this is its default where that cannot be read.
_NR_OPEN_DEFAULT = 1 << 20


def raise_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the soft limit now in force.

    Children inherit it, so the supervisor raises it once for every process it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(_nr_open(), hard if hard != resource.RLIM_INFINITY else _NR_OPEN_DEFAULT)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # a sandbox that forbids it: the budget below follows the limit that stays
    return soft


def soft_limit() -> int:
    """The open files this process may hold now."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _NR_OPEN_DEFAULT if limit == resource.RLIM_INFINITY else limit


def connection_budget(limit: int | None = None) -> int:
    """Connections one worker may hold with ``limit`` open files (this process's soft limit by default)."""
    limit = soft_limit() if limit is None else limit
    return max(MIN_CONNECTIONS, int((limit - RESERVED_FILES) * CONNECTIONS_SHARE))


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT
