"""Admission at accept: connections that queued in the kernel while the process was busy are shed.

A busy event loop accepts late, and whatever waits in the kernel's accept queue is invisible to
every limit that counts requests: under overload requests waited there for seconds while the
in-flight count stayed low. The guard reads the queue's depth as it accepts and answers the
connections beyond ``connections.max_accept_queue`` with 503 at once. Real sockets; the gateway's
loop is blocked on purpose while the clients connect, so their connections complete in the kernel
and wait to be accepted.
"""

from __future__ import annotations

import os
import signal
import socket

from gateway.edge.acceptor import AcceptQueue
from tests.durability.client import ndjson
from tests.durability.harness import ServeProcess, make_devices, write_gateway_config
from tests.gateway.conftest import free_port


def test_the_depth_of_a_listeners_accept_queue_is_read_from_the_kernel():
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        queue = AcceptQueue(listener)
        assert queue.depth() == 0
        clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
        try:
            assert queue.depth() == 5
            accepted, _ = listener.accept()
            accepted.close()
            assert queue.depth() == 4
        finally:
            for client in clients:
                client.close()


def queued_answers(tmp_path, max_accept_queue: int, clients: int = 8) -> list[tuple[int, bytes, int | None]]:
    """The real ``serve`` (uvloop accepts one connection at a time, as the kernel hands them over),
    stopped with SIGSTOP while ``clients`` devices connect and send, then resumed."""
    port = free_port()
    (device,) = make_devices(tmp_path / "devices.json", 1)
    config = write_gateway_config(tmp_path, port, connections={"max_accept_queue": max_accept_queue})
    serve = ServeProcess(config, port, tmp_path / "logs")
    try:
        serve.start()
        os.kill(serve.pid, signal.SIGSTOP)  # the busy loop, at its most extreme
        try:
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
            for sock in socks:
                body = ndjson(device.records(2))
                head = "".join(f"{k}: {v}\r\n" for k, v in device.headers_for(body).items())
                sock.sendall(f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body)
        finally:
            os.kill(serve.pid, signal.SIGCONT)
        return [_read_response(sock) for sock in socks]
    finally:
        serve.kill()


def _read_response(sock: socket.socket) -> tuple[int, bytes, int | None]:
    """Status, body and Retry-After (None without one) of the answer on ``sock``."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    sock.close()
    retry_after = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"retry-after:")), None)
    return int(head.split()[1]), body, retry_after


def test_connections_queued_behind_a_busy_loop_are_refused_at_once_beyond_the_limit(tmp_path):
    answers = queued_answers(tmp_path, max_accept_queue=3)
    statuses = sorted(status for status, _, _ in answers)
    # Accepted in order as the queue drains: those with more than 3 still waiting behind them are shed.
    assert statuses == [202] * 4 + [503] * 4, statuses
    assert all(b"waiting to be accepted" in body for status, body, _ in answers if status == 503)
    # Spread like the admission's refusals (admission.retry_after_secs 1, retry_after_spread_secs 1).
    assert {retry_after for status, _, retry_after in answers if status == 503} <= {1, 2}


def test_no_connection_is_shed_when_the_limit_is_off(tmp_path):
    assert sorted(status for status, _, _ in queued_answers(tmp_path, max_accept_queue=0)) == [202] * 8
