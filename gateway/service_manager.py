"""Telling systemd (``Type=notify``) that ``serve`` takes signals now: ``READY=1``.

With ``Type=exec`` systemd counts the service started once it is executed, and a ``systemctl
reload`` (SIGHUP) right after a start could reach the interpreter before ``serve`` had its
handlers: SIGHUP's default action killed the gateway. With ``Type=notify`` systemd holds a reload
back until ``READY=1``, which ``serve`` sends the moment its handlers are in place
(gateway/early_signals.py). It says nothing about traffic: ``/readyz`` does. Only the process
systemd started notifies; the processes it starts never see the socket.

Only the standard library is imported here: this runs before the gateway's own imports.
"""

from __future__ import annotations

import os
import socket

SOCKET_ENV = "NOTIFY_SOCKET"


def notify_ready() -> None:
    address = os.environ.pop(SOCKET_ENV, None)  # gone for the children too
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(b"READY=1")
    except OSError:
        pass  # systemd then times the start out and says so; nothing here can do better
