"""The listeners' answers while an instance starts: on the device listener alive, not ready, come back
later; on the ops listener ``/metrics`` saying the instance is starting."""

from __future__ import annotations

import json
import socket
import time
from functools import partial
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.edge.while_starting import MAX_CONNECTIONS, AnswersOnceLocked, StartingAnswers, answer, starting_answers
from gateway.listeners import bind_listener
from gateway.ops.starting_metrics import StartingExposition


def exchange(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``request`` and read everything until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parsed(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def connections_reach(answers: StartingAnswers, count: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while answers.connections != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return answers.connections == count


@pytest.fixture
def listener():
    sock = bind_listener("127.0.0.1", 0, 1024)  # room for the cap test's connections
    yield sock
    sock.close()


@pytest.fixture
def answers(listener):
    running = StartingAnswers(listener, partial(answer, retry_after_secs=7)).start()
    yield running
    running.stop()


def test_healthz_is_alive_and_readyz_is_not_ready_while_starting(listener, answers):
    port = listener.getsockname()[1]
    status, headers, body = parsed(exchange(port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"))
    assert status == 200 and json.loads(body) == {"status": "starting"} and headers["Connection"] == "close"
    status, headers, body = parsed(exchange(port, b"GET /readyz?verbose=1 HTTP/1.1\r\nHost: gw\r\n\r\n"))
    assert status == 503 and json.loads(body) == {"status": "starting"} and headers["Retry-After"] == "7"


def test_a_start_waiting_for_room_says_so_and_a_device_is_told_to_come_back(listener, answers):
    port = listener.getsockname()[1]
    answers.waiting_for_room(True)
    assert json.loads(parsed(exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[2]) == {"status": "waiting_for_room"}
    body = b'{"device_id":"d1","ts":1,"metrics":{"t":1}}\n' * 2000  # sent whole before the answer is read
    request = b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    status, headers, answer_body = parsed(exchange(port, request))
    assert status == 503 and headers["Retry-After"] == "7"
    refusal = json.loads(answer_body)
    assert refusal["error"] == "unavailable" and "disk" in refusal["message"]
    answers.waiting_for_room(False)
    assert json.loads(parsed(exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[2]) == {"status": "starting"}
    assert answers.answered == 3


def test_a_head_answer_has_no_body_and_a_head_too_long_is_closed_unanswered(listener, answers):
    port = listener.getsockname()[1]
    status, headers, body = parsed(exchange(port, b"HEAD /healthz HTTP/1.1\r\n\r\n"))
    assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""
    assert exchange(port, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n") == b""
    assert answers.answered == 1


def test_once_stopped_the_socket_stays_open_for_the_gateway_and_nothing_answers_from_the_thread(listener):
    running = StartingAnswers(listener, partial(answer, retry_after_secs=1)).start()
    port = listener.getsockname()[1]
    assert parsed(exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
    assert connections_reach(running, 0)  # the answered one closed
    slow = socket.create_connection(("127.0.0.1", port))  # accepted, its head never comes: closed by stop
    assert connections_reach(running, 1)
    running.stop()
    assert slow.recv(10) == b""
    slow.close()
    # The instance's socket still listens: a connection made now waits for whoever accepts next.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
        late.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(100).startswith(b"GET /healthz")
    assert running.answered == 1


def test_a_stop_amid_a_burst_of_connections_leaves_none_waiting_on_a_socket_nobody_answers(listener):
    """The gateway takes over from a stop while devices connect: every connection is answered by the
    thread, closed by it, or left in the listener's queue for the gateway; none accepted and then
    forgotten (asyncio 3.11 drops a connection whose transport is built after its server closed,
    with its socket open: its client waited over a minute in a start under load)."""
    import select
    import threading

    port = listener.getsockname()[1]
    for trial in range(6):
        running = StartingAnswers(listener, partial(answer, retry_after_secs=1)).start()
        clients: list[socket.socket] = []

        def connect(n: int = 300) -> None:
            for _ in range(n):
                client = socket.create_connection(("127.0.0.1", port))
                client.sendall(b"GET /readyz HTTP/1.1\r\n\r\n")
                clients.append(client)

        burst = threading.Thread(target=connect)
        burst.start()
        time.sleep(0.01 * trial)
        running.stop()
        taken_over = threading.Event()

        def gateway() -> None:  # stands for the workers: accepts what is left and answers it
            listener.settimeout(0.05)
            while not taken_over.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        serving = threading.Thread(target=gateway)
        serving.start()
        burst.join()
        waiting, deadline = set(clients), time.monotonic() + 3.0
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(list(waiting), [], [], 0.1)
            waiting -= set(readable)  # an answer, or the connection closed or reset
        taken_over.set()
        serving.join()
        for client in clients:
            client.close()
        assert not waiting, f"trial {trial}: {len(waiting)} of {len(clients)} connections got neither an answer nor a close in 3 s"
    listener.settimeout(None)


def test_connections_beyond_the_cap_are_closed_unanswered(listener, answers):
    port = listener.getsockname()[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        assert connections_reach(answers, MAX_CONNECTIONS)  # each accepted, waiting for its head
        try:
            extra = exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        except ConnectionResetError:
            extra = b""  # closed with the request unread
        assert extra == b"" and answers.answered == 0
    finally:
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    "head, status, key",
    [
        (b"GET /healthz HTTP/1.1\r\n\r\n", 200, "status"),
        (b"GET /readyz HTTP/1.1\r\n\r\n", 503, "status"),
        (b"POST /v1/telemetry HTTP/1.1\r\n\r\n", 503, "error"),
        (b"garbage\r\n\r\n", 503, "error"),
    ],
)
def test_every_head_gets_a_json_answer(head, status, key):
    code, headers, body = parsed(answer(head, "starting", 3))
    assert code == status and key in json.loads(body) and int(headers["Content-Length"]) == len(body)


SETTINGS = SimpleNamespace(tls=SimpleNamespace(enabled=False), wal=SimpleNamespace(retry_after_secs=2))


def samples(raw: bytes) -> dict[str, float]:
    """The unlabelled samples of an exposition, as Prometheus's own parser reads them."""
    status, headers, body = parsed(raw)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {s.name: s.value for family in text_string_to_metric_families(body.decode()) for s in family.samples if not s.labels}


def test_a_gateway_alone_binds_its_listeners_once_it_holds_the_instance_lock():
    bound = []

    def bind():
        bound.append(bind_listener("127.0.0.1", 0, 16))
        return bound[-1]

    never_locked = AnswersOnceLocked(SETTINGS, bind, bind)
    never_locked.waiting_for_room(True)  # a start that could not lock never gets here; harmless if it did
    never_locked.stop()
    never_locked.close()
    assert never_locked.listener is None and bound == [], "a start that never held the lock binds nothing"
    once = AnswersOnceLocked(SETTINGS, bind, bind)
    try:
        once.locked()
        once.locked()  # told again: still the one pair of listeners
        assert len(bound) == 2 and (once.listener, once.ops_listener) == (bound[0], bound[1])
        port, ops_port = once.listener.getsockname()[1], once.ops_listener.getsockname()[1]
        assert json.loads(parsed(exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[2]) == {"status": "starting"}
        assert samples(exchange(ops_port, b"GET /metrics HTTP/1.1\r\n\r\n"))["edge_gateway_start_waiting_for_room"] == 0
        once.waiting_for_room(True)
        assert json.loads(parsed(exchange(port, b"GET /readyz HTTP/1.1\r\n\r\n"))[2]) == {"status": "waiting_for_room"}
        assert samples(exchange(ops_port, b"GET /metrics HTTP/1.1\r\n\r\n"))["edge_gateway_start_waiting_for_room"] == 1
    finally:
        once.stop()
        once.close()
    assert all(sock.fileno() == -1 for sock in bound), "a failed start closes what it bound"


def test_the_ops_listener_says_the_instance_is_starting_for_how_long_and_whether_it_waits_for_room(listener):
    ops = bind_listener("127.0.0.1", 0, 16)
    running = starting_answers(listener, SETTINGS, ops)
    try:
        ops_port = ops.getsockname()[1]
        first = samples(exchange(ops_port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n"))
        assert first["edge_gateway_starting"] == 1 and first["edge_gateway_start_waiting_for_room"] == 0
        time.sleep(0.05)
        running.waiting_for_room(True)
        later = samples(exchange(ops_port, b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n"))
        assert later["edge_gateway_start_waiting_for_room"] == 1
        assert later["edge_gateway_start_seconds"] >= first["edge_gateway_start_seconds"] + 0.05
        # The device listener is told the same; the ops listener answers nothing but /metrics.
        assert json.loads(parsed(exchange(listener.getsockname()[1], b"GET /healthz HTTP/1.1\r\n\r\n"))[2]) == {"status": "waiting_for_room"}
        assert parsed(exchange(ops_port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 404
        assert parsed(exchange(ops_port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))[0] == 404
        status, headers, body = parsed(exchange(ops_port, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
        assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""
    finally:
        running.stop()
        ops.close()


def test_the_starting_exposition_names_the_build_as_the_running_gateway_does():
    from gateway.ops.metrics import GatewayMetrics
    from prometheus_client import generate_latest

    serving = {f.name: f for f in text_string_to_metric_families(generate_latest(GatewayMetrics().registry).decode())}
    starting = {f.name: f for f in text_string_to_metric_families(StartingExposition().text("starting").decode())}
    assert starting["edge_gateway_build_info"].samples[0].labels == serving["edge_gateway_build_info"].samples[0].labels
    assert serving["edge_gateway_starting"].samples[0].value == 0 and starting["edge_gateway_starting"].samples[0].value == 1
    assert serving["edge_gateway_starting"].documentation == starting["edge_gateway_starting"].documentation


def test_a_listener_it_cannot_serve_is_logged_and_the_start_goes_on(caplog):
    datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # listen() fails on it
    try:
        StartingAnswers(datagrams, partial(answer, retry_after_secs=1)).start().stop()
    finally:
        datagrams.close()
    assert "cannot answer on the device listener while starting" in caplog.text
