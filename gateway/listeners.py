"""Listening sockets, bound one way for every listener: the supervisor's shared ones, and a single
process's device, ops and admin listeners.

Only the standard library is imported here: the supervisor binds before any worker starts.
"""

from __future__ import annotations

import socket


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A listener's socket, bound once for the whole instance (never SO_REUSEPORT). ``::`` takes IPv4
    as well as IPv6 (as Go's and HAProxy's listeners do): one socket is all a worker is handed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    dual_stack = host == "::" and socket.has_dualstack_ipv6()
    try:
        sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False, dualstack_ipv6=dual_stack)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock
