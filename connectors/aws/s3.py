"""``S3Sink``: lands lake objects in an S3 bucket through aiobotocore.

Flow of one ``put_object``::

    key = <prefix><LakeObject.key>            deterministic, so a replay rewrites the same key
    size < multipart_threshold_bytes  ->  PutObject
    otherwise                         ->  CreateMultipartUpload
                                          UploadPart x N   (at most max_parts_in_flight at once)
                                          CompleteMultipartUpload
                                          AbortMultipartUpload on any failure or cancellation

Every request goes through the same two gates: the shared ``RetryPolicy`` (full-jitter backoff under
a deadline, in ``AwsConnector._call``, ``connectors.aws.connector``) and, around each try, the
adaptive concurrency limiter (raised on success, cut on throttles, 503s and timeouts). Every upload carries a checksum (CRC32 or SHA-256) computed off the event loop and
checked by S3 on receipt. ``start()`` aborts multipart uploads this gateway left behind (keys under
the prefix whose base name is ``<gateway_id>-<lsn>-<lsn>[-<tag>].<ext>``), so a crash never leaves orphans billing
storage forever.

Memory: the object body is already in memory (the rolling writer built it); multipart adds at most
``part_size_bytes * max_parts_in_flight`` of part copies on top.

IAM: ``s3:PutObject``, ``s3:PutObjectTagging`` (with tags), ``s3:AbortMultipartUpload`` on
``<bucket>/<prefix>*``; ``s3:ListBucketMultipartUploads`` on the bucket; with SSE-KMS also
``kms:GenerateDataKey`` and ``kms:Decrypt`` (multipart needs both) on the key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlencode

import msgspec
from msgspec import Meta

from connectors.aws import translate
from connectors.aws.connector import AwsConnector, Request, T
from connectors.aws.settings import AwsClientSettings, PositiveSecs
from connectors.base import LakeObject, LandedObject, object_lsns
from connectors.errors import ConnectorError, PermanentError, ThrottledError, TransientError
from connectors.retry import Sleep

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra, imported where a client is made (connectors/aws/client.py)
    from aiobotocore.session import AioSession

    from batching import AdaptiveConcurrency

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
# S3's own limits: parts are 5 MiB..5 GiB (the last may be smaller), at most 10,000 of them.
MIN_PART_BYTES = 5 * MiB
MAX_PART_BYTES = 5 * GiB
MAX_PARTS = 10_000
MAX_TAGS = 10

DEFAULT_MULTIPART_THRESHOLD_BYTES = 64 * MiB
DEFAULT_PART_SIZE_BYTES = 16 * MiB
DEFAULT_MAX_PARTS_IN_FLIGHT = 4
# Checksums of bodies at least this large are computed in a worker thread (hashlib and zlib release the GIL).
OFF_LOOP_CHECKSUM_BYTES = 256 * 1024

BucketName = Annotated[str, Meta(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")]
Concurrency = Annotated[int, Meta(ge=1, le=1024)]
TagKey = Annotated[str, Meta(min_length=1, max_length=128)]
TagValue = Annotated[str, Meta(max_length=256)]


class S3SinkSettings(AwsClientSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where and how lake objects land in S3. Credentials are never configured here (AWS chain only)."""

    bucket: BucketName
    # Prepended to every lake key: "" or a path ending in "/" (e.g. "lake/").
    prefix: str = ""
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    multipart_threshold_bytes: Annotated[int, Meta(ge=MIN_PART_BYTES, le=5 * GiB)] = DEFAULT_MULTIPART_THRESHOLD_BYTES
    part_size_bytes: Annotated[int, Meta(ge=MIN_PART_BYTES, le=MAX_PART_BYTES)] = DEFAULT_PART_SIZE_BYTES
    max_parts_in_flight: Annotated[int, Meta(ge=1, le=64)] = DEFAULT_MAX_PARTS_IN_FLIGHT
    checksum_algorithm: Literal["CRC32", "SHA256"] = "CRC32"
    # Set: SSE-KMS with this key (id, ARN or alias). Empty: the bucket's default encryption.
    kms_key_id: str = ""
    # With SSE-KMS, an S3 Bucket Key cuts KMS requests (and their cost and throttling) by orders of magnitude.
    bucket_key_enabled: bool = True
    storage_class: Literal[
        "STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "REDUCED_REDUNDANCY"
    ] = "STANDARD"
    tags: dict[TagKey, TagValue] = {}
    initial_concurrency: Concurrency = 4
    min_concurrency: Concurrency = 1
    max_concurrency: Concurrency = 64
    read_timeout_secs: PositiveSecs = 60.0
    # Retry budget for start-up work (stale upload cleanup), so a dead S3 never delays start-up for long.
    start_timeout_secs: Annotated[float, Meta(ge=0)] = 10.0

    def __post_init__(self) -> None:
        if self.prefix and (self.prefix.startswith("/") or not self.prefix.endswith("/")):
            raise ValueError("prefix must be empty or a relative path ending in '/', e.g. 'lake/'")
        super().__post_init__()
        if self.part_size_bytes > self.multipart_threshold_bytes:
            raise ValueError("part_size_bytes must not exceed multipart_threshold_bytes")
        if not self.min_concurrency <= self.initial_concurrency <= self.max_concurrency:
            raise ValueError("expected min_concurrency <= initial_concurrency <= max_concurrency")
        if len(self.tags) > MAX_TAGS:
            raise ValueError(f"S3 allows at most {MAX_TAGS} tags per object")


@dataclass(slots=True)
class S3SinkStats:
    """Counters the gateway reads for its metrics (monotonic since start)."""

    requests: int = 0
    retries: int = 0
    throttles: int = 0
    timeouts: int = 0
    request_errors: int = 0
    objects_landed: int = 0
    bytes_landed: int = 0
    multipart_uploads: int = 0
    multipart_aborts: int = 0
    # Aborts that failed too; the next start() removes these uploads.
    orphaned_uploads: int = 0
    stale_uploads_aborted: int = 0


# (operation, outcome, seconds): outcome is ok | throttled | transient | permanent.
RequestObserver = Callable[[str, str, float], None]


class S3Sink(AwsConnector):
    """An ``ObjectSink`` on an S3 bucket."""

    name = "s3"
    service = "s3"

    def __init__(
        self,
        settings: S3SinkSettings,
        *,
        gateway_id: str,
        session: AioSession | None = None,
        limiter: AdaptiveConcurrency | None = None,
        on_request: RequestObserver | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not gateway_id:
            raise ValueError("gateway_id is required: it scopes the stale-upload cleanup to this gateway")
        super().__init__(settings, session=session, sleep=sleep, rng=rng, clock=clock)
        self.settings = settings
        self.gateway_id = gateway_id
        self.stats = S3SinkStats()
        if limiter is None:
            from batching import AdaptiveConcurrency  # with the sink, not with the settings (numpy)

            limiter = AdaptiveConcurrency(
                initial=settings.initial_concurrency, minimum=settings.min_concurrency, maximum=settings.max_concurrency
            )
        self._limiter = limiter
        self._on_request = on_request
        self._clock = clock
        self._object_params = _object_params(settings)

    # -- what the gateway reads -------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        """``s3://<bucket>/<prefix>``: the lake root, as Glue table locations need it."""
        return f"s3://{self.settings.bucket}/{self.settings.prefix}"

    @property
    def concurrency_limit(self) -> int:
        return self._limiter.limit

    @property
    def requests_in_flight(self) -> int:
        return self._limiter.in_flight

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client and abort multipart uploads a previous run of this gateway left behind.

        A ``PermanentError`` (missing bucket, access denied) fails start-up: that is misconfiguration.
        S3 being unreachable does not: the WAL holds records until it returns, and the stale uploads
        are cleaned at the next start (a lifecycle rule on the bucket is the backstop).
        """
        if self._client is not None:
            return
        s = self.settings
        await self._open_client(
            # Never more sockets than the limiter can ever let through.
            max_pool_connections=s.max_concurrency,
            s3={"addressing_style": s.addressing_style},
        )
        try:
            await self.abort_stale_uploads(max_elapsed_secs=s.start_timeout_secs)
        except TransientError as exc:
            log.warning("s3: could not clean up stale multipart uploads at start (will retry next start): %s", exc)
        except BaseException:
            await self.close()
            raise

    # -- landing -----------------------------------------------------------------------------------

    async def put_object(self, obj: LakeObject) -> LandedObject:
        """Land ``obj`` at ``<prefix><obj.key>``; returns once S3 has it durably (idempotent per key)."""
        if self._client is None:
            raise RuntimeError("S3Sink.put_object called before start()")
        key = self.settings.prefix + _checked_key(obj.key)
        if len(obj.body) < self.settings.multipart_threshold_bytes:
            etag = await self._put_single(key, obj)
        else:
            etag = await self._put_multipart(key, obj)
        self.stats.objects_landed += 1
        self.stats.bytes_landed += len(obj.body)
        return LandedObject(
            url=f"s3://{self.settings.bucket}/{key}",
            key=obj.key,
            bytes=len(obj.body),
            records=obj.records,
            zone=obj.partition.zone,
            etag=etag,
        )

    async def _put_single(self, key: str, obj: LakeObject) -> str:
        algorithm = self.settings.checksum_algorithm
        checksum = await _checksum(algorithm, obj.body)
        params = {
            "Bucket": self.settings.bucket,
            "Key": key,
            "Body": obj.body,
            "ContentType": obj.content_type,
            "Metadata": _metadata(obj, self.gateway_id),
            "ChecksumAlgorithm": algorithm,
            f"Checksum{algorithm}": checksum,
            **self._object_params,
        }

        async def put() -> dict[str, Any]:
            response = await self._client.put_object(**params)
            echoed = response.get(f"Checksum{algorithm}")
            if echoed is not None and echoed != checksum:
                message = f"S3 stored checksum {echoed} for {key}, expected {checksum}"
                raise TransientError(message, endpoint=self._endpoint)
            return response

        response = await self._call("PutObject", put)
        return _etag(response)

    async def _put_multipart(self, key: str, obj: LakeObject) -> str:
        s = self.settings
        algorithm = s.checksum_algorithm
        created = await self._call(
            "CreateMultipartUpload",
            lambda: self._client.create_multipart_upload(
                Bucket=s.bucket,
                Key=key,
                ContentType=obj.content_type,
                Metadata=_metadata(obj, self.gateway_id),
                ChecksumAlgorithm=algorithm,
                **self._object_params,
            ),
        )
        upload_id = created["UploadId"]
        self.stats.multipart_uploads += 1
        try:
            parts = await self._upload_parts(key, upload_id, obj.body)
            return await self._complete(key, upload_id, parts, len(obj.body))
        except BaseException:
            # Also on cancellation (drain deadline): an unfinished upload must not outlive us.
            await self._abort(key, upload_id)
            raise

    async def _upload_parts(self, key: str, upload_id: str, body: bytes) -> list[dict[str, Any]]:
        s = self.settings
        algorithm = s.checksum_algorithm
        # Objects beyond 10,000 parts get bigger parts rather than failing.
        part_size = max(s.part_size_bytes, math.ceil(len(body) / MAX_PARTS))
        count = math.ceil(len(body) / part_size)
        parts: list[dict[str, Any]] = [{} for _ in range(count)]
        slots = asyncio.Semaphore(s.max_parts_in_flight)

        async def upload(index: int) -> None:
            try:
                # Sliced only once a slot is held: at most max_parts_in_flight copies exist at once.
                chunk = body[index * part_size : (index + 1) * part_size]
                checksum = await _checksum(algorithm, chunk)
                response = await self._call(
                    "UploadPart",
                    lambda: self._client.upload_part(
                        Bucket=s.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=index + 1,
                        Body=chunk,
                        ChecksumAlgorithm=algorithm,
                        **{f"Checksum{algorithm}": checksum},
                    ),
                )
                parts[index] = {"PartNumber": index + 1, "ETag": response["ETag"], f"Checksum{algorithm}": checksum}
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as group:
                for index in range(count):
                    await slots.acquire()
                    group.create_task(upload(index))
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        return parts

    async def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]], size: int) -> str:
        attempts = 0

        async def complete() -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            try:
                return await self._client.complete_multipart_upload(
                    Bucket=self.settings.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            except Exception as exc:
                # An earlier attempt may have completed the upload and only lost its response.
                if attempts > 1 and translate.error_code(exc) == "NoSuchUpload":
                    head = await self._client.head_object(Bucket=self.settings.bucket, Key=key)
                    if head.get("ContentLength") == size and _etag(head).endswith(f"-{len(parts)}"):
                        return head
                raise

        return _etag(await self._call("CompleteMultipartUpload", complete))

    async def _abort(self, key: str, upload_id: str) -> None:
        """Best effort, under a short budget; a failure is counted and left to the next start()."""
        try:
            await self._call(
                "AbortMultipartUpload",
                lambda: self._client.abort_multipart_upload(Bucket=self.settings.bucket, Key=key, UploadId=upload_id),
                max_elapsed_secs=self.settings.start_timeout_secs,
            )
            self.stats.multipart_aborts += 1
        except ConnectorError as exc:
            if translate.cause_code(exc) == "NoSuchUpload":
                return
            self.stats.orphaned_uploads += 1
            log.warning("s3: could not abort multipart upload %s of %s: %s", upload_id, key, exc)

    # -- start-up cleanup --------------------------------------------------------------------------

    def owns(self, key: str) -> bool:
        """Whether ``key`` was written by this gateway: its base name is ``<gateway_id>-<lsn>-<lsn>-<tag>.<ext>``
        (without the tag, from an earlier version).

        Matching the whole name pattern, not just the id as a prefix, keeps gateway ``gw`` away from
        the uploads of ``gw-2`` and ``gw1`` (their names also start with ``gw``).
        """
        return object_lsns(key.rsplit("/", 1)[-1], self.gateway_id) is not None

    async def abort_stale_uploads(self, *, max_elapsed_secs: float | None = None) -> int:
        """Abort every multipart upload under the prefix that this gateway owns; returns how many.

        Call only while this gateway has no upload of its own in progress (start-up).
        """
        s = self.settings
        aborted = 0
        markers: dict[str, str] = {}
        while True:
            page = await self._call(
                "ListMultipartUploads",
                lambda: self._client.list_multipart_uploads(Bucket=s.bucket, Prefix=s.prefix, **markers),
                max_elapsed_secs=max_elapsed_secs,
            )
            for upload in page.get("Uploads", []):
                key, upload_id = upload["Key"], upload["UploadId"]
                if not self.owns(key):
                    continue
                try:
                    await self._call(
                        "AbortMultipartUpload",
                        lambda: self._client.abort_multipart_upload(Bucket=s.bucket, Key=key, UploadId=upload_id),
                        max_elapsed_secs=max_elapsed_secs,
                    )
                except PermanentError as exc:
                    if translate.cause_code(exc) != "NoSuchUpload":
                        raise
                    continue
                aborted += 1
                log.info("s3: aborted stale multipart upload %s of %s", upload_id, key)
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}
        self.stats.stale_uploads_aborted += aborted
        return aborted

    # -- the limiter around every try ---------------------------------------------------------------

    async def _attempt(self, operation: str, request: Request[T]) -> T:
        """One try under a limiter permit: throttles, 503s and timeouts cut the limit, successes raise it."""
        async with self._limiter.acquire() as permit:
            self.stats.requests += 1
            started = self._clock()
            try:
                response = await request()
            except Exception as exc:
                elapsed = self._clock() - started
                error = self._translate(exc)
                if error is None:
                    permit.failure()
                    raise
                if translate.is_congestion(exc):
                    permit.backpressure()
                else:
                    permit.failure()
                self._count_failure(operation, exc, error, elapsed)
                if error is exc:
                    raise
                raise error from exc
            elapsed = self._clock() - started
            permit.success(elapsed)
            if self._on_request is not None:
                self._on_request(operation, "ok", elapsed)
            return response

    def _count_failure(self, operation: str, exc: BaseException, error: ConnectorError, elapsed: float) -> None:
        self.stats.request_errors += 1
        if isinstance(error, ThrottledError):
            self.stats.throttles += 1
            outcome = "throttled"
        elif isinstance(error, TransientError):
            outcome = "transient"
        else:
            outcome = "permanent"
        if translate.is_timeout(exc):
            self.stats.timeouts += 1
        if self._on_request is not None:
            self._on_request(operation, outcome, elapsed)

    def _on_retry(self, operation: str, retry: int, delay: float, error: TransientError) -> None:
        self.stats.retries += 1
        super()._on_retry(operation, retry, delay, error)


# -- helpers -------------------------------------------------------------------------------------


def _object_params(settings: S3SinkSettings) -> dict[str, Any]:
    """Parameters shared by PutObject and CreateMultipartUpload: storage class, encryption, tags."""
    params: dict[str, Any] = {"StorageClass": settings.storage_class}
    if settings.kms_key_id:
        params["ServerSideEncryption"] = "aws:kms"
        params["SSEKMSKeyId"] = settings.kms_key_id
        params["BucketKeyEnabled"] = settings.bucket_key_enabled
    if settings.tags:
        params["Tagging"] = urlencode(settings.tags)
    return params


def _metadata(obj: LakeObject, gateway_id: str) -> dict[str, str]:
    """User metadata: enough to trace an object back to its WAL range without reading it."""
    return {
        **obj.metadata,
        "gateway-id": gateway_id,
        "records": str(obj.records),
        "first-lsn": str(obj.first_lsn),
        "last-lsn": str(obj.last_lsn),
        "min-event-ms": str(obj.min_event_ms),
        "max-event-ms": str(obj.max_event_ms),
    }


def _checked_key(key: str) -> str:
    """Lake keys are relative paths; refuse anything that could escape the prefix."""
    segments = key.split("/")
    if not key or key.startswith("/") or any(seg in ("", ".", "..") for seg in segments) or "\\" in key:
        raise PermanentError(f"refusing lake key {key!r}: expected a relative path without '.', '..' or empty segments")
    return key


def checksum(algorithm: str, data: bytes) -> str:
    """The base64 checksum S3 expects in ``x-amz-checksum-<algorithm>``."""
    if algorithm == "CRC32":
        digest = zlib.crc32(data).to_bytes(4, "big")
    elif algorithm == "SHA256":
        digest = hashlib.sha256(data).digest()
    else:
        raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
    return base64.b64encode(digest).decode("ascii")


async def _checksum(algorithm: str, data: bytes) -> str:
    if len(data) >= OFF_LOOP_CHECKSUM_BYTES:
        return await asyncio.to_thread(checksum, algorithm, data)
    return checksum(algorithm, data)


def _etag(response: dict[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"')


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to raise for a failed TaskGroup: a connector error if there is one."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for error in leaves:
        if isinstance(error, ConnectorError):
            return error
    return leaves[0]
