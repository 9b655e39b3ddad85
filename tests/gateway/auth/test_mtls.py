"""Client certificates: the gateway terminating mTLS itself, an ALB-style forwarded header, HAProxy."""

from __future__ import annotations

import ssl
import urllib.parse

import aiohttp
import orjson
import pytest

from gateway.auth.signing import sign_request
from tests.gateway.conftest import make_env, read_zone, record, wait_for_records


def body_for(*device_ids: str) -> bytes:
    return b"".join(orjson.dumps(record(d)) + b"\n" for d in device_ids)


def client_context(pki, issued=None, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if issued is not None:
        context.load_cert_chain(issued.cert, issued.key)
    if max_version is not None:
        context.maximum_version = max_version
    return context


def tls_env(tmp_path, pki, **tls):
    return make_env(
        tmp_path,
        tls={"enabled": True, "cert_path": str(pki.server.cert), "key_path": str(pki.server.key), "client_ca_path": str(pki.ca), **tls},
    )


async def post(http, url: str, body: bytes, headers: dict | None = None, ssl_context=None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/x-ndjson", **(headers or {})}
    async with http.post(url + "/v1/telemetry", data=body, headers=headers, ssl=ssl_context) as resp:
        return resp.status, await resp.json()


async def test_client_certificate_authenticates_without_hmac(tmp_path, pki, start, http):
    env = tls_env(tmp_path, pki)
    gw = await start(env)
    assert gw.url.startswith("https://")
    ctx = client_context(pki, pki.device("dev-1"))
    assert (await post(http, gw.url, body_for("dev-1"), ssl_context=ctx))[0] == 202
    # The records must still be the certificate's device.
    status, answer = await post(http, gw.url, body_for("dev-1", "dev-2"), ssl_context=ctx)
    assert status == 403 and "dev-2" in answer["message"]
    # Without a certificate (client_cert = "optional") HMAC still works, and is still required.
    plain = client_context(pki)
    body = body_for("dev-2")
    assert (await post(http, gw.url, body, sign_request("dev-2", env.device("dev-2").key, body), ssl_context=plain))[0] == 202
    assert (await post(http, gw.url, body, ssl_context=plain))[0] == 401
    await gw.stop()
    assert {line["device_id"] for line in read_zone(env.lake, "raw")} == {"dev-1", "dev-2"}


async def test_certificate_for_an_unregistered_or_disabled_device_is_refused(tmp_path, pki, start, http):
    env = tls_env(tmp_path, pki)
    env.disable("dev-3")
    gw = await start(env)
    assert (await post(http, gw.url, body_for("dev-9"), ssl_context=client_context(pki, pki.device("dev-9"))))[0] == 401
    assert (await post(http, gw.url, body_for("dev-3"), ssl_context=client_context(pki, pki.device("dev-3"))))[0] == 403


async def test_certificate_from_an_untrusted_ca_fails_the_handshake(tmp_path, pki, start, http):
    gw = await start(tls_env(tmp_path, pki))
    with pytest.raises(aiohttp.ClientError):
        await post(http, gw.url, body_for("dev-1"), ssl_context=client_context(pki, pki.rogue_device("dev-1")))


async def test_required_client_certificate_and_minimum_version(tmp_path, pki, start, http):
    env = tls_env(tmp_path, pki, client_cert="required", min_version="1.3")
    gw = await start(env)
    body = body_for("dev-2")
    with pytest.raises(aiohttp.ClientError):  # no certificate at all
        await post(http, gw.url, body, sign_request("dev-2", env.device("dev-2").key, body), ssl_context=client_context(pki))
    with pytest.raises(aiohttp.ClientError):  # TLS 1.2 only
        await post(http, gw.url, body, ssl_context=client_context(pki, pki.device("dev-2"), max_version=ssl.TLSVersion.TLSv1_2))
    assert (await post(http, gw.url, body, ssl_context=client_context(pki, pki.device("dev-2"))))[0] == 202


def header_env(tmp_path, pki, trusted: list[str]):
    return make_env(tmp_path, tls={"client_ca_path": str(pki.ca)}, proxy={"client_cert_header": True}), {
        "EDGE_GATEWAY__PROXY__TRUSTED_CIDRS": orjson.dumps(trusted).decode()
    }


async def test_forwarded_certificate_header_from_a_trusted_proxy(tmp_path, pki, start, http):
    env, environ = header_env(tmp_path, pki, ["127.0.0.1/32"])
    gw = await start(env, environ)
    header = {"X-Amzn-Mtls-Clientcert": urllib.parse.quote(pki.device("dev-1").pem.decode(), safe="")}
    assert (await post(http, gw.url, body_for("dev-1"), header))[0] == 202
    # A certificate the fleet CA did not issue is refused, even from a trusted proxy.
    rogue = {"X-Amzn-Mtls-Clientcert": urllib.parse.quote(pki.rogue_device("dev-1").pem.decode(), safe="")}
    status, answer = await post(http, gw.url, body_for("dev-1"), rogue)
    assert status == 401 and "verify" in answer["message"]
    assert (await post(http, gw.url, body_for("dev-1"), {"X-Amzn-Mtls-Clientcert": "garbage%%"}))[0] == 401


async def test_forwarded_certificate_header_from_an_untrusted_address_is_ignored(tmp_path, pki, start, http):
    env, environ = header_env(tmp_path, pki, ["10.0.0.0/8"])
    gw = await start(env, environ)
    header = {"X-Amzn-Mtls-Clientcert": urllib.parse.quote(pki.device("dev-1").pem.decode(), safe="")}
    status, answer = await post(http, gw.url, body_for("dev-1"), header)
    assert status == 401 and "missing" in answer["message"]  # treated as an unsigned request


async def test_same_device_behind_haproxy(tmp_path, pki, start, http, haproxy):
    env, environ = header_env(tmp_path, pki, ["127.0.0.1/32"])
    gw = await start(env, environ)
    proxy = haproxy(gw.port)
    url = f"https://127.0.0.1:{proxy.port}"
    assert (await post(http, url, body_for("dev-1"), ssl_context=client_context(pki, pki.device("dev-1"))))[0] == 202
    status, _ = await post(http, url, body_for("dev-1", "dev-2"), ssl_context=client_context(pki, pki.device("dev-1")))
    assert status == 403
    # A device without a certificate never gets past HAProxy's `verify required`.
    with pytest.raises(aiohttp.ClientError):
        await post(http, url, body_for("dev-1"), ssl_context=client_context(pki))
    lines = await wait_for_records(env.lake, "raw", 1)
    assert lines[0]["device_id"] == "dev-1" and lines[0]["source_ip"] == "127.0.0.1"


async def test_haproxy_header_is_ignored_when_haproxy_is_not_trusted(tmp_path, pki, start, http, haproxy):
    env, environ = header_env(tmp_path, pki, ["192.0.2.0/24"])
    gw = await start(env, environ)
    proxy = haproxy(gw.port)
    status, _ = await post(
        http, f"https://127.0.0.1:{proxy.port}", body_for("dev-1"), ssl_context=client_context(pki, pki.device("dev-1"))
    )
    assert status == 401


async def test_while_starting_a_tls_listener_answers_over_tls(tmp_path, pki, http):
    """The listener of a start that is still catching up (or waiting for room) answers as the
    gateway will: over TLS, with the same certificate."""
    from gateway.edge.while_starting import answering_while_starting
    from gateway.listeners import bind_listener
    from gateway.settings import load_settings

    settings = load_settings(tls_env(tmp_path, pki).config)
    listener = bind_listener("127.0.0.1", 0, 16)
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with answering_while_starting(listener, settings) as starting:
            starting.waiting_for_room(True)
            async with http.get(url + "/healthz", ssl=client_context(pki)) as resp:
                assert resp.status == 200 and await resp.json() == {"status": "waiting_for_room"}
            async with http.get(url + "/readyz", ssl=client_context(pki)) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == str(settings.wal.retry_after_secs)
    finally:
        listener.close()
