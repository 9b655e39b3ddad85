"""Mending the newest WAL segment where a frame's header was damaged at rest.

A damaged frame whose header still places it is passed over alone (wal.py). One whose length,
record count or kind was hit places nothing after it, and the newest segment has no next one to
count the frames after it back from: they were cut away with it. At open, instead:

- a frame whose only damage is its length is mended: the length at which its checksum passes again
  is the one that ends it where the next whole frame starts (or where the segment ends);
- otherwise the damaged bytes, up to the next request that begins after them, are overwritten by
  one ``KIND_GAP`` frame, and the requests after it land. That request's marker (``KIND_TXN``,
  checksummed) carries its first LSN: the gap stands for the LSNs in between, so every record after
  it keeps its own, and a zone that had read past the damage reads on where it was. The rest of the
  request the damage hit is lost with it: landing part of a request whose retry the ledger would
  answer as done would lose the other part silently.

Markers written before they carried an LSN number nothing: such a segment is still cut back to the
damage (its bytes kept aside).
"""

from __future__ import annotations

import errno
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from gateway.durable.wal import (
    _HEADER_END,
    HEADER_SIZE,
    KIND_GAP,
    KIND_TXN,
    KNOWN_KINDS,
    MAGIC,
    MARKER,
    META,
    PREFIX,
    TXN,
    _keep_aside,
    encode_frame,
)

log = logging.getLogger(__name__)

GAP_FRAME_MIN_BYTES = HEADER_SIZE + TXN.size
# Whole frames tried, in order, as the end of a frame whose length was damaged: the first is nearly
# always it (record payloads hold no zero bytes, so nothing inside one looks like a header).
MEND_CANDIDATES = 4


def mend_newest_segment(path: Path, at: int, lsn: int, damaged_at: int) -> bool:
    """Mend the newest segment ``path``, whose frame at offset ``damaged_at`` is damaged and places
    nothing after it, so that the frames after it can be read. ``at`` (LSN ``lsn``) is where the
    request it belongs to begins. True when something was mended (read the segment again), False
    when nothing after it can be saved."""
    with open(path, "rb") as f:
        f.seek(at)
        data = f.read()
    hit = damaged_at - at
    length = mended_length(data[hit:])
    if length is not None:
        _write_durably(path, [(damaged_at, PREFIX.pack(length, PREFIX.unpack_from(data, hit)[1]))])
        log.warning(
            "WAL: a frame whose length was damaged on disk is mended from its checksum; nothing is lost",
            extra={"segment": path.name, "offset": damaged_at},
        )
        return True
    found = next_request(data, hit + 1)
    if found is None:
        return False
    start, first_lsn = found
    if start < GAP_FRAME_MIN_BYTES or first_lsn < lsn:  # a marker that cannot be this request's
        return False
    kept = _keep_aside(path, at, start)
    gap = gap_frame(first_lsn - lsn, start)
    # The payload before the header: a reader in another process that looks meanwhile finds the
    # damaged header until the gap is whole.
    _write_durably(path, [(at + HEADER_SIZE, gap[HEADER_SIZE:]), (at, gap[:HEADER_SIZE])])
    log.critical(
        "WAL: a frame damaged on disk in the newest segment, and the rest of its request, cannot land; "
        "the requests after it will",
        extra={"segment": path.name, "offset": at, "bytes": start, "lsn": lsn, "records_lost": first_lsn - lsn, "kept_in": kept},
    )
    return True


def mended_length(data: bytes) -> int | None:
    """The length at which the frame that starts ``data`` passes its checksum, when its length alone
    was damaged: it then ends where a whole frame starts, or at the end of ``data``."""
    if len(data) < HEADER_SIZE:
        return None
    crc = PREFIX.unpack_from(data)[1]
    meta = data[PREFIX.size : HEADER_SIZE]
    if META.unpack(meta)[-1] not in KNOWN_KINDS:
        return None
    ends = [at for at, _ in zip(whole_frames(data, HEADER_SIZE), range(MEND_CANDIDATES))] + [len(data)]
    for end in ends:
        if zlib.crc32(data[HEADER_SIZE:end], zlib.crc32(meta)) == crc:
            return end - HEADER_SIZE
    return None


def next_request(data: bytes, start: int) -> tuple[int, int] | None:
    """Where in ``data``, from ``start`` on, the first request that says its first LSN begins (a
    whole ``KIND_TXN`` marker), and that LSN."""
    for at in whole_frames(data, start):
        if META.unpack_from(data, at + PREFIX.size)[-1] == KIND_TXN and PREFIX.unpack_from(data, at)[0] == MARKER.size:
            return at, MARKER.unpack_from(data, at + HEADER_SIZE)[1]
    return None


def whole_frames(data: bytes, start: int) -> Iterator[int]:
    """Each offset from ``start`` on where a whole frame of a known kind starts and passes its
    checksum (found by its header's shape: it ends in three zero bytes)."""
    for hit in _HEADER_END.finditer(data, start + HEADER_SIZE - 3):
        at = hit.start() - (HEADER_SIZE - 3)
        if _whole_frame_at(data, at):
            yield at


def gap_frame(count: int, size: int) -> bytes:
    """A ``KIND_GAP`` frame of ``size`` bytes standing for ``count`` LSNs (its payload says the count too)."""
    return encode_frame(KIND_GAP, 0, 0, 0, 0, count, TXN.pack(count) + bytes(size - GAP_FRAME_MIN_BYTES))


def _whole_frame_at(data: bytes, at: int) -> bool:
    if at + HEADER_SIZE > len(data):
        return False
    length, crc = PREFIX.unpack_from(data, at)
    count, *_, kind = META.unpack_from(data, at + PREFIX.size)
    body = at + HEADER_SIZE
    # Cheap tests first: most places that look like a header's end are not one.
    if kind not in KNOWN_KINDS or body + length > len(data) or (kind == KIND_TXN and length not in (TXN.size, MARKER.size)):
        return False
    if kind != KIND_GAP and count > length:  # every record takes at least a byte
        return False
    return zlib.crc32(data[body : body + length], zlib.crc32(data[at + PREFIX.size : body])) == crc


def mend_segment_header(path: Path) -> None:
    """Write a segment's header (its magic, damaged at rest) again in place, durably."""
    _write_durably(path, [(0, MAGIC)])


def _write_durably(path: Path, pieces: list[tuple[int, bytes]]) -> None:
    """Write each ``(offset, bytes)`` in order, in place, then fsync. A failure names the segment: the
    start stops there, and the next one finds the damage as it was and mends it again."""
    try:
        fd = os.open(path, os.O_WRONLY)  # not O_APPEND: Linux appends every pwrite on such a descriptor
        try:
            for offset, piece in pieces:
                if os.pwrite(fd, piece, offset) != len(piece):
                    raise OSError(errno.ENOSPC, "the disk took only part of the write")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"mending a WAL frame or segment header damaged on disk failed: {exc.strerror or exc}", str(path)) from exc
