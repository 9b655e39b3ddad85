"""Object formats of the raw and quarantine zones: NDJSON compressed with zstd as it accumulates.

An object is a series of zstd frames, each of up to 64 KiB of lines (RFC 8878 §3.1: concatenated
frames are one stream; ``zstd -d``, Athena and Spark read them whole, python-zstandard with
``read_across_frames=True``). An open object holds only its compressed bytes and the lines of the
current read not yet compressed: a compressor per open object held 0.3-0.7 MiB of context, and a
backfill keeps hundreds of hours open. Frames of 64 KiB compress as well as one stream does, and
zstd at level 1 costs ~1 ms per MB (gzip-6 would cost eight times that on the hot path).
"""

from __future__ import annotations

import threading

import zstandard

from gateway.durable.wal import KIND_RECORDS_SHARED, Frame, expand_shared_in_slices

PIECE_BYTES = 64 * 1024  # a shared frame is expanded this much at a time
# Lines per zstd frame: joined below glibc's mapping threshold (allocator.py), so a frame's input
# reuses heap memory; larger frames compress no better.
FRAME_BYTES = 64 * 1024

_compressors = threading.local()  # one context per thread and level, shared by every object


def _compressor(level: int) -> zstandard.ZstdCompressor:
    by_level = _compressors.__dict__.setdefault("by_level", {})
    if level not in by_level:
        by_level[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return by_level[level]


class ZstdNdjsonBuilder:
    extension = "ndjson.zst"
    content_type = "application/x-ndjson"

    def __init__(self, level: int = 1) -> None:
        self._level = level
        # Compressed, in one buffer: each frame's output, kept as its own bytes, held the whole block
        # zstd's bound asked for (64 KiB) in the heap, the rest of it a hole no next output fits in.
        self._compressed = bytearray()
        self._lines: list[bytes] = []  # not yet compressed
        self._lines_bytes = 0
        self.size = 0
        self.held = 0  # compressed bytes, as of the last read

    def add(self, frame: Frame) -> None:
        if frame.kind != KIND_RECORDS_SHARED:
            self._take(frame.payload)
            return
        for piece in expand_shared_in_slices(frame.payload, PIECE_BYTES):
            self._take(piece)

    def settle(self) -> None:
        """Compress what the last read added (a backfill's object may get a few lines per read)."""
        if self._lines:
            self._compressed += _compressor(self._level).compress(b"".join(self._lines))
            self._lines, self._lines_bytes = [], 0
            self.held = len(self._compressed)

    def finish(self) -> bytes:
        self.settle()
        return bytes(self._compressed) or _compressor(self._level).compress(b"")

    def _take(self, lines: bytes) -> None:
        self.size += len(lines)
        self._lines.append(lines)
        self._lines_bytes += len(lines)
        if self._lines_bytes >= FRAME_BYTES:
            self.settle()
