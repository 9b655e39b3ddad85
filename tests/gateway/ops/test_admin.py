"""The admin API: off by default, its own listener, bearer token, never a key in an answer."""

from __future__ import annotations

import orjson

from gateway.auth.signing import sign_request
from tests.gateway.conftest import free_port, make_env, record

TOKEN = "t" * 32


async def test_admin_is_off_by_default_and_absent_from_the_device_listener(start, env, http):
    gw = await start(env)
    assert gw.admin is None
    async with http.get(gw.url + "/admin/config") as resp:
        assert resp.status == 404


async def test_admin_requires_the_token_and_can_disable_a_device(tmp_path, start, http, monkeypatch):
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    port = free_port()
    env = make_env(tmp_path, admin={"enabled": True, "port": port, "token_path": str(tmp_path / "admin-token")})
    gw = await start(env)
    admin = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        async with http.get(admin + "/admin/config", headers=headers) as resp:
            assert resp.status == 401
    async with http.get(admin + "/admin/config", headers=auth) as resp:
        config = await resp.json()
        assert resp.status == 200 and config["admin"]["token_path"].endswith("admin-token")
        assert TOKEN not in orjson.dumps(config).decode()
    key = env.device("dev-1").key
    async with http.get(admin + "/admin/devices/dev-1", headers=auth) as resp:
        answer = await resp.text()
        assert resp.status == 200 and '"keys":1' in answer and key not in answer
    async with http.post(admin + "/admin/devices/dev-1/disable", headers=auth) as resp:
        assert resp.status == 200
    body = orjson.dumps(record("dev-1")) + b"\n"
    headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", key, body)}
    async with http.post(gw.url + "/v1/telemetry", data=body, headers=headers) as resp:
        assert resp.status == 403
    async with http.post(admin + "/admin/devices/dev-1/enable", headers=auth) as resp:
        assert resp.status == 200
    async with http.post(admin + "/admin/registry/reload", headers=auth) as resp:
        assert (resp.status, (await resp.json())["devices"]) == (200, 3)
    async with http.get(admin + "/admin/devices/nobody", headers=auth) as resp:
        assert resp.status == 404
    async with http.post(admin + "/admin/devices/nobody/disable", headers=auth) as resp:
        assert resp.status == 404
    import fcntl
    import os

    from gateway.auth import registry

    monkeypatch.setattr(registry, "LOCK_WAIT_SECS", 0.2)
    held = os.open(tmp_path / ".devices.json.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)  # a `device` command that never finishes
    try:
        async with http.post(admin + "/admin/devices/dev-1/disable", headers=auth) as resp:
            assert (resp.status, (await resp.json())["error"]) == (503, "registry_unwritable")
    finally:
        os.close(held)
    assert gw.gateway.registry.get("dev-1").enabled
