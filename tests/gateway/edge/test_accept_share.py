"""Workers on one listener take their share of the waiting connections (gateway/edge/accept_share.py).

Two Acceptors in one event loop stand for two workers: each has its own descriptor of the same
listening socket (as each worker has its copy of the supervisor's), so both are woken by the same
queue, and each has its own slot in a shared counts file. Real sockets on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct

import pytest

from gateway.edge.accept_share import NOT_ACCEPTING, SiblingConnections, leave_nothing_to, share_file
from gateway.edge.acceptor import LEFT_FOR_SIBLINGS_SECS, Acceptor
from tests.gateway.loop_turns import LoopTurns


def test_quota_is_the_fair_share_of_held_and_waiting_plus_slack(tmp_path):
    first = SiblingConnections(share_file(tmp_path), 0, 2)
    second = SiblingConnections(share_file(tmp_path), 1, 2)
    assert first.quota(held=0, waiting=20) == 11  # half of 20, and one more
    second.publish(11)
    assert first.quota(held=0, waiting=9) == 11  # 20 in all: 10 each, the other holds 11 already
    assert first.quota(held=14, waiting=1) == 0  # 26 in all: 13 each; it holds more than that
    second.stop_accepting()
    assert first.quota(held=14, waiting=5) == 6  # alone: all of it (and the slack)
    third = SiblingConnections(share_file(tmp_path), 1, 2)  # a restarted worker starts its slot at 0
    assert first.quota(held=4, waiting=0) == 0
    third.close()


def test_a_worker_holding_more_than_its_share_plus_slack_is_over_it(tmp_path):
    first = SiblingConnections(share_file(tmp_path), 0, 3)
    second = SiblingConnections(share_file(tmp_path), 1, 3)
    third = SiblingConnections(share_file(tmp_path), 2, 3)
    second.publish(2)
    third.publish(0)  # restarted: holds none yet
    assert first.over_share(held=8)  # 10 in all: 4 each, and one of slack
    assert not first.over_share(held=3)  # 5 in all: 2 each, and one of slack
    assert not second.over_share(held=2)  # first has published none: 2 in all
    third.stop_accepting()  # a sibling with no room takes nothing: the other two share
    assert not first.over_share(held=5) and first.over_share(held=6)  # 7 and 8 in all: 4 each
    third.publish(100)  # many connections: over by an eighth of its share, not by one
    assert not first.over_share(held=61)  # 163 in all: 55 each, and an eighth of that (6) of slack
    assert first.over_share(held=62)
    second.close()
    third.close()
    assert not first.over_share(held=50), "alone, there is no one to hand connections to"


def test_a_closed_share_reads_as_not_accepting(tmp_path):
    first = SiblingConnections(share_file(tmp_path), 0, 3)
    second = SiblingConnections(share_file(tmp_path), 2, 3)
    second.publish(7)
    second.close()
    second.publish(9)  # a connection closing after the worker stopped accepting: nothing changes
    # Workers 0 and 1 share 6 (2 held, 4 waiting): 3 each.
    assert first.quota(held=2, waiting=4) == 2
    assert NOT_ACCEPTING < 0


def test_an_index_outside_the_workers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="worker index 2"):
        SiblingConnections(share_file(tmp_path), 2, 2)


class Holding:
    """A protocol factory counting the connections it holds open."""

    def __init__(self) -> None:
        self.held = 0

    def __call__(self) -> asyncio.Protocol:
        holding = self

        class Held(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                holding.held += 1

            def connection_lost(self, exc) -> None:
                holding.held -= 1

        return Held()


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0), backlog=256)
    yield sock
    sock.close()


@contextlib.contextmanager
def two_workers(listener: socket.socket, tmp_path, connections: int, serving=(True, True)):
    """Two workers on copies of ``listener``, each with its slot (``serving``: whether each can take
    records), and ``connections`` clients queued on it while the loop is not running; all closed after."""
    workers = [Holding(), Holding()]
    acceptors = [
        Acceptor(
            listener.dup(),
            workers[index],
            siblings=SiblingConnections(share_file(tmp_path), index, 2),
            held=lambda index=index: workers[index].held,
            serving=lambda index=index: serving[index],
        )
        for index in range(2)
    ]
    clients = [socket.create_connection(listener.getsockname()) for _ in range(connections)]
    try:
        yield workers
    finally:
        for acceptor in acceptors:
            acceptor.close()
        for client in clients:
            client.close()


async def wait_until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_two_workers_split_connections_that_arrive_together(listener, tmp_path):
    with two_workers(listener, tmp_path, 40) as workers:
        await wait_until(lambda: sum(worker.held for worker in workers) == 40)
        # Without shares the first worker woken takes all 40.
        assert sorted(worker.held for worker in workers) in ([19, 21], [20, 20])
        await asyncio.sleep(2 * LEFT_FOR_SIBLINGS_SECS)
        assert sum(worker.held for worker in workers) == 40


async def test_what_a_silent_sibling_leaves_is_taken_a_little_later(listener, tmp_path):
    silent = SiblingConnections(share_file(tmp_path), 1, 2)  # a worker that is stalled or dead
    worker = Holding()
    acceptor = Acceptor(listener, worker, siblings=SiblingConnections(share_file(tmp_path), 0, 2), held=lambda: worker.held)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(30)]
    try:
        await wait_until(lambda: worker.held == 16)  # its share (15) and the slack
        await wait_until(lambda: worker.held == len(clients))  # and the rest once it has waited
    finally:
        acceptor.close()
        silent.close()
        for client in clients:
            client.close()


async def test_a_worker_holding_more_than_its_share_leaves_a_new_connection_to_its_sibling(listener, tmp_path):
    sibling = SiblingConnections(share_file(tmp_path), 1, 2)
    worker = Holding()
    acceptor = Acceptor(listener, worker, siblings=SiblingConnections(share_file(tmp_path), 0, 2), held=lambda: worker.held)
    first = [socket.create_connection(listener.getsockname()) for _ in range(4)]
    try:
        await wait_until(lambda: worker.held == 4)
        sibling.publish(0)  # it could take more; but it is not taking this one
        late = socket.create_connection(listener.getsockname())
        first.append(late)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await wait_until(lambda: worker.held == 5)
        assert loop.time() - began >= LEFT_FOR_SIBLINGS_SECS * 0.9  # it waited for the sibling first
    finally:
        acceptor.close()
        sibling.close()
        for client in first:
            client.close()


def test_the_shared_file_is_allocated_not_sparse(tmp_path):
    # A write through a mapping into a hole of a file on a full disk is a SIGBUS, not an error.
    share = SiblingConnections(share_file(tmp_path), 0, 4)
    assert share_file(tmp_path).stat().st_blocks > 0
    share.close()


def test_a_worker_that_cannot_share_still_serves(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from gateway.ops.status.cluster import RUNTIME_ENV
    from gateway.server import _siblings

    share_file(tmp_path).mkdir()  # the file cannot be opened: it is a directory
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path))
    gw = SimpleNamespace(settings=SimpleNamespace(listen=SimpleNamespace(workers=2)), worker_index=1)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert _siblings(gw, listener) is None  # it accepts whatever waits, as a lone worker does
    assert "cannot share connections" in caplog.text


def test_a_worker_the_supervisor_saw_exit_is_left_nothing(tmp_path):
    first = SiblingConnections(share_file(tmp_path), 0, 2)
    gone = SiblingConnections(share_file(tmp_path), 1, 2)
    gone.publish(0)  # what a killed worker last said: it would still be left half of what waits
    assert first.quota(held=6, waiting=2) == 0
    leave_nothing_to(tmp_path, 1)
    assert first.quota(held=6, waiting=2) == 3  # alone: all of it (and the slack)
    leave_nothing_to(tmp_path / "elsewhere", 0)  # before any worker shared: nothing to do


async def test_a_worker_over_its_share_is_not_woken_again_while_it_leaves_the_rest(listener, tmp_path):
    sibling = SiblingConnections(share_file(tmp_path), 1, 2)
    worker = Holding()
    acceptor = Acceptor(listener, worker, siblings=SiblingConnections(share_file(tmp_path), 0, 2), held=lambda: worker.held)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(4)]
    quotas = []
    real_quota = acceptor._quota
    acceptor._quota = lambda: quotas.append(1) or real_quota()
    try:
        await wait_until(lambda: worker.held == 4)
        sibling.publish(0)
        clients.append(socket.create_connection(listener.getsockname()))  # over its share: left to the sibling
        await wait_until(lambda: len(quotas) >= 2)  # woken for it, and found its share taken
        acceptor._resume()  # as the pause after running out of file descriptors ends meanwhile
        woken = len(quotas)
        turns = LoopTurns()
        await wait_until(lambda: turns.number >= 20)
        turns.stop()
        assert len(quotas) <= woken + 1  # one more look, then asleep until the sibling's share is due
        await wait_until(lambda: worker.held == 5)
    finally:
        acceptor.close()
        sibling.close()
        for client in clients:
            client.close()


async def test_a_worker_that_can_only_refuse_leaves_new_connections_to_a_sibling_with_room(listener, tmp_path):
    """A worker whose WAL cannot take records would answer every connection it takes with a 503: its
    sibling with room takes them all, where a fair share would have split them."""
    with two_workers(listener, tmp_path, 20, serving=(False, True)) as workers:
        await wait_until(lambda: sum(worker.held for worker in workers) == 20)
        await asyncio.sleep(4 * LEFT_FOR_SIBLINGS_SECS)
        assert [worker.held for worker in workers] == [0, 20]


async def test_connections_are_still_taken_when_no_worker_has_room(listener, tmp_path):
    """Every worker full: the refusals must still come, from whichever worker looks again first."""
    with two_workers(listener, tmp_path, 10, serving=(False, False)) as workers:
        await wait_until(lambda: sum(worker.held for worker in workers) == 10)
        published = struct.unpack("=2q", share_file(tmp_path).read_bytes())
        assert published == (NOT_ACCEPTING, NOT_ACCEPTING)  # neither leaves anything to the other


@pytest.mark.parametrize(("refusal", "has_room"), [(None, True), ("full", False), ("no_space", False), ("failed", True)])
def test_only_a_full_wal_leaves_new_connections_to_the_siblings(refusal, has_room):
    """A full WAL (or disk) drains as the lake catches up: its devices are better off with a sibling.
    A failed one keeps its share, so the load balancer's health checks still see its 503."""
    from types import SimpleNamespace

    from gateway.server import _has_room

    worker = SimpleNamespace(pipeline=SimpleNamespace(wal=SimpleNamespace(refusal=lambda: refusal)))  # stands for a Gateway
    assert _has_room(worker) is has_room


async def test_out_of_file_descriptors_an_idle_connection_makes_room_for_a_new_one(listener, caplog):
    """accept() failing with EMFILE (this process's own limit) asks the guard to close an idle
    connection; its descriptor goes to the next one waiting, instead of every new client waiting until
    some connection ends by itself (a kept-alive one: 75 s). The limit is the listener's: it refuses
    while three connections are open, as accept() does when they hold the last descriptors."""
    transports: list[asyncio.Transport] = []
    held = [0]  # descriptors the accepted connections hold

    class Limited:
        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def __getattr__(self, name):
            return getattr(self._sock, name)

        def accept(self):
            if held[0] >= 3:
                raise OSError(errno.EMFILE, "Too many open files")
            held[0] += 1
            return self._sock.accept()

    class Kept(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            transports.append(transport)

    def make_room() -> bool:
        idle = next((t for t in transports if not t.is_closing()), None)
        if idle is None:
            return False
        idle.close()
        held[0] -= 1
        return True

    clients = [socket.create_connection(listener.getsockname()) for _ in range(6)]
    acceptor = Acceptor(Limited(listener), Kept, make_room=make_room)
    try:
        await wait_until(lambda: len(transports) == 6)  # the last three took the places of idle ones
        assert sum(t.is_closing() for t in transports) == 3
        assert "closed an idle connection to accept a new one" in caplog.text
    finally:
        acceptor.close()
        for transport in transports:
            transport.close()
        for client in clients:
            client.close()


def test_a_worker_over_its_share_closes_one_connection_per_interval_only_while_over_it():
    from gateway.edge.connections import REBALANCE_INTERVAL_SECS, ConnectionGuard
    from gateway.edge.settings import ConnectionSettings

    now = [100.0]
    over = [True]
    guard = ConnectionGuard(lambda: ConnectionSettings(), clock=lambda: now[0], file_budget=1024)
    guard.over_share = lambda: over[0]
    closes = []
    for _ in range(40):  # an answer every 25 ms for a second
        closes.append(guard._rebalance_due())
        now[0] += 0.025
    assert sum(closes) == round(1.0 / REBALANCE_INTERVAL_SECS) and closes[0]
    over[0] = False
    now[0] += REBALANCE_INTERVAL_SECS
    assert not guard._rebalance_due()
