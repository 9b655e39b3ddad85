"""The HMAC v1 scheme against forgery and replay, with the registry file."""

from __future__ import annotations

import hashlib
import time

import orjson
import pytest

from gateway.auth.signing import SCHEME, sign_request, signature
from gateway.durable.retry_ledger import body_key
from tests.gateway.conftest import record

pytestmark = pytest.mark.asyncio


def ndjson(*records: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


async def post(http, gw, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    headers = {"Content-Type": "application/x-ndjson", **headers}
    async with http.post(gw.url + "/v1/telemetry", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_valid_signature_is_accepted(start, env, http):
    gw = await start(env)
    body = ndjson(record("dev-1"))
    device = env.device("dev-1")
    assert (await post(http, gw, body, sign_request("dev-1", device.key, body)))[0] == 202


@pytest.mark.parametrize(
    "tamper",
    ["forged", "wrong_key", "other_device_key", "expired", "future", "body_changed", "missing", "bad_scheme"],
)
async def test_forgeries_get_401(start, env, http, tamper):
    gw = await start(env)
    body = ndjson(record("dev-1"))
    key = env.device("dev-1").key
    headers = sign_request("dev-1", key, body)
    if tamper == "forged":
        headers["X-Signature"] = f"{SCHEME}=" + "0" * 64
    elif tamper == "wrong_key":
        headers = sign_request("dev-1", "not-the-key", body)
    elif tamper == "other_device_key":
        headers = sign_request("dev-1", env.device("dev-2").key, body)
    elif tamper == "expired":
        headers = sign_request("dev-1", key, body, now=time.time() - 301)
    elif tamper == "future":
        headers = sign_request("dev-1", key, body, now=time.time() + 301)
    elif tamper == "body_changed":
        body = ndjson(record("dev-1", temperature_c=99.0))
    elif tamper == "missing":
        del headers["X-Signature"]
    elif tamper == "bad_scheme":
        headers["X-Signature"] = headers["X-Signature"].replace("v1=", "v0=")
    status, answer = await post(http, gw, body, headers)
    assert status == 401 and answer["error"] == "unauthorized"
    assert key not in orjson.dumps(answer).decode()


async def test_unknown_device_looks_like_a_bad_signature(start, env, http):
    gw = await start(env)
    body = ndjson(record("ghost"))
    status, answer = await post(http, gw, body, sign_request("ghost", "whatever", body))
    assert (status, answer["message"]) == (401, "the signature does not match")


def accepted(gw) -> float:
    return gw.gateway.metrics.records.labels("accepted")._value.get()


def replays(gw) -> dict[str, float]:
    return {outcome: gw.gateway.metrics.replays.labels(outcome)._value.get() for outcome in ("answered", "taken")}


async def test_a_request_sent_again_as_it_was_gets_its_first_answer_and_lands_nothing(start, env, http):
    """A device that lost the answer (a dropped connection, a timeout) resends the same signed bytes:
    the first answer comes back, marked replayed, and nothing is accepted twice (its records carry
    no seq, so only the request's key can tell)."""
    gw = await start(env)
    body = ndjson(record("dev-1"), record("dev-1", temperature_c=22.0))
    headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", env.device("dev-1").key, body)}
    async with http.post(gw.url + "/v1/telemetry", data=body, headers=headers) as first:
        first_answer = await first.read()
        assert first.status == 202 and first.headers.get("Idempotent-Replayed") is None
    async with http.post(gw.url + "/v1/telemetry", data=body, headers=headers) as again:
        assert (again.status, await again.read()) == (202, first_answer)
        assert again.headers.get("Idempotent-Replayed") == "true"
    assert accepted(gw) == 2 and replays(gw) == {"answered": 1, "taken": 0}
    # The same records signed anew (a new timestamp) are the same request: its body's key answers it.
    fresh = sign_request("dev-1", env.device("dev-1").key, body, now=time.time() + 1)
    assert (await post(http, gw, body, fresh))[0] == 202 and accepted(gw) == 2


async def send_newer_requests(http, gw, device_key: str, count: int = 6) -> None:
    """``count`` new requests of dev-1: with ``dedup_max_keys`` 2, requests start three newer
    generations in the retry ledger, and it forgets every request claimed before them."""
    for i in range(count):
        other = ndjson(record("dev-1", temperature_c=float(i)))
        assert (await post(http, gw, other, sign_request("dev-1", device_key, other)))[0] == 202


async def test_a_replay_the_ledger_no_longer_knows_gets_401(tmp_path, start, http):
    """Once the retry ledger has forgotten a request's key (a busy instance keeps the last one to two
    generations of ``dedup_max_keys``), a resend of its signed bytes within the timestamp window
    would land again, with its Idempotency-Key or without one: the signature, still remembered,
    refuses it. So does a signature whose request never reached the ledger, once requests claimed
    after it may have been forgotten."""
    from tests.gateway.conftest import make_env

    env = make_env(tmp_path, n_devices=1, limits={"dedup_max_keys": 2})
    gw = await start(env)
    key = env.device("dev-1").key
    body, keyed, unclaimed = (ndjson(record("dev-1", temperature_c=t)) for t in (1.0, 2.0, -1.0))
    headers, unclaimed_headers = sign_request("dev-1", key, body), sign_request("dev-1", key, unclaimed)
    keyed_headers = {**sign_request("dev-1", key, keyed), "Idempotency-Key": "k-1"}
    assert (await post(http, gw, body, headers))[0] == 202
    assert (await post(http, gw, keyed, keyed_headers))[0] == 202
    assert gw.gateway.security.replay.claim(unclaimed_headers["X-Signature"].partition("=")[2], int(unclaimed_headers["X-Timestamp"]))
    await send_newer_requests(http, gw, key)
    for sent, sent_headers in ((body, headers), (keyed, keyed_headers), (unclaimed, unclaimed_headers)):
        status, answer = await post(http, gw, sent, sent_headers)
        assert status == 401 and "replay" in answer["message"]
    assert accepted(gw) == 8 and replays(gw) == {"answered": 0, "taken": 0}
    assert gw.gateway.metrics.auth_refused.labels("replayed")._value.get() == 3


async def test_replay_with_an_answered_idempotency_key_repeats_the_answer(start, env, http):
    gw = await start(env)
    body = ndjson(record("dev-1"))
    headers = {**sign_request("dev-1", env.device("dev-1").key, body), "Idempotency-Key": "b-1"}
    first = await post(http, gw, body, headers)
    again = await post(http, gw, body, headers)
    assert first == again and first[0] == 202


async def test_a_request_whose_signature_was_claimed_but_never_answered_goes_on(start, env, http):
    """Its first sending claimed the signature and died unanswered (a killed process: the crash test
    is tests/durability -k resent_as_it_was_sent), after claiming its retry key or before. Its resend
    of the very same bytes is taken once: the retry key, not the signature, keeps it from landing
    twice. Without an Idempotency-Key that holds while the ledger holds its body's key, or has
    forgotten no request since the signature was claimed (test_a_replay_the_ledger_no_longer_knows_gets_401)."""
    gw = await start(env)
    keyed, claimed, unclaimed = (ndjson(record("dev-1", seq=seq)) for seq in (1, 2, 3))
    device_key = env.device("dev-1").key
    keyed_headers = {**sign_request("dev-1", device_key, keyed), "Idempotency-Key": "k-1"}
    claimed_headers, unclaimed_headers = sign_request("dev-1", device_key, claimed), sign_request("dev-1", device_key, unclaimed)
    for headers in (keyed_headers, claimed_headers, unclaimed_headers):
        assert gw.gateway.security.replay.claim(headers["X-Signature"].partition("=")[2], int(headers["X-Timestamp"]))
    # The claim on its body's key a sending that died after claiming it leaves (claimed by this
    # process, which no handler runs now: a retry takes it over).
    digest = hashlib.sha256(claimed).hexdigest()
    assert gw.gateway.ledger.claim_request(body_key("dev-1", digest), digest).outcome == "run"
    for body, headers in ((keyed, keyed_headers), (claimed, claimed_headers), (unclaimed, unclaimed_headers)):
        first = await post(http, gw, body, headers)
        assert first[0] == 202 and first[1]["accepted"] == 1
        assert await post(http, gw, body, headers) == first, "a second resend is answered as the first"
    assert accepted(gw) == 3 and replays(gw) == {"answered": 3, "taken": 3}


async def test_replay_cache_is_bounded(tmp_path, http, start):
    from tests.gateway.conftest import make_env

    env = make_env(tmp_path, n_devices=1, auth={"replay_cache_max_entries": 5})
    gw = await start(env)
    key = env.device("dev-1").key
    for i in range(20):
        body = ndjson(record("dev-1", seq=i))
        headers = sign_request("dev-1", key, body)
        assert (await post(http, gw, body, headers))[0] == 202
    # Two generations of at most five are remembered; the oldest are forgotten and counted.
    assert 5 <= len(gw.gateway.security.replay) <= 10
    assert gw.gateway.metrics.replay_evictions._value.get() == 20 - len(gw.gateway.security.replay)
    newest = headers["X-Signature"].partition("=")[2], int(headers["X-Timestamp"])
    assert not gw.gateway.security.replay.claim(*newest), "the newest signature is still remembered"


async def test_record_for_another_device_gets_403(start, env, http):
    gw = await start(env)
    body = ndjson(record("dev-1"), record("dev-2"))
    status, answer = await post(http, gw, body, sign_request("dev-1", env.device("dev-1").key, body))
    assert status == 403 and "dev-2" in answer["message"]


async def test_disabled_device_gets_403_after_a_reload(start, env, http):
    gw = await start(env)
    env.disable("dev-1")
    gw.gateway.reload(gw.gateway.settings)
    body = ndjson(record("dev-1"))
    status, answer = await post(http, gw, body, sign_request("dev-1", env.device("dev-1").key, body))
    assert status == 403 and "disabled" in answer["message"]


async def test_signature_covers_method_and_path(start, env, http):
    gw = await start(env)
    body = ndjson(record("dev-1"))
    key = env.device("dev-1").key.encode()
    ts = str(int(time.time()))
    digest = hashlib.sha256(body).hexdigest()
    wrong_path = signature(key, ts, "POST", "/v1/other", digest)
    headers = {"X-Device-Id": "dev-1", "X-Timestamp": ts, "X-Signature": f"v1={wrong_path}"}
    assert (await post(http, gw, body, headers))[0] == 401


async def test_refusals_are_counted_and_logged_with_the_address_but_no_key(start, env, http, caplog):
    gw = await start(env)
    key = env.device("dev-1").key
    body = ndjson(record("dev-1"))
    caplog.set_level("INFO", logger="gateway.edge.security")
    await post(http, gw, body, sign_request("dev-1", "bad", body))
    refused = [r for r in caplog.records if r.getMessage() == "device request refused"]
    assert refused and refused[0].source_ip == "127.0.0.1" and refused[0].claimed_device_id == "dev-1"
    assert key not in caplog.text
    assert gw.gateway.metrics.auth_refused.labels("bad_signature")._value.get() == 1


async def test_refusal_reasons_tell_the_operator_what_the_device_is_not_told(tmp_path, start, http):
    """Operator finding 7: logs and auth_refused could not tell unknown device, bad key, skew or replay apart."""
    import time as clock
    from tests.gateway.conftest import make_env

    env = make_env(tmp_path, limits={"dedup_max_keys": 2})
    gw = await start(env)
    key = env.device("dev-1").key
    answers = []
    for device_id, signing_key, now in (("nobody", "x" * 40, None), ("dev-1", "bad", None), ("dev-1", key, clock.time() - 3600)):
        body = ndjson(record(device_id))
        answers.append(await post(http, gw, body, sign_request(device_id, signing_key, body, now=now)))
    body = ndjson(record("dev-1"))
    signed = sign_request("dev-1", key, body)
    assert (await post(http, gw, body, signed))[0] == 202
    await send_newer_requests(http, gw, key)  # the retry ledger forgets it; its signature is kept
    answers.append(await post(http, gw, body, signed))
    assert [a[0] for a in answers] == [401, 401, 401, 401]
    assert answers[0][1] == answers[1][1], "the device sees no difference between unknown and a wrong key"
    counted = {reason: gw.gateway.metrics.auth_refused.labels(reason)._value.get() for reason in
               ("unknown_device", "bad_signature", "stale_timestamp", "replayed")}
    assert counted == {"unknown_device": 1, "bad_signature": 1, "stale_timestamp": 1, "replayed": 1}
