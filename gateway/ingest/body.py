"""Turning a request body, as it streams in, into records: decompression and framing.

Pure and synchronous: the HTTP source feeds it chunks and takes records out, so every limit is
enforced on bytes as they arrive and a body never has to be held whole (NDJSON), or is held only
up to ``max_document_bytes`` (JSON and msgpack documents, which cannot be split before the end).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Protocol

import msgspec

try:  # Python 3.14 ships it; older versions use the backport of the same module.
    from compression.zstd import DecompressionParameter, ZstdDecompressor, ZstdError  # type: ignore[import-not-found]
except ImportError:
    from backports.zstd import DecompressionParameter, ZstdDecompressor, ZstdError

from gateway.errors import MalformedBody, MalformedRequest, NotImplementedCoding, TooLarge, UnsupportedMedia

NDJSON = "ndjson"
JSON = "json"
MSGPACK = "msgpack"

CONTENT_TYPES = {
    "application/x-ndjson": NDJSON,
    "application/ndjson": NDJSON,
    "application/jsonl": NDJSON,
    "application/json": JSON,
    "application/msgpack": MSGPACK,
    "application/x-msgpack": MSGPACK,
    "application/vnd.msgpack": MSGPACK,
}
ENCODINGS = ("identity", "gzip", "zstd")

# Output pieces stay small so one hostile chunk cannot expand into gigabytes at once.
_MAX_PIECE_BYTES = 256 * 1024


def body_format(content_type: str) -> str:
    mime = content_type.split(";", 1)[0].strip().lower()
    try:
        return CONTENT_TYPES[mime]
    except KeyError:
        raise UnsupportedMedia(
            f"Content-Type {mime or '(none)'!r} is not supported; use one of "
            + ", ".join(sorted(CONTENT_TYPES))
        ) from None


class Decompressor(Protocol):
    def feed(self, chunk: bytes) -> Iterator[bytes]: ...

    def finish(self) -> Iterator[bytes]: ...


class _Identity:
    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if chunk:
            yield chunk

    def finish(self) -> Iterator[bytes]:
        return iter(())


class _Gzip:
    """gzip, all members of it (RFC 1952 allows several, concatenated); anything else after is an error."""

    _MAGIC = b"\x1f\x8b"

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._pending = b""  # the start of the next member, when it arrived split across reads

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        data = self._pending + chunk
        self._pending = b""
        while data:
            if self._inflate.eof:
                if len(data) < len(self._MAGIC) and self._MAGIC.startswith(data):
                    self._pending = data  # perhaps a next member, cut by the read
                    return
                if not data.startswith(self._MAGIC):
                    raise MalformedBody("data after the end of the gzip stream")
                self._inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                out = self._inflate.decompress(data, _MAX_PIECE_BYTES)
            except zlib.error as exc:
                raise MalformedBody(f"gzip stream is corrupt: {exc}") from None
            # Input left over: not yet decompressed (output limit), or the start of the next member.
            data = self._inflate.unconsumed_tail or self._inflate.unused_data
            if out:
                yield out

    def finish(self) -> Iterator[bytes]:
        if self._pending:
            raise MalformedBody("data after the end of the gzip stream")
        while not self._inflate.eof:
            try:
                out = self._inflate.decompress(self._inflate.unconsumed_tail, _MAX_PIECE_BYTES)
            except zlib.error as exc:
                raise MalformedBody(f"gzip stream is corrupt: {exc}") from None
            if not out:
                raise MalformedBody("gzip stream is truncated")
            yield out


# Frames asking for a larger window (up to 2 GiB per the format) are refused: memory stays bounded.
ZSTD_WINDOW_LOG_MAX = 23  # 8 MiB, what zstd levels 1-19 use for inputs of our size


def _new_zstd() -> ZstdDecompressor:
    return ZstdDecompressor(options={DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX})


class _Zstd:
    def __init__(self) -> None:
        self._zstd = _new_zstd()

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        data = chunk
        while True:
            if self._zstd.eof:
                if data or self._zstd.unused_data:
                    # Concatenated frames are valid zstd; start a fresh decompressor for the next one.
                    data = self._zstd.unused_data + data
                    self._zstd = _new_zstd()
                    if not data:
                        return
                else:
                    return
            try:
                out = self._zstd.decompress(data, max_length=_MAX_PIECE_BYTES)
            except ZstdError as exc:
                raise MalformedBody(f"zstd stream is corrupt: {exc}") from None
            data = b""
            if out:
                yield out
            if self._zstd.needs_input and not self._zstd.eof:
                return

    def finish(self) -> Iterator[bytes]:
        while not self._zstd.eof:
            try:
                out = self._zstd.decompress(b"", max_length=_MAX_PIECE_BYTES)
            except ZstdError as exc:
                raise MalformedBody(f"zstd stream is corrupt: {exc}") from None
            if not out:
                raise MalformedBody("zstd stream is truncated")
            yield out


def decompressor(content_encoding: str) -> Decompressor:
    encoding = content_encoding.strip().lower() or "identity"
    if encoding == "identity":
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Gzip()
    if encoding == "zstd":
        return _Zstd()
    raise UnsupportedMedia(
        f"Content-Encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}"
    )


def check_transfer_coding(transfer_encoding: str | None) -> None:
    """Refuse any transfer coding but one chunked: the HTTP parser frames such a body as plain chunked
    and would hand over its coded bytes (gzip, say, or chunk framing twice) as if they were the records."""
    if transfer_encoding is None:
        return
    # Empty list elements are to be ignored (RFC 9110 5.6.1.2); a list of none names no framing at all.
    codings = [coding for coding in (part.strip(" \t").lower() for part in transfer_encoding.split(",")) if coding]
    if not codings:
        raise MalformedRequest("the HTTP request is malformed: its Transfer-Encoding names no coding; send 'chunked' or a Content-Length")
    if codings != ["chunked"]:
        raise NotImplementedCoding(
            f"Transfer-Encoding {transfer_encoding!r} is not supported; send 'chunked' alone"
            " and compress with Content-Encoding (gzip or zstd)"
        )


# A UTF-8 byte order mark some tools write first (PowerShell, Windows editors). RFC 8259 says a
# parser may ignore it; the signature still covers the body as sent.
UTF8_BOM = b"\xef\xbb\xbf"


class LineFramer:
    """Splits NDJSON into lines, refusing any line longer than the record limit as it grows."""

    def __init__(self, max_record_bytes: int) -> None:
        self._max = max_record_bytes
        self._partial = b""
        self._at_start = True  # a byte order mark may still come first

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._partial + data if self._partial else data
        if self._at_start:
            if len(buf) < len(UTF8_BOM) and UTF8_BOM.startswith(buf):
                self._partial = buf  # the mark may be split across pieces
                return []
            self._at_start = False
            buf = buf.removeprefix(UTF8_BOM)
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self._max:
            raise TooLarge(f"a record is larger than the limit of {self._max} bytes")
        return self._clean(lines, b"\r" in buf)

    def finish(self) -> list[bytes]:
        tail, self._partial = self._partial, b""
        if self._at_start:
            tail = tail.removeprefix(UTF8_BOM)
        return self._clean([tail], b"\r" in tail)

    def _clean(self, lines: list[bytes], any_cr: bool) -> list[bytes]:
        if lines and max(map(len, lines)) > self._max:
            raise TooLarge(f"a record is larger than the limit of {self._max} bytes")
        # Blank lines are allowed between records; a CR before LF is line ending, not data.
        if not any_cr:  # the common case, at a third of the cost
            return [line for line in lines if line and not line.isspace()]
        return [line.rstrip(b"\r") if line.endswith(b"\r") else line for line in lines if line and not line.isspace()]


class DocumentFramer:
    """Buffers a whole JSON or msgpack document, then splits it into its records."""

    def __init__(self, fmt: str, max_document_bytes: int, max_record_bytes: int) -> None:
        self._fmt = fmt
        self._max_doc = max_document_bytes
        self._max_record = max_record_bytes
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._size += len(data)
        if self._size > self._max_doc:
            raise TooLarge(
                f"a {self._fmt} document may decompress to at most {self._max_doc} bytes; "
                "send larger batches as application/x-ndjson, which is streamed"
            )
        self._parts.append(data)
        return []

    def finish(self) -> list[bytes]:
        doc = b"".join(self._parts)
        self._parts = []
        items = _split_json(doc.removeprefix(UTF8_BOM)) if self._fmt == JSON else _split_msgpack(doc)
        for item in items:
            if len(item) > self._max_record:
                raise TooLarge(f"a record is larger than the limit of {self._max_record} bytes")
        return items


_json_array = msgspec.json.Decoder(list[msgspec.Raw])
_msgpack_array = msgspec.msgpack.Decoder(list[msgspec.Raw])


def _split_json(doc: bytes) -> list[bytes]:
    head = doc.lstrip()[:1]
    if head == b"{":
        return [doc.strip()]
    if head != b"[":
        raise MalformedBody("a JSON body must be an array of records or a single record object")
    try:
        return [bytes(item) for item in _json_array.decode(doc)]
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"the JSON body is malformed: {exc}") from None
    except RecursionError:
        raise MalformedBody("the JSON body is nested too deeply") from None


def _split_msgpack(doc: bytes) -> list[bytes]:
    try:
        return [bytes(item) for item in _msgpack_array.decode(doc)]
    except msgspec.ValidationError:
        raise MalformedBody("a msgpack body must be an array of records") from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"the msgpack body is malformed: {exc}") from None
    except RecursionError:
        raise MalformedBody("the msgpack body is nested too deeply") from None


def framer(fmt: str, *, max_record_bytes: int, max_document_bytes: int) -> LineFramer | DocumentFramer:
    if fmt == NDJSON:
        return LineFramer(max_record_bytes)
    return DocumentFramer(fmt, max_document_bytes, max_record_bytes)
