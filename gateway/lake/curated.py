"""Steps 8 and 9: score records through the adaptive batcher, then land them as Parquet.

The curated zone is one more WAL consumer. Before its frames join objects they are *prepared*:
decoded from their raw lines, shaped into the model's input, scored, and turned into an Arrow
table with an ``inference`` column. Scoring never blocks the lake: a record that cannot be scored
within ``inference.max_defer_secs`` lands with ``inference.status = "deferred"``, one whose call
failed lands as ``"failed"``.

Work is per frame, not per record: a frame (one request's records for one hour) is one batcher
item of ``size`` records, and columns are built with one comprehension or one Arrow call each.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batching import Batcher, BatchPolicy, Deferred, Failed, Ok, QueueFullError
from connectors.inference import pool_batching
from connectors.curated_parquet import CONTENT_TYPE, CURATED_SCHEMA, INFERENCE_TYPE, writer_options
from connectors.inference.base import Inferencer, ShapedBatch
from connectors.inference.pool import InferencePool
from connectors.inference.local_model import LocalModelInferencer
from gateway.ops.metrics import GatewayMetrics
from gateway.ingest.records import CuratedRequest, CuratedSource
from gateway.allocator import tune_allocators
from gateway.durable.wal import KIND_RECORDS_SHARED, Frame, expanded_bytes

log = logging.getLogger(__name__)

_raw_lines = msgspec.json.Decoder(CuratedSource)
_request_fields = msgspec.json.Decoder(CuratedRequest)
_REST_START = re.compile(rb"\n,")  # a line break then a comma only ever starts a rest (wal.shared_payload); 2x bytes.replace's speed
_PR_SET_PDEATHSIG = 1
_METRICS = CURATED_SCHEMA.field("metrics").type
_TAGS = CURATED_SCHEMA.field("tags").type
_TS = CURATED_SCHEMA.field("event_time").type


# Rows per Parquet row group of a curated object (~13 MiB of columns, ~1.5 MiB compressed): what an
# open object holds uncompressed, and what a reader skips or reads at a time.
ROW_GROUP_ROWS = 32_768
# An object that ends with fewer rows is written without dictionaries (a backfill's objects, one per
# hour): over so few rows a dictionary costs bytes instead of saving them, and a third of the CPU.
SMALL_OBJECT_ROWS = 1_000
SMALL_CHUNK_ROWS = 64  # frames of fewer records on average are combined before a row group is written
SMALL_TABLES_HELD = 4  # an object's small tables from this many reads are combined into one
TABLE_BYTES = 16 * 1024  # what a table costs beyond its values (buffers, objects): counted as held


@dataclass(frozen=True, slots=True)
class ScoredFrame(Frame):
    """A WAL frame with its records as a curated Arrow table, ready for a Parquet object.

    The table replaces the payload: an open object holds only its columns (a dead-letter object
    is rebuilt from the WAL), and ``source_bytes`` keeps the size ``target_object_bytes`` measures.
    """

    table: pa.Table
    source_bytes: int

    @classmethod
    def of(cls, frame: Frame, table: pa.Table) -> ScoredFrame:
        kept = {f.name: getattr(frame, f.name) for f in fields(Frame)}
        return cls(**{**kept, "payload": b""}, table=table, source_bytes=expanded_bytes(frame))


@dataclass(slots=True)
class Scores:
    """Model output for one chunk's shaped rows."""

    scores: np.ndarray
    labels: list[str]
    model: str
    version: str
    latency_ms: float


class ParquetBuilder:
    """Writes per-frame Arrow tables into one Parquet object (zstd) as they come, a row group at a
    time: an open object holds at most one row group's columns and the compressed bytes before them
    (about a tenth), where holding every column until the end cost ~50 MiB per object of 32 MiB."""

    extension = "parquet"
    content_type = CONTENT_TYPE

    def __init__(self, zstd_level: int = 1, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._settled = self._settled_rows = 0  # tables and rows before the last read's frames
        self._held_columns = 0  # bytes of the tables before the last read's
        self._row_group_rows = row_group_rows
        self._level = zstd_level
        self._sink = pa.BufferOutputStream()
        self._writer: pq.ParquetWriter | None = None
        self.size = 0
        self.held = 0  # bytes of columns and of Parquet written, as of the last read

    def add(self, frame: ScoredFrame) -> None:
        self.size += frame.source_bytes
        self._tables.append(frame.table)
        self._rows += frame.table.num_rows
        if self._rows >= self._row_group_rows:
            self._write_row_group()

    def settle(self) -> None:
        """A read's frames are all added: frames of a few records each (a backfill's, one per hour)
        become one table, and an object's small tables from several reads one table. Each frame's
        table is a slice of its whole read's columns, which it keeps alive, and a table costs its
        own buffers and objects besides: an object left open across reads held all of them."""
        first = self._settled  # where the last read's tables begin
        if self._rows - self._settled_rows < SMALL_CHUNK_ROWS * (len(self._tables) - first):
            if len(self._tables) > SMALL_TABLES_HELD and self._rows < SMALL_CHUNK_ROWS * len(self._tables):
                first, self._held_columns = 0, 0
            if len(self._tables) - first > 1:
                self._tables[first:] = [pa.concat_tables(self._tables[first:]).combine_chunks()]
        self._held_columns += sum(t.nbytes for t in self._tables[first:])
        self._settled, self._settled_rows = len(self._tables), self._rows
        self.held = self._held_columns + len(self._tables) * TABLE_BYTES + self._sink.tell()

    def finish(self) -> bytes:
        if self._writer is None:  # the whole object is this row group (none at all: a valid, empty object)
            self._open_writer(dictionaries=self._rows >= SMALL_OBJECT_ROWS)
        self._write_row_group()
        self._writer.close()
        return self._sink.getvalue().to_pybytes()

    def _write_row_group(self) -> None:
        if not self._tables:
            return
        # Cut across the frames' tables as they are: combining them first would copy the columns. Frames
        # of a few records each (a backfill's, one per hour) are combined: Parquet writes chunk by chunk,
        # and 300 one-record chunks took 2.3 times as long to write as one chunk of 300.
        table = pa.concat_tables(self._tables)
        if table.num_rows < SMALL_CHUNK_ROWS * len(self._tables):
            table = table.combine_chunks()
        self._tables, self._rows = [], 0
        self._settled = self._settled_rows = self._held_columns = 0
        if self._writer is None:
            self._open_writer()
        self._writer.write_table(table, row_group_size=table.num_rows)

    def _open_writer(self, dictionaries: bool = True) -> None:
        options = writer_options(self._level) | ({} if dictionaries else {"use_dictionary": False})
        self._writer = pq.ParquetWriter(self._sink, CURATED_SCHEMA, **options)


class CuratedScorer:
    """Scores chunks of records through an adaptive batcher in front of the inference backend."""

    def __init__(self, settings, metrics: GatewayMetrics, *, in_lake_process: bool = False) -> None:
        self.settings = settings
        self.metrics = metrics
        self.inferencer = build_inferencer(settings)
        typical = _typical_values(settings.features)
        self.typical = np.array([typical[f] for f in settings.features], dtype=np.float32)
        offload = settings.offload
        if offload == "auto":
            offload = "thread" if in_lake_process else "process"
        self.decoder = FrameDecoder(offload)
        policy = BatchPolicy(max_batch=settings.max_batch_records, max_wait_secs=settings.max_wait_ms / 1000)
        self.batcher: Batcher[ShapedBatch, Scores] = Batcher(
            self._dispatch, endpoints=[self.inferencer.name], model=settings.model, policy=policy,
            max_queue_records=settings.max_queue_records, is_backpressure=pool_batching.is_backpressure,
        )
        self.listeners: list[Callable[[list[ScoredFrame]], None]] = []  # `edge-gateway tap --stage scored`

    async def start(self) -> None:
        await self.inferencer.start()
        self.batcher.start()
        # While no endpoint is ready, records wait in the batcher (deferred at their deadline).
        pool_batching.follow_availability(self.inferencer, self.batcher, self.inferencer.name)
        self.decoder.start()

    async def close(self) -> None:
        await self.batcher.close(flush=False)
        await self.inferencer.close()
        await self.decoder.aclose()

    async def score(self, chunks: Sequence[ShapedBatch]) -> list[pa.StructArray]:
        """One ``inference`` column per chunk; never raises for a backend failure."""
        deadline = self.batcher.clock.now() + self.settings.max_defer_secs
        futures = []
        for chunk in chunks:
            size = max(1, len(chunk.rows))
            try:
                # Queue the whole group before the scheduler runs, so it can batch across frames.
                futures.append(self.batcher.submit_nowait(chunk, deadline, size=size))
            except QueueFullError:
                futures.append(await self.batcher.submit(chunk, deadline, size=size))
        columns = []
        counts = {"ok": 0, "failed": 0, "deferred": 0}
        for chunk, future in zip(chunks, futures, strict=True):
            outcome = await future
            if isinstance(outcome, Ok):
                column = _scored_column(chunk, outcome.value)
                counts["ok"] += len(chunk.rows)
                counts["failed"] += chunk.n_records - len(chunk.rows)  # rejected before scoring
            elif isinstance(outcome, Deferred):
                column = _status_column(chunk.n_records, "deferred", f"not scored within {self.settings.max_defer_secs} s ({outcome.reason})")
                counts["deferred"] += chunk.n_records
            else:
                assert isinstance(outcome, Failed)
                column = _status_column(chunk.n_records, "failed", f"{type(outcome.error).__name__}: {outcome.error}")
                counts["failed"] += chunk.n_records
            columns.append(column)
        self._count(counts)
        return columns

    async def _dispatch(self, endpoint: str, chunks: list[ShapedBatch]) -> list[Scores]:
        sizes = [len(chunk.rows) for chunk in chunks]
        started = time.perf_counter()
        if sum(sizes):
            features = np.concatenate([chunk.features for chunk in chunks if len(chunk.rows)])
            output = await pool_batching.infer(self.inferencer, features, timeout_secs=self.settings.call_timeout_secs)
            scores, labels, model, version = output.scores, list(output.labels), output.model, output.version
        else:
            scores, labels, model, version = np.empty(0, np.float32), [], self.settings.model, ""
        latency_ms = (time.perf_counter() - started) * 1000
        self.metrics.inference_batch_size.observe(sum(sizes))
        self.metrics.inference_latency.labels(endpoint).observe(latency_ms / 1000)
        results, at = [], 0
        for n in sizes:
            results.append(Scores(scores[at : at + n], labels[at : at + n], model, version, latency_ms))
            at += n
        return results

    def _count(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            if n:
                self.metrics.inference_records.labels(status).inc(n)
        stats = self.batcher.stats()
        self.metrics.inference_desired_capacity.set(stats.desired_slots)
        if isinstance(self.inferencer, InferencePool):
            for status in self.inferencer.status():
                self.metrics.inference_idle.labels(status.name).set(status.idle_secs)


_FAILED_OR_OK = pa.array(["failed", "ok"], pa.string())


def _scored_column(chunk: ShapedBatch, result: Scores) -> pa.StructArray:
    """The ``inference`` column of a scored chunk, built by Arrow (this runs on the event loop:
    no Python object per record). Records left out of the tensor are ``failed`` with their reason."""
    n = chunk.n_records
    every_row = len(chunk.rows) == n
    if every_row:  # the common case: the tensor's rows are the records, in order
        status = pa.repeat(pa.scalar("ok", pa.string()), n)
        score = np.asarray(result.scores, dtype=np.float32)
        label = pa.array(result.labels, pa.string())
    else:
        scored = np.zeros(n, dtype=np.int8)
        scored[chunk.rows] = 1
        status = _FAILED_OR_OK.take(pa.array(scored))
        score = np.full(n, np.nan, dtype=np.float32)
        score[chunk.rows] = result.scores
        position = np.zeros(n, dtype=np.int64)
        position[chunk.rows] = np.arange(len(chunk.rows))
        label = pa.array(result.labels, pa.string()).take(pa.array(position, mask=scored == 0))
    if chunk.rejected:
        reasons: list[str | None] = [None] * n
        for index, why in chunk.rejected.items():
            reasons[index] = why
        reason = pa.array(reasons, pa.string())
    else:
        reason = pa.nulls(n, pa.string())
    return pa.StructArray.from_arrays(
        [
            status,
            pa.repeat(pa.scalar(result.model, pa.string()), n),
            pa.repeat(pa.scalar(result.version, pa.string()), n),
            pa.array(score, pa.float32(), mask=np.isnan(score)),
            label,
            pa.array(np.full(n, result.latency_ms, dtype=np.float32)),
            reason,
        ],
        fields=list(INFERENCE_TYPE),
    )


def _status_column(n: int, status: str, reason: str) -> pa.StructArray:
    nothing = pa.nulls(n, pa.string())
    return pa.StructArray.from_arrays(
        [
            pa.repeat(pa.scalar(status, pa.string()), n),
            nothing,
            nothing,
            pa.nulls(n, pa.float32()),
            nothing,
            pa.nulls(n, pa.float32()),
            pa.repeat(pa.scalar(reason, pa.string()), n),
        ],
        fields=list(INFERENCE_TYPE),
    )


_CURATED_WITHOUT_INFERENCE = pa.schema([f for f in CURATED_SCHEMA if f.name != "inference"])
_INFERENCE_FIELD = CURATED_SCHEMA.field("inference")


def curated_columns(requests: Sequence[CuratedRequest], frames: Sequence[list[CuratedSource]]) -> pa.Table:
    """The curated columns but ``inference`` of several frames, in one table and frame order
    (schema in connectors/curated_parquet.py). Columns are built once for all the frames: what a
    request's records share is one value per frame, repeated by index."""
    lines = [line for frame in frames for line in frame]
    records = [line.record for line in lines]
    frame_of_row = pa.array(np.repeat(np.arange(len(frames), dtype=np.int32), [len(f) for f in frames]))

    def shared(values: list, type_: pa.DataType) -> pa.Array:  # one value per frame, one per record
        return pa.array(values, type_).take(frame_of_row)

    columns = [
        pa.array([line.device_id for line in lines], pa.string()),
        pa.array([line.seq for line in lines], pa.int64()),
        pa.array([line.event_time_ms for line in lines], pa.int64()).cast(_TS),
        shared([r.received_at for r in requests], pa.string()).cast(_TS),
        shared([r.gateway_id for r in requests], pa.string()),
        shared([r.availability_zone for r in requests], pa.string()),
        shared([r.ingest_id for r in requests], pa.string()),
        pa.array([line.index for line in lines], pa.int32()),
        shared([r.device.get("site") for r in requests], pa.string()),
        shared([r.device.get("model") for r in requests], pa.string()),
        pa.array([r.metrics for r in records], _METRICS),
        pa.array([r.tags for r in records], _TAGS),
    ]
    return pa.Table.from_arrays(columns, schema=_CURATED_WITHOUT_INFERENCE)


@dataclass(slots=True)
class DecodedFrames:
    """Several frames decoded together: one table (cheap to send between processes, where a table
    per frame cost more to pickle than to build) and each frame's model input."""

    table: pa.Table
    shaped: list[ShapedBatch]

    def tables(self) -> list[pa.Table]:
        """One zero-copy slice of the table per frame, in order."""
        out, offset = [], 0
        for chunk in self.shaped:
            out.append(self.table.slice(offset, chunk.n_records))
            offset += chunk.n_records
        return out


def decode_frames(
    payloads: list[bytes], features: Sequence[str], typical: np.ndarray, reject_missing: bool, shared: Sequence[bool] = ()
) -> DecodedFrames:
    """The curated columns and model input of frame payloads, each of them raw lines or, where
    ``shared`` says so, stored with their shared beginning once (``wal.shared_payload``). Pure, so
    it can run in another process. What the records of a frame share is decoded once."""
    requests, frames = [], []
    for payload, is_shared in zip(payloads, shared or [False] * len(payloads), strict=True):
        request, lines = _shared_frame(payload) if is_shared else _whole_frame(payload)
        requests.append(request)
        frames.append(lines)
    table = curated_columns(requests, frames).combine_chunks()
    metrics = table.column("metrics")
    x = feature_matrix(metrics.chunk(0) if metrics.num_chunks else pa.array([], _METRICS), features)
    shaped, offset = [], 0
    for lines in frames:
        shaped.append(shaped_batch(x[offset : offset + len(lines)], features, typical, reject_missing))
        offset += len(lines)
    return DecodedFrames(table, shaped)


def _whole_frame(payload: bytes) -> tuple[CuratedRequest, list[CuratedSource]]:
    """Raw lines: the request's fields from the first."""
    first = payload[: payload.index(b"\n")] if b"\n" in payload else payload
    return _request_fields.decode(first), _raw_lines.decode_lines(payload)


def _shared_frame(payload: bytes) -> tuple[CuratedRequest, list[CuratedSource]]:
    """The shared beginning closed as an object holds the request's fields; each record's own rest,
    its leading comma made a brace, holds the record's. Half the bytes of its lines to parse, and no
    frame expanded whole."""
    split = payload.index(b"\n")
    request = _request_fields.decode(payload[:split] + b"}")
    rests = payload[split + 1 :]
    lines = _raw_lines.decode_lines(_REST_START.sub(b"\n{", b"{" + rests[1:])) if rests else []
    return request, lines


def feature_matrix(metrics: pa.MapArray, features: Sequence[str]) -> np.ndarray:
    """Each record's value of each feature (NaN where it has none), read from the metrics column
    in a few vectorized passes over its entries rather than from each record's dict."""
    x = np.full((len(metrics), len(features)), np.nan)
    offsets = metrics.offsets.to_numpy()
    first, entries = int(offsets[0]), int(offsets[-1] - offsets[0])  # keys and items ignore a slice's offset
    column = pc.index_in(metrics.keys.slice(first, entries), value_set=pa.array(list(features), pa.string()))
    known = column.is_valid()
    rows = np.repeat(np.arange(len(metrics)), np.diff(offsets))[known.to_numpy(zero_copy_only=False)]
    x[rows, column.filter(known).to_numpy()] = metrics.items.slice(first, entries).filter(known).to_numpy(zero_copy_only=False)
    return x


class FrameDecoder:
    """Runs ``decode_frames`` in a worker process (``inference.offload = "process"``), so decoding
    and column building use another core instead of taking the GIL from the event loop; or in a
    thread. A worker that dies is replaced once; after that decoding falls back to a thread."""

    def __init__(self, mode: str) -> None:
        self._mode = mode
        self._pool: ProcessPoolExecutor | None = None
        self._restarts = 0
        self._starting: asyncio.Future[ProcessPoolExecutor] | None = None

    def start(self) -> None:
        """Start the worker in the background: its imports take about a second, and neither the
        gateway's start-up nor its event loop should wait for them."""
        if self._mode == "process" and self._starting is None:
            self._starting = asyncio.ensure_future(asyncio.to_thread(self._start_pool))

    async def decode(self, payloads: list[bytes], features: Sequence[str], typical: np.ndarray, reject: bool, shared: Sequence[bool] = ()):
        if self._mode == "process":
            self.start()
            loop = asyncio.get_running_loop()
            try:
                pool = await self._starting
                return await loop.run_in_executor(pool, decode_frames, payloads, features, typical, reject, shared)
            except BrokenProcessPool:
                self._pool = None
                self._starting = None
                self._restarts += 1
                if self._restarts > 1:
                    log.warning("curated decoding worker keeps dying; decoding in a thread from now on")
                    self._mode = "thread"
                return await self.decode(payloads, features, typical, reject, shared)
        return await asyncio.to_thread(decode_frames, payloads, features, typical, reject, shared)

    def _start_pool(self) -> ProcessPoolExecutor:
        # A fresh interpreter (spawn), not a fork of a process that runs threads and an event loop.
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))
        pool.submit(int).result()  # the worker is up and has imported what it needs
        self._pool = pool
        return pool

    async def aclose(self) -> None:
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)  # a pool being born is shut down too
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _worker_init(gateway_pid: int) -> None:
    # The gateway drains on SIGTERM and then shuts this worker down itself; a signal sent to the
    # whole process group (systemd, Ctrl-C) must not kill it mid-drain.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # If the gateway itself dies (SIGKILL, OOM), the worker goes with it instead of lingering.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the closed call queue still ends the worker
        pass
    if os.getppid() != gateway_pid:  # it died while this interpreter started, before the line above
        os._exit(0)
    tune_allocators()  # the environment came from the gateway; glibc's settings are per process


def build_inferencer(settings) -> Inferencer:
    if settings.backend == "local":
        return LocalModelInferencer()
    try:
        from connectors.inference.triton import TritonInferencer, TritonSettings  # the `triton` extra
    except ImportError as exc:
        raise ImportError("inference.backend = \"triton\" needs the `triton` extra: pip install 'edge-gateway[triton]'") from exc
    endpoints = [
        TritonInferencer(
            TritonSettings(
                url=e.url,
                protocol=e.protocol,
                model=settings.model,
                model_version=settings.model_version,
                n_features=len(settings.features),
                client_timeout_secs=settings.call_timeout_secs,
                name=e.name or e.url,
            )
        )
        for e in settings.endpoints
    ]
    return InferencePool(endpoints, name="triton", idle_after_secs=settings.idle_after_secs)


def _typical_values(features: Sequence[str]) -> dict[str, float]:
    """A missing metric is filled with the shipped model's typical value, so a gap moves no score."""
    typical = LocalModelInferencer().model.neutral_values()
    return {name: typical.get(name, 0.0) for name in features}


def shape(lines: list[CuratedSource], features: Sequence[str], typical: np.ndarray, reject_missing: bool) -> ShapedBatch:
    """The model input for records decoded one by one (``decode_frames`` reads a whole table's at once)."""
    return shaped_batch(feature_matrix(pa.array([line.record.metrics for line in lines], _METRICS), features), features, typical, reject_missing)


def shaped_batch(x: np.ndarray, features: Sequence[str], typical: np.ndarray, reject_missing: bool) -> ShapedBatch:
    """The model input for one frame's records from their feature matrix (``feature_matrix``).

    Metrics were validated at ingest (finite numbers), so this skips the per-cell checks a general
    shaper needs; a value beyond float32 range counts as missing, like an absent metric.
    """
    n = len(x)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    missing = ~np.isfinite(x32)
    rejected: dict[int, str] = {}
    rows = np.arange(n)
    if missing.any():
        if reject_missing:
            bad = missing.any(axis=1)
            for i in np.flatnonzero(bad):
                rejected[int(i)] = "missing metrics: " + ", ".join(f for f, gap in zip(features, missing[i]) if gap)
            rows, x32, missing = rows[~bad], x32[~bad], missing[~bad]
        else:
            x32 = np.where(missing, typical, x32).astype(np.float32)
    return ShapedBatch(x32, rows, missing, rejected, n, tuple(features))


# Records per decoding step: bounded, so memory and the wait for a result stay small.
SLICE_RECORDS = 4096


async def prepare_frames(frames: list[Frame], scorer: CuratedScorer) -> list[ScoredFrame]:
    """Decode each frame's raw lines, score them, and build each frame's curated table."""
    out: list[ScoredFrame] = []
    settings = scorer.settings
    for group in _slices(frames):
        decoded = await scorer.decoder.decode(
            [f.payload for f in group], settings.features, scorer.typical, settings.missing == "reject",
            [f.kind == KIND_RECORDS_SHARED for f in group],
        )
        chunks = coalesce_chunks(decoded.shaped)
        columns = await scorer.score(chunks)
        if len(chunks) == len(decoded.shaped):  # frames of many records: each its own column
            out.extend(
                ScoredFrame.of(f, table.append_column(_INFERENCE_FIELD, column))
                for f, table, column in zip(group, decoded.tables(), columns, strict=True)
            )
            continue
        # Small frames scored together: one inference column for the group, each frame's table a slice.
        table = decoded.table.append_column(_INFERENCE_FIELD, pa.concat_arrays(columns))
        offset = 0
        for frame, chunk in zip(group, decoded.shaped, strict=True):
            out.append(ScoredFrame.of(frame, table.slice(offset, chunk.n_records)))
            offset += chunk.n_records
    for listener in tuple(scorer.listeners):
        listener(out)
    return out


# Frames of fewer records are scored together, up to this many records a chunk: the inference
# column of a chunk costs about as much to build for one record as for hundreds (a backfill's
# frames hold a record or two each).
COALESCED_CHUNK_RECORDS = 256


def coalesce_chunks(chunks: Sequence[ShapedBatch]) -> list[ShapedBatch]:
    """``chunks`` with each run of small ones joined into one, records in the same order."""
    out: list[ShapedBatch] = []
    run: list[ShapedBatch] = []
    in_run = 0  # records in ``run``
    for chunk in chunks:
        small = chunk.n_records < SMALL_CHUNK_ROWS
        if not small or in_run + chunk.n_records > COALESCED_CHUNK_RECORDS:
            out.extend(_joined(run))
            run, in_run = [], 0
        if small:
            run.append(chunk)
            in_run += chunk.n_records
        else:
            out.append(chunk)
    out.extend(_joined(run))
    return out


def _joined(run: list[ShapedBatch]) -> list[ShapedBatch]:
    if len(run) <= 1:
        return run
    starts = np.cumsum([0] + [c.n_records for c in run[:-1]])
    return [
        ShapedBatch(
            np.concatenate([c.features for c in run]),
            np.concatenate([c.rows + start for c, start in zip(run, starts)]),
            np.concatenate([c.missing for c in run]),
            {int(start) + index: why for c, start in zip(run, starts) for index, why in c.rejected.items()},
            int(sum(c.n_records for c in run)),
            run[0].feature_names,
        )
    ]


def _slices(frames: list[Frame]) -> list[list[Frame]]:
    groups: list[list[Frame]] = [[]]
    size = 0
    for frame in frames:
        if size >= SLICE_RECORDS:
            groups.append([])
            size = 0
        groups[-1].append(frame)
        size += frame.count
    return [g for g in groups if g]
