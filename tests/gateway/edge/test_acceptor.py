"""Connections are accepted all at once (gateway/edge/acceptor.py): real sockets on loopback.

Clients connect while the event loop is not running, so their connections complete in the kernel
and wait in the listener's queue, as they do behind a busy loop; turns are counted with ``LoopTurns``.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.edge.acceptor import Acceptor
from tests.gateway.loop_turns import LoopTurns


def recording_protocol(made: list[int], turns_of: list[LoopTurns]):
    class Recording(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            made.append(turns_of[0].number)
            transport.write(b"hello")
            transport.close()

    return Recording


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0), backlog=256)
    yield sock
    sock.close()


async def test_every_connection_waiting_in_the_queue_is_accepted_in_one_wake_up(listener):
    made: list[int] = []
    turns_of: list[LoopTurns] = []
    acceptor = Acceptor(listener, recording_protocol(made, turns_of))
    clients = [socket.create_connection(listener.getsockname()) for _ in range(60)]  # queued: the loop is not running
    try:
        turns_of.append(LoopTurns())
        async with asyncio.timeout(10):
            while len(made) < len(clients):
                await asyncio.sleep(0.01)
        turns_of[0].stop()
        # One accepted per turn (uvloop's own server) would take 60 turns; here all of them are
        # accepted when the listener is first readable and set up within a few turns.
        assert max(made) - min(made) <= 3, made
        for client in clients:
            client.settimeout(5)
            assert client.recv(5) == b"hello"
    finally:
        acceptor.close()
        for client in clients:
            client.close()


async def test_a_shed_connection_gets_no_protocol(listener):
    made: list[int] = []
    turns_of = [LoopTurns()]
    shed_socks: list[socket.socket] = []

    def shed(sock: socket.socket) -> bool:
        if len(shed_socks) < 2:
            shed_socks.append(sock)
            sock.send(b"busy")
            sock.close()
            return True
        return False

    acceptor = Acceptor(listener, recording_protocol(made, turns_of), shed=shed)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
    try:
        async with asyncio.timeout(10):
            while len(made) < 3:
                await asyncio.sleep(0.01)
        answers = []
        for client in clients:
            client.settimeout(5)
            answers.append(client.recv(5))
        assert sorted(answers) == [b"busy"] * 2 + [b"hello"] * 3
        assert len(made) == 3
    finally:
        turns_of[0].stop()
        acceptor.close()
        for client in clients:
            client.close()


async def test_a_closed_acceptor_takes_no_more_connections(listener):
    acceptor = Acceptor(listener, asyncio.Protocol)
    address = listener.getsockname()
    assert acceptor.sockets == (listener,)
    acceptor.close()
    await acceptor.wait_closed()
    assert acceptor.sockets == ()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2).close()
