"""``serve`` under systemd's ``Type=notify``: READY=1 once a reload can no longer kill it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.gateway.conftest import free_port, make_env, wait_until_ready

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("abstract", [False, True])
def test_serve_says_ready_once_a_reload_cannot_kill_it_and_its_children_never_notify(tmp_path, workers, abstract):
    """With ``Type=exec`` a ``systemctl reload`` in the first ~50 ms of a start killed the gateway
    (SIGHUP's default action, before the interpreter ran its first line). systemd holds a reload
    back until READY=1, which comes now: here a SIGHUP sent at once on READY=1 leaves it running,
    and only the process systemd started ever writes to the socket."""
    env = make_env(tmp_path, n_devices=1, listen={"workers": workers})
    name = f"edge-gateway-test-{os.getpid()}-{workers}" if abstract else str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name if abstract else name)
        manager.settimeout(20)
        port = free_port()
        environ = dict(os.environ, NOTIFY_SOCKET="@" + name if abstract else name, EDGE_GATEWAY__LISTEN__PORT=str(port))
        log = open(tmp_path / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(env.config)], env=environ, stdout=log, stderr=log)
        try:
            assert manager.recv(256) == b"READY=1"
            proc.send_signal(signal.SIGHUP)  # what systemd sends for `systemctl reload` once the unit is started
            wait_until_ready(f"http://127.0.0.1:{port}", proc, 20, tmp_path / "serve.log")
            children = psutil.Process(proc.pid).children()
            assert len(children) >= (3 if workers > 1 else 0)
            assert all("NOTIFY_SOCKET" not in child.environ() for child in children)
            manager.settimeout(1)
            with pytest.raises(TimeoutError):
                manager.recv(256)  # nothing more, from any process
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            log.close()
    assert code == 0
    # The reload asked for at once was applied, by every worker, not lost in the start.
    assert (tmp_path / "serve.log").read_text().count('"msg":"configuration reloaded"') == workers
