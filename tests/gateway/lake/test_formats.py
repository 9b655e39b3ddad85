"""The raw and quarantine zones' objects: zstd frames of NDJSON, read whole by any zstd reader."""

from __future__ import annotations

import io
import subprocess

import zstandard

from gateway.durable.wal import KIND_RECORDS, KIND_RECORDS_SHARED, Frame, shared_payload
from gateway.lake.formats import FRAME_BYTES, ZstdNdjsonBuilder


def lines(first: int, count: int) -> bytes:
    return b"".join(b'{"seq":%d,"metrics":{"t":%d.5}}\n' % (seq, seq % 97) for seq in range(first, first + count))


def read_whole(body: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True).read()


def test_an_object_filled_over_many_reads_is_its_lines_in_order():
    builder = ZstdNdjsonBuilder()
    expected = []
    for read in range(30):  # a backfill's object: a few lines per read
        payload = lines(read * 3, 3)
        builder.add(Frame(read, 3, 490_000, 0, 0, 0, KIND_RECORDS, payload))
        builder.settle()
        expected.append(payload)
        assert 0 < builder.held < builder.size, "after a read it holds only compressed bytes"
    big = lines(1000, 20_000)  # larger than a frame: compressed as it comes, before the read ends
    builder.add(Frame(100, 20_000, 490_000, 0, 0, 0, KIND_RECORDS, big))
    shared = shared_payload(b'{"seq":', [b"%d}" % s for s in range(5)])
    builder.add(Frame(200, 5, 490_000, 0, 0, 0, KIND_RECORDS_SHARED, shared))
    body = builder.finish()
    assert read_whole(body) == b"".join(expected) + big + b"".join(b'{"seq":%d}\n' % s for s in range(5))
    assert builder.size == len(read_whole(body))
    assert len(big) > 2 * FRAME_BYTES and body.count(b"\x28\xb5\x2f\xfd") > 30, "a series of frames"


def test_an_empty_object_is_still_a_zstd_stream():
    assert read_whole(ZstdNdjsonBuilder().finish()) == b""


def test_the_zstd_command_reads_an_object_whole(tmp_path):
    builder = ZstdNdjsonBuilder()
    for read in range(5):
        builder.add(Frame(read, 2, 490_000, 0, 0, 0, KIND_RECORDS, lines(read * 2, 2)))
        builder.settle()
    path = tmp_path / "object.ndjson.zst"
    path.write_bytes(builder.finish())
    out = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    assert out == lines(0, 10)
