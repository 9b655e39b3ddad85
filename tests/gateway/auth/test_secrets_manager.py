"""Device keys from AWS Secrets Manager (moto's server): rotation, disable, outage, no leaks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import orjson
import pytest
from aiobotocore.session import get_session

from gateway.auth.signing import sign_request
from gateway.durable import ledger_clock
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.stepped_clock import MovableClocks
from tests.gateway.conftest import make_env, record

REFRESH_SECS = 0.5


def fleet(**devices: dict) -> str:
    return json.dumps({"devices": devices})


@pytest.fixture
async def sm(moto_endpoint):
    async with get_session().create_client("secretsmanager", endpoint_url=moto_endpoint, region_name="us-east-1") as client:
        yield client


@pytest.fixture
async def secret(sm) -> str:
    name = f"edge-gateway/devices-{uuid.uuid4().hex[:8]}"
    await sm.create_secret(
        Name=name,
        SecretString=fleet(**{"dev-1": {"key": "k1-" + "a" * 40, "metadata": {"site": "plant-7"}}, "dev-2": {"key": "kb-" + "b" * 40}}),
    )
    return name


def secrets_env(tmp_path, endpoint: str, secret: str):
    env = make_env(
        tmp_path,
        n_devices=0,
        auth={"registry_source": "secretsmanager"},
        secretsmanager={"endpoint_url": endpoint, "region": "us-east-1", "refresh_interval_secs": REFRESH_SECS, "startup_timeout_secs": 5.0},
    )
    return env, {"EDGE_GATEWAY__SECRETSMANAGER__SECRET_IDS": json.dumps([secret])}


async def send(http, gw, device_id: str, key: str, now: float | None = None) -> tuple[int, dict]:
    body = orjson.dumps(record(device_id, seq=int(time.time() * 1e6))) + b"\n"
    headers = {"Content-Type": "application/x-ndjson", **sign_request(device_id, key, body, now=now)}
    async with http.post(gw.url + "/v1/telemetry", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_rotation_accepts_the_previous_key_only_while_it_is_awsprevious(tmp_path, moto_endpoint, sm, secret, start, http):
    env, environ = secrets_env(tmp_path, moto_endpoint, secret)
    gw = await start(env, environ)
    k1, k2, k3 = "k1-" + "a" * 40, "k2-" + "c" * 40, "k3-" + "d" * 40
    assert (await send(http, gw, "dev-1", k1))[0] == 202
    assert (await send(http, gw, "dev-1", k2))[0] == 401

    await sm.put_secret_value(SecretId=secret, SecretString=fleet(**{"dev-1": {"key": k2}}))  # k1 -> AWSPREVIOUS
    assert await gw.gateway.registry_source.refresh()
    assert (await send(http, gw, "dev-1", k2))[0] == 202
    assert (await send(http, gw, "dev-1", k1, now=time.time() - 1))[0] == 202  # still AWSPREVIOUS

    await sm.put_secret_value(SecretId=secret, SecretString=fleet(**{"dev-1": {"key": k3}}))  # k1 leaves both stages
    assert await gw.gateway.registry_source.refresh()
    assert (await send(http, gw, "dev-1", k1, now=time.time() - 2))[0] == 401
    assert (await send(http, gw, "dev-1", k2, now=time.time() - 2))[0] == 202
    assert (await send(http, gw, "dev-1", k3, now=time.time() - 2))[0] == 202
    # dev-2 is not in AWSCURRENT any more: it no longer exists, whatever AWSPREVIOUS says.
    assert (await send(http, gw, "dev-2", "kb-" + "b" * 40))[0] == 401


async def test_disabled_device_gets_403_within_one_refresh_interval(tmp_path, moto_endpoint, sm, secret, start, http):
    env, environ = secrets_env(tmp_path, moto_endpoint, secret)
    gw = await start(env, environ)
    k1 = "k1-" + "a" * 40
    assert (await send(http, gw, "dev-1", k1))[0] == 202
    await sm.put_secret_value(SecretId=secret, SecretString=fleet(**{"dev-1": {"key": k1, "enabled": False}}))
    changed = time.monotonic()
    status = 202
    while status != 403 and time.monotonic() - changed < REFRESH_SECS * 4:
        await asyncio.sleep(0.05)
        status, answer = await send(http, gw, "dev-1", k1, now=time.time() + (time.monotonic() - changed))
    assert status == 403 and "disabled" in answer["message"]
    # One interval, plus the refresh itself and scheduling slack on a busy 2-core machine.
    assert time.monotonic() - changed < REFRESH_SECS + 1.0


async def test_unreachable_secrets_manager_keeps_the_last_good_keys(tmp_path, moto_endpoint, secret, start, http, caplog):
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    try:
        env, environ = secrets_env(tmp_path, proxy.url, secret)
        environ["EDGE_GATEWAY__SECRETSMANAGER__RETRY"] = "{ max_elapsed_secs = 0.2, initial_interval_secs = 0.05 }"
        gw = await start(env, environ)
        metrics = gw.gateway.metrics
        assert metrics.registry_stale._value.get() == 0 and metrics.registry_devices._value.get() == 2
        await proxy.pause()
        caplog.set_level("INFO", logger="gateway.auth.secrets_source")
        assert not await gw.gateway.registry_source.refresh()
        assert metrics.registry_stale._value.get() == 1
        assert metrics.registry_refreshes.labels("error")._value.get() >= 1
        assert any("keeping the last good keys" in r.getMessage() for r in caplog.records)
        assert (await send(http, gw, "dev-1", "k1-" + "a" * 40))[0] == 202
        async with http.get(gw.ops_url + "/metrics") as resp:
            exposition = await resp.text()
        assert "edge_gateway_registry_stale 1.0" in exposition
        await proxy.resume()
        assert await gw.gateway.registry_source.refresh()
        assert metrics.registry_stale._value.get() == 0
        for text in (caplog.text, exposition):
            assert "a" * 40 not in text and "b" * 40 not in text
    finally:
        await proxy.stop()


async def test_no_registry_at_start_fails_start_up(tmp_path, moto_endpoint, start):
    from gateway.auth.registry import RegistryError

    env, environ = secrets_env(tmp_path, moto_endpoint, "edge-gateway/does-not-exist")
    with pytest.raises(RegistryError, match="Secrets Manager"):
        await start(env, environ)


async def test_malformed_secret_names_the_path_not_the_value(tmp_path, moto_endpoint, sm, start):
    from gateway.auth.registry import RegistryError

    name = f"edge-gateway/bad-{uuid.uuid4().hex[:8]}"
    await sm.create_secret(Name=name, SecretString=json.dumps({"devices": {"dev-1": {"key": 12345678901234}}}))
    env, environ = secrets_env(tmp_path, moto_endpoint, name)
    with pytest.raises(RegistryError) as info:
        await start(env, environ)
    assert "12345678901234" not in str(info.value) and "$.devices" in str(info.value)


@pytest.fixture
async def outage(tmp_path, moto_endpoint, secret):
    """Secrets Manager behind a proxy the test can pause: (proxy, env, environ), with quick retries."""
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    env, environ = secrets_env(tmp_path, proxy.url, secret)
    environ["EDGE_GATEWAY__SECRETSMANAGER__RETRY"] = "{ max_elapsed_secs = 0.2, initial_interval_secs = 0.05 }"
    try:
        yield proxy, env, environ
    finally:
        await proxy.stop()


async def test_keys_stop_verifying_once_older_than_max_stale_secs(outage, start, http):
    """Edge finding 13: during an outage a running gateway kept stale keys with no limit."""
    proxy, env, environ = outage
    environ["EDGE_GATEWAY__SECRETSMANAGER__MAX_STALE_SECS"] = "1.0"
    gw = await start(env, environ)
    assert (await send(http, gw, "dev-1", "k1-" + "a" * 40))[0] == 202
    await proxy.pause()
    await asyncio.sleep(1.2)
    assert not await gw.gateway.registry_source.refresh()
    assert (await send(http, gw, "dev-1", "k1-" + "a" * 40))[0] == 401, "an expired key still verified"
    await proxy.resume()
    assert await gw.gateway.registry_source.refresh()
    assert (await send(http, gw, "dev-1", "k1-" + "a" * 40))[0] == 202


async def test_the_keys_age_by_real_time_whichever_way_the_wall_clock_is_stepped(outage, start, http, monkeypatch):
    """During an outage the keys' age came from the wall clock: a step forward past max_stale_secs
    refused every device at once, and a step back kept keys Secrets Manager no longer confirms
    verifying for as long as the step. Their age is the time that really passed now."""
    clocks = MovableClocks()
    monkeypatch.setattr(ledger_clock, "time", clocks)
    proxy, env, environ = outage
    environ["EDGE_GATEWAY__SECRETSMANAGER__MAX_STALE_SECS"] = "60"
    gw = await start(env, environ)
    assert (await send(http, gw, "dev-1", "k1-" + "a" * 40))[0] == 202
    await proxy.pause()
    source = gw.gateway.registry_source
    clocks.step_wall(3 * 3600)  # NTP steps the wall clock three hours forward: the keys are seconds old
    assert not await source.refresh()
    assert not source.expired, "keys confirmed seconds ago expired by a step of the wall clock"
    clocks.step_wall(-6 * 3600)  # and back: real time still passes
    clocks.let_pass(61)
    assert not await source.refresh()
    assert source.expired, "keys unconfirmed for longer than max_stale_secs still verify after a step back"
    await proxy.resume()
    assert await source.refresh() and not source.expired


async def test_a_start_during_an_outage_serves_the_last_good_keys_while_fresh(tmp_path, outage, start, http):
    """Edge finding 13: new instances could not start at all while Secrets Manager was away."""
    proxy, env, environ = outage
    environ["EDGE_GATEWAY__SECRETSMANAGER__STARTUP_TIMEOUT_SECS"] = "1.0"
    gw = await start(env, environ)
    await gw.stop()
    cache = tmp_path / "wal" / "registry-cache.json"
    assert cache.stat().st_mode & 0o777 == 0o600
    await proxy.pause()
    gw = await start(env, environ)  # Secrets Manager unreachable: the cache serves
    assert gw.gateway.registry_source.stale
    assert (await send(http, gw, "dev-1", "k1-" + "a" * 40))[0] == 202
    await gw.stop()
    from gateway.auth.registry import RegistryError

    environ["EDGE_GATEWAY__SECRETSMANAGER__MAX_STALE_SECS"] = "0.001"
    with pytest.raises(RegistryError, match="Secrets Manager"):
        await start(env, environ)  # a cache older than max_stale_secs is not trusted
    del environ["EDGE_GATEWAY__SECRETSMANAGER__MAX_STALE_SECS"]
    damaged = orjson.loads(cache.read_bytes())
    damaged["confirmed"] = "not an instant"
    cache.write_bytes(orjson.dumps(damaged))
    with pytest.raises(RegistryError, match="Secrets Manager"):
        await start(env, environ)  # a damaged cache is no cache: the same clear refusal, no traceback
