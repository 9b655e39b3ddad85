"""Steps 1-6 for one request: receive, authenticate, validate, enrich, persist, acknowledge."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import hdrs, web

from gateway.auth.hmac import Principal
from gateway.ingest.admit import Admitted, admit
from gateway.responses import error_response, json_response
from gateway.ingest.body import decompressor, framer
from gateway.edge.connections import BodyDeadline
from gateway.ingest.enrich import new_context
from gateway.errors import ApiError, CannotPersist, KeyReused, MalformedBody, Replayed, TooLarge, Unauthorized, Unavailable
from gateway.ingest.validate import RequestBatch
from gateway.durable.retry_ledger import LedgerError, body_key, idempotency_key
from gateway.service import GATEWAY, Gateway
from gateway.ingest.spool import Spool, SpoolFull
from gateway.durable.wal import WalError, WalFull, WalNoSpace

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 256 * 1024
# Bodies up to this size (about a thousand records), uncompressed, are decoded on the event loop: a
# hop to the decode thread and back costs more than the few milliseconds this holds the loop (with
# 300-record bodies, 7% less CPU per record at a fixed load, docs/performance.md). A larger or
# compressed body is decoded in the decode thread, so it never holds up other devices for long.
INLINE_DECODE_BYTES = 256 * 1024
ROUTE = "/v1/telemetry"


async def post_telemetry(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    started = time.perf_counter()
    gw.request_started()
    try:
        response = await _ingest(request, gw)
    except ApiError as exc:
        if exc.status in (401, 403, 429):
            gw.security.refused(exc, request)
        response = error_response(exc)
    except (LedgerError, SpoolFull) as exc:
        gw.metrics.stage_errors.labels("receive", type(exc).__name__).inc()
        response = error_response(Unavailable(f"the gateway cannot take requests right now; retry ({exc})", retry_after_secs=1))
    except Exception:
        log.exception("unexpected error while ingesting")
        gw.metrics.stage_errors.labels("receive", "internal").inc()
        response = json_response(500, {"error": "internal", "message": "the gateway failed; nothing was acknowledged"})
    finally:
        gw.request_finished()
    gw.metrics.http_requests.labels(ROUTE, str(response.status)).inc()
    gw.metrics.http_duration.labels(ROUTE).observe(time.perf_counter() - started)
    return response


async def expect_after_admission(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` is answered once the request is admitted (``continue_if_expected``),
    so a refused device hears why before it sends its body; any other expectation is refused."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() == "100-continue":
        return None
    return json_response(417, {"error": "expectation_failed", "message": f"Expect {expect[:64]!r} is not supported; only 100-continue"})


async def continue_if_expected(request: web.Request) -> None:
    if request.version == aiohttp.HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's body


async def _ingest(request: web.Request, gw: Gateway) -> web.Response:
    admitted = admit(request, gw)  # every refusal that needs no body
    try:
        await continue_if_expected(request)
        digest, sent = await _receive(request, admitted.raw, gw.settings.limits)  # 1 receive: read and hash only
        admitted.body_received_at = time.monotonic()
        idem_key = request.headers.get("Idempotency-Key")
        principal = _authenticate(gw, admitted, request, digest, idem_key)  # 2 authenticate
        if isinstance(principal, web.Response):
            return principal  # a replay of a request already answered
        try:
            body = Received(admitted.raw, admitted.fmt, admitted.encoding, sent, digest, idem_key, admitted.rate_key, admitted.peer_address)
            return await _accept(gw, principal, body, admitted.frames)  # 3-6 validate, enrich, persist, answer
        except Exception:
            if principal.replay_key:
                gw.security.replay.release(principal.replay_key)  # nothing of it landed: the device may resend it
            raise
    finally:
        admitted.release()


def _authenticate(gw: Gateway, admitted: Admitted, request: web.Request, digest: str, idem_key: str | None) -> Principal | web.Response:
    """Step 2 over the body as sent: the device, or the first answer to a request sent again as it was."""
    try:
        return gw.authenticator.finish(admitted.pending, request.method, request.path, digest)
    except Replayed as replay:
        key = _retry_key(getattr(admitted.pending, "device_id", None) or "", idem_key, digest)
        answered = gw.ledger.answer_for(key, digest)
        if answered is not None:
            gw.metrics.replays.labels("answered").inc()
            return _replayed(answered)  # a device that lost the answer sent it again as it was
        if replay.device is not None and _runs_once(gw, key, digest, replay.signature):
            # Not answered: its first sending died with a killed process, or still runs. The retry
            # ledger runs its key once whoever sends it, so the device's resend of the very same bytes
            # (signed again within the same second, or resent) goes on; never a duplicate.
            gw.metrics.replays.labels("taken").inc()
            return replay.device
        raise
    except Unauthorized:
        if admitted.source is not None:
            gw.security.failures.charge(admitted.source, 1, 0)  # failures cost the source, never a device
        raise


def _runs_once(gw: Gateway, key: bytes, digest: str, signature: str) -> bool:
    """Whether a replayed request would still run once under its retry key: the ledger holds that
    key, or has forgotten no request claimed since the signature was (so the key was never claimed).
    One the ledger has forgotten (a busy instance keeps the last one to two generations of requests,
    the signature the whole timestamp window) would land again."""
    return key in gw.running_requests or gw.ledger.holds_request(key, digest) or gw.ledger.holds_every_request_since(signature)


def _retry_key(device_id: str, idem_key: str | None, digest: str) -> bytes:
    """The key a request runs once under: its Idempotency-Key, or else its body's hash."""
    return idempotency_key(device_id, idem_key[:256]) if idem_key else body_key(device_id, digest)


@dataclass(frozen=True, slots=True)
class Received:
    """A request body as sent, read whole and hashed, with what its headers said about it."""

    raw: Spool
    fmt: str
    encoding: str
    sent: int
    digest: str
    idem_key: str | None
    rate_key: str
    source_ip: str | None


async def _accept(gw: Gateway, principal: Principal, body: Received, spool: Spool) -> web.Response:
    """Steps 3-6 for an authenticated body: decode, validate and enrich, persist once, answer."""
    ctx = new_context(
        gateway_id=gw.gateway_id,
        availability_zone=gw.availability_zone,
        device_id=principal.device_id,
        device_metadata=principal.metadata,
        clock_skew_ms=principal.clock_skew_ms,
        source_ip=body.source_ip,
    )
    device_id = ctx.device_id or ""
    # A retry of this request (same Idempotency-Key, or else the same body) lands nothing twice.
    key = _retry_key(device_id, body.idem_key, body.digest)
    for validation in range(MAX_VALIDATIONS):
        if validation:
            spool.clear()  # records of this device became durable meanwhile: some may be duplicates now
        batch, decoded = await _validate(gw, body, ctx, spool)
        if not validation:
            gw.metrics.request_bytes.inc(body.sent)
            gw.security.limiter.charge(body.rate_key, batch.records, decoded)  # what the device sent, decompressed
        if batch.records == 0:
            raise MalformedBody("the body holds no records")
        response = await _once(gw, key, body.digest, batch, lambda: _persist_claimed(gw, body, batch, spool, key))
        if response is not None:
            return response
    raise Unavailable("other requests keep writing this device's records; retry", retry_after_secs=1)


# Times a request is validated again because other requests of its device became durable meanwhile,
# and its new records checked again in between (cheaper: the frames hold if none is a duplicate now).
MAX_VALIDATIONS = 4
MAX_RECHECKS = 8


async def _validate(gw: Gateway, body: Received, ctx, spool: Spool) -> tuple[RequestBatch, int]:
    """Steps 3-4: the batch of frames the body's records make, and the bytes it decoded to."""
    limits = gw.settings.limits
    batch = RequestBatch(
        ctx,
        body.fmt,
        spool=spool,
        policy=gw.partition_policy,
        seq_index=gw.ledger.reader(),
        max_records=limits.max_records_per_request,
        max_errors_reported=limits.max_errors_reported,
        max_tracked_seqs=limits.dedup_max_keys_per_request,
    )
    # A large or compressed body is decoded in the worker's decode thread.
    args = (body.raw, body.fmt, body.encoding, batch, limits)
    if body.sent <= INLINE_DECODE_BYTES and body.encoding.strip().lower() in ("", "identity"):
        async with gw.loop_share:  # one decode per turn of the loop, so it reads its sockets in between
            decoded = _decode(*args)
    else:
        decoded = await asyncio.get_running_loop().run_in_executor(gw.decoder, _decode, *args)
    return batch, decoded


async def _once(gw: Gateway, key: bytes, digest: str, batch: RequestBatch, run) -> web.Response | None:
    """Run a request under its retry key once per instance; a retry gets the first answer again.
    None: records of its device became durable since ``batch`` was validated; validate it again."""
    loop = asyncio.get_running_loop()
    waited_until = loop.time() + RUNNING_ELSEWHERE_WAIT_SECS
    spans = batch.seq_spans()
    rechecks = 0
    while True:
        # Looked at again before every claim: the ledger lets this process claim a key it already
        # holds, so only this map keeps two of its handlers (retries woken together) from both running it.
        running = gw.running_requests.get(key)
        if running is not None:  # the same key is running in this worker
            if running[0] != digest:
                raise KeyReused(_KEY_REUSED)
            answer = await asyncio.shield(running[1])
            if answer is not None:
                return _replayed(answer)
            continue  # it failed: run it, unless another waiter already does
        try:
            claim = gw.ledger.claim_request(key, digest, spans)
        except LedgerError as exc:
            raise Unavailable(f"the gateway cannot record this request right now; retry ({exc})", retry_after_secs=1) from None
        if claim.outcome == "answered":
            return _replayed(claim.answer)
        if claim.outcome == "conflict":
            raise KeyReused(_KEY_REUSED)
        if claim.outcome == "run":
            break
        if claim.outcome == "stale":
            rechecks += 1
            spans = batch.seq_spans_if_still_new() if rechecks <= MAX_RECHECKS else None
            if spans is None:
                return None
            continue
        if loop.time() > waited_until:  # another worker is still running it, or records it holds too
            raise Unavailable("an identical request, or one with the same records, is still being processed; retry", retry_after_secs=1)
        await asyncio.sleep(0.02)
    future: asyncio.Future[bytes | None] = loop.create_future()
    gw.running_requests[key] = (digest, future)
    answer = None
    try:
        answer = await run()
    except asyncio.CancelledError:
        # Its handler is gone (a drain past its deadline) but the request may wait in the WAL: the
        # claim ends once the WAL has written or refused it, or a retry in between (in this worker
        # or another) would land it a second time.
        gw.pipeline.wal.once_settled(lambda: _run_ended(gw, key, future, spans, None))
        raise
    except BaseException:
        _run_ended(gw, key, future, spans, None)
        raise
    _run_ended(gw, key, future, spans, answer)
    return _answer_response(answer)


def _run_ended(gw: Gateway, key: bytes, future: asyncio.Future, spans, answer: bytes | None) -> None:
    del gw.running_requests[key]
    future.set_result(answer)
    if answer is None and not gw.ledger.closed:  # nothing of it landed: a retry must run it
        gw.ledger.release_request(key, [span.device_id for span in spans])


_KEY_REUSED = "this Idempotency-Key was already used with a different body; use a new key for new data"
RUNNING_ELSEWHERE_WAIT_SECS = 10.0


def _answer_response(answer: bytes) -> web.Response:
    """A stored answer is its status (3 digits) followed by its JSON body."""
    return web.Response(status=int(answer[:3]), body=answer[3:], content_type="application/json")


def _replayed(answer: bytes) -> web.Response:
    response = _answer_response(answer)
    response.headers["Idempotent-Replayed"] = "true"
    return response


async def _receive(request: web.Request, raw: Spool, limits) -> tuple[str, int]:
    """Read the body as sent into ``raw``; return its SHA-256 and size. Nothing is decoded here."""
    hasher = hashlib.sha256()
    sent = 0
    gw = request.app[GATEWAY]
    admission = gw.security.admission
    try:
        async with BodyDeadline(gw.settings.connections) as deadline:
            async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
                deadline.progress(len(chunk))
                admission.inflight_bytes += len(chunk)
                sent += len(chunk)
                if sent > limits.max_body_bytes:
                    raise TooLarge(f"the body is larger than {limits.max_body_bytes} bytes")
                hasher.update(chunk)
                raw.add(chunk)
    except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError):
        raise MalformedBody("the body ended before its declared length") from None
    finally:
        admission.inflight_bytes -= sent
    return hasher.hexdigest(), sent


def _decode(raw: Spool, fmt: str, encoding: str, batch: RequestBatch, limits) -> int:
    """Decompress, frame and validate an authenticated body into ``batch``; return the bytes it decoded to."""
    inflate = decompressor(encoding)
    frame = framer(fmt, max_record_bytes=limits.max_record_bytes, max_document_bytes=limits.max_document_bytes)
    decoded = 0
    try:
        for chunks in raw.chunks():
            for chunk in chunks:
                for piece in inflate.feed(chunk):
                    decoded += len(piece)
                    if decoded > limits.max_decompressed_bytes:
                        raise TooLarge(f"the body decompresses to more than {limits.max_decompressed_bytes} bytes")
                    batch.add(frame.feed(piece))
        for piece in inflate.finish():
            decoded += len(piece)
            if decoded > limits.max_decompressed_bytes:
                raise TooLarge(f"the body decompresses to more than {limits.max_decompressed_bytes} bytes")
            batch.add(frame.feed(piece))
        batch.add(frame.finish())
    finally:
        # Drop the decompressor now: an error's traceback must not keep its window (up to 8 MiB) alive.
        inflate = frame = None
    return decoded


async def _persist_claimed(gw: Gateway, body: Received, batch: RequestBatch, spool: Spool, key: bytes) -> bytes:
    """``_persist`` for a request whose key this handler claimed: its frames are final, so the body
    as sent (read again only to validate anew) is let go before the wait for the WAL."""
    body.raw.close()
    return await _persist(gw, batch, spool, key, body.digest)


async def _persist(gw: Gateway, batch: RequestBatch, spool, key: bytes, digest: str) -> bytes:
    """Step 5, then the answer (status and JSON) the device gets, and any retry of it gets."""
    metrics = gw.metrics
    wal = gw.pipeline.wal
    if spool.bytes > wal.max_total_bytes - wal.segment_bytes:
        raise TooLarge(f"the request needs {spool.bytes} bytes of write-ahead log; this gateway's WAL holds {wal.max_total_bytes}")
    if batch.accepted == 0 and batch.duplicates == 0:
        # Every record was invalid; they are kept in quarantine, and the device is told plainly.
        status, body = 422, {"error": "invalid_records", "message": f"all {batch.rejected} records are invalid", "errors": batch.errors}
    else:
        status, body = 202, {
            "accepted": batch.accepted + batch.duplicates,
            "rejected": batch.rejected,
            "duplicates": batch.duplicates,
            "ingest_id": batch.ctx.ingest_id,
            "errors": batch.errors,
        }
    answer = b"%d" % status + orjson.dumps(body)
    try:
        await gw.pipeline.persist(spool, batch.new_seqs, (key, digest, answer), batch.span_keys(key))  # returns once fsynced
    except WalFull:
        raise CannotPersist("the write-ahead log is full; retry later", retry_after_secs=gw.settings.wal.retry_after_secs) from None
    except (WalNoSpace, SpoolFull):
        metrics.stage_errors.labels("persist", "no_space").inc()
        raise CannotPersist("the gateway's disk is full; retry later", retry_after_secs=gw.settings.wal.retry_after_secs) from None
    except WalError as exc:
        metrics.stage_errors.labels("persist", type(exc).__name__).inc()
        raise CannotPersist("the gateway cannot persist records right now; retry", retry_after_secs=1) from None
    for reason, count in batch.rejections.items():
        metrics.records_rejected.labels(reason).inc(count)
    if batch.rejected:
        metrics.records.labels("rejected").inc(batch.rejected)
    metrics.records.labels("accepted").inc(batch.accepted)
    if batch.duplicates:
        metrics.records.labels("duplicate").inc(batch.duplicates)
    return answer
