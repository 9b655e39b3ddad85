"""Finding 11: ``/metrics`` was on the device listener, and ``/%6detrics`` reached it past a literal-path rule.

The device listener serves the device API and the health checks only; ``/metrics`` has its own
listener (loopback by default). Over real sockets, raw HTTP/1.1 so no client normalises the path.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.settings import ConfigError, load_settings
from tests.gateway.conftest import make_env

SPELLINGS = ("/metrics", "/%6detrics", "/%6D%65trics", "//metrics", "/metrics/", "/./metrics", "/x/../metrics")


async def raw_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


async def test_no_spelling_of_metrics_is_served_on_the_device_listener(tmp_path, start):
    gw = await start(make_env(tmp_path, n_devices=1))
    for path in SPELLINGS:
        status, answer = await raw_get(gw.port, path)
        assert status == 404 and b"edge_gateway_" not in answer, path
    assert (await raw_get(gw.port, "/healthz"))[0] == 200
    assert (await raw_get(gw.port, "/readyz"))[0] == 200


async def test_metrics_are_served_on_the_ops_listener(tmp_path, start):
    gw = await start(make_env(tmp_path, n_devices=1))
    host, port = gw.ops.addresses[0][:2]
    assert host == "127.0.0.1" and port != gw.port
    status, answer = await raw_get(port, "/metrics")
    assert status == 200 and b"edge_gateway_records_total" in answer
    assert (await raw_get(port, "/v1/telemetry"))[0] in (404, 405), "the ops listener takes no telemetry"


async def test_the_ops_listener_can_be_turned_off(tmp_path, start):
    gw = await start(make_env(tmp_path, n_devices=1, ops={"enabled": False}))
    assert gw.ops is None
    assert (await raw_get(gw.port, "/metrics"))[0] == 404


def test_the_ops_listener_defaults_to_loopback_and_never_shares_the_device_address(tmp_path):
    (tmp_path / "same").mkdir()
    settings = load_settings(make_env(tmp_path, n_devices=1).config, environ={"EDGE_GATEWAY__OPS__PORT": "9464"})
    assert (settings.ops.enabled, settings.ops.host) == (True, "127.0.0.1")
    with pytest.raises(ConfigError, match="ops listener"):
        load_settings(make_env(tmp_path / "same", n_devices=0, listen={"port": 9464}).config, environ={"EDGE_GATEWAY__OPS__PORT": "9464"})
