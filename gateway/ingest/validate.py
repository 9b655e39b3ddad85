"""Validate, enrich and frame the records of one request as its body streams in.

A ``RequestBatch`` takes record bytes (NDJSON lines or document items), decodes each against the
schema, wraps accepted ones in their raw-zone envelope and rejected ones in their quarantine line,
groups them by partition hour and spools them as WAL frames. Nothing is durable until the request
completes and the caller appends the spool to the WAL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Protocol, TypeAlias

import msgspec

from gateway.ingest.body import MSGPACK, NDJSON
from gateway.ingest.enrich import HOUR_MS, PartitionPolicy, RawLineWriter, RequestContext, partition_hours, quarantine_line
from gateway.errors import Forbidden, TooLarge
from gateway.ingest.records import Record, RecordOfAnyId, valid_device_id
from gateway.ingest.spool import Spool
from gateway.durable.retry_ledger import Span, span_key
from gateway.durable.wal import KIND_QUARANTINE, KIND_RECORDS_SHARED, encode_frame, shared_payload

_json_record = msgspec.json.Decoder(Record)
_json_any_id = msgspec.json.Decoder(RecordOfAnyId)
_msgpack_record = msgspec.msgpack.Decoder(Record)
_msgpack_any = msgspec.msgpack.Decoder()
_json = msgspec.json.Encoder()

# The records of a chunk that are to land: their indexes in the request, decoded, as sent (one line
# each), and their event times.
_Accepted: TypeAlias = "tuple[Iterable[int], list[Record], list[bytes], list[int]]"


class DuplicateCheck(Protocol):
    """Which records were already accepted (``retry_ledger.SeqLookup``)."""

    def is_duplicate(self, device_id: str, seq: int, event_ms: int) -> bool: ...

    def none_recorded(self, device_id: str, lowest: int, highest: int) -> bool: ...

    def spans(self, seqs: list[tuple[str, int, int]]) -> list[Span]: ...

    def again(self) -> DuplicateCheck: ...

    def close(self) -> None: ...


class RequestBatch:
    def __init__(
        self,
        ctx: RequestContext,
        fmt: str,
        *,
        spool: Spool,
        policy: PartitionPolicy,
        seq_index: DuplicateCheck,
        max_records: int,
        max_errors_reported: int,
        max_tracked_seqs: int = 10_000,
    ) -> None:
        self.ctx = ctx
        self._msgpack = fmt == MSGPACK
        self._ndjson = fmt == NDJSON
        self._lines = RawLineWriter(ctx)
        self._decode = _msgpack_record.decode if self._msgpack else _json_record.decode
        self.spool = spool
        self._policy = policy
        self._seq_index = seq_index
        self._max_records = max_records
        self._max_errors = max_errors_reported
        # Retries are small batches; a huge upload's sequence numbers are not all worth memory.
        self._max_tracked = max_tracked_seqs
        self.records = 0
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self.rejections: dict[str, int] = defaultdict(int)  # reason class -> count, for metrics
        self.errors: list[dict[str, object]] = []
        self.new_seqs: list[tuple[str, int, int]] = []
        self._seqs_here: set[tuple[str, int, int]] = set()
        self._checked_ids: set[str] = set()  # device ids of the last chunk, already checked
        self._spans: list[Span] = []

    def add(self, items: list[bytes]) -> None:
        if not items:
            return
        if self.records + len(items) > self._max_records:
            raise TooLarge(f"a request may hold at most {self._max_records} records")
        ctx = self.ctx
        joined = b"\n".join(items) if self._ndjson else b""
        decoded = self._decode_all(items, joined)
        # What holds for the whole chunk is checked once, not per record: a bulk-decoded chunk naming
        # only the signer needs no per-record device check, and an NDJSON line holds a line break only
        # if the chunk holds a CR (a JSON document's records may hold both).
        signer = ctx.device_id
        if decoded is not None and self._checked_ids == {signer}:
            signer = None
        may_break = not self._ndjson or b"\r" in joined
        first = self.records
        quarantined: list = []
        accepted = None
        if decoded is not None and signer is None and not may_break:
            accepted = self._accept_decoded(first, items, decoded)
        if accepted is None:
            accepted = self._accept_each(first, items, decoded, signer, may_break, quarantined)
        indexes, records, raws, events = accepted
        self.records += len(items)
        self._seq_index.close()  # no read transaction stays open while the body streams
        hours, by_event_time = partition_hours(events, ctx.received_ms, self._policy)
        rests = self._lines.rests(indexes, records, raws, events, by_event_time)
        for hour, (hour_rests, hour_events) in _by_hour(hours, rests, events).items():
            count = len(hour_rests)
            payload = shared_payload(self._lines.shared, hour_rests)
            self.spool.add(encode_frame(KIND_RECORDS_SHARED, hour, ctx.received_ms, min(hour_events), max(hour_events), count, payload))
            self.accepted += count
        if quarantined:
            payload = _json.encode_lines(quarantined)
            hour = ctx.received_ms // HOUR_MS
            self.spool.add(
                encode_frame(KIND_QUARANTINE, hour, ctx.received_ms, ctx.received_ms, ctx.received_ms, len(quarantined), payload)
            )

    def _accept_decoded(self, first: int, items: list[bytes], records: list[Record]) -> _Accepted | None:
        """The common case in bulk: a chunk decoded whole, for its signer, one record per line. None
        when a record needs the checks ``_accept_each`` makes one at a time (a time before 1970)."""
        events = [r.ts if r.ts.__class__ is int else r.event_time_ms() for r in records]
        if min(events) < 0:
            return None
        indexes: Iterable[int] = range(first, first + len(items))
        if any(r.seq is not None for r in records) and not self._all_new_run(records, events):
            # Last check before landing, in order: a record refused above must not count as seen.
            new = [r.seq is None or not self._is_duplicate(r.device_id, r.seq, e) for r, e in zip(records, events)]
            if not all(new):
                keep = [i for i, is_new in enumerate(new) if is_new]
                indexes = [first + i for i in keep]
                records, items, events = [records[i] for i in keep], [items[i] for i in keep], [events[i] for i in keep]
        return indexes, records, items, events

    def _accept_each(
        self, first: int, items: list[bytes], decoded: list[Record] | None, signer: str | None, may_break: bool, quarantined: list
    ) -> _Accepted:
        """Record by record: each decoded and checked alone, the rejected ones into ``quarantined``."""
        indexes: list[int] = []
        records: list[Record] = []
        raws: list[bytes] = []
        events: list[int] = []
        for offset, item in enumerate(items):
            if decoded is not None:
                record = decoded[offset]
            else:
                record = self._decode_one(first + offset, item, quarantined)
                if record is None:
                    continue
            if signer is not None and record.device_id != signer:
                index = first + offset
                raise Forbidden(f"record {index} is for device {record.device_id!r}, but the request is signed by {signer!r}")
            ts = record.ts
            event_ms = ts if ts.__class__ is int else record.event_time_ms()
            if event_ms < 0:  # a datetime before 1970: WAL frames hold unsigned event times
                quarantined.append(self._reject(first + offset, item, "invalid", "Expected a time after 1970-01-01 - at `$.ts`"))
                continue
            if self._msgpack:
                try:
                    item = _json.encode(_msgpack_any.decode(item))
                except (TypeError, msgspec.EncodeError, msgspec.DecodeError, RecursionError) as exc:
                    # The raw zone stores JSON; a msgpack extension type or binary key has no JSON form.
                    quarantined.append(self._reject(first + offset, item, "malformed", f"record cannot be stored as JSON: {exc}"))
                    continue
            elif may_break and (b"\n" in item or b"\r" in item):
                # A pretty-printed JSON document: line breaks there are whitespace (JSON strings
                # cannot hold raw ones), and the raw zone keeps one record per line.
                item = item.replace(b"\r", b" ").replace(b"\n", b" ")
            # Last check before landing: a record refused above must not count as seen.
            if record.seq is not None and self._is_duplicate(record.device_id, record.seq, event_ms):
                continue
            indexes.append(first + offset)
            records.append(record)
            raws.append(item)
            events.append(event_ms)
        return indexes, records, raws, events

    # -- records another request may hold at once (retry_ledger.py, "inflight") --------------

    def seq_spans(self) -> list[Span]:
        """The range of new seqs per device, to claim before the records are written."""
        self._spans = self._seq_index.spans(self.new_seqs)
        return self._spans

    def seq_spans_if_still_new(self) -> list[Span] | None:
        """Records of a device here became durable elsewhere since they were checked: fresh spans if
        none of them is among those (the frames hold), None if some are (validate the body again)."""
        lookup = self._seq_index.again()
        try:
            for device_id, seq, event_ms in self.new_seqs:
                if lookup.is_duplicate(device_id, seq, event_ms):
                    return None
        finally:
            lookup.close()
        self._seq_index = lookup
        return self.seq_spans()

    def span_keys(self, request_key: bytes) -> list[bytes]:
        """The claimed spans, ended in the ledger when the request's records become durable."""
        return [span_key(span.device_id, request_key) for span in self._spans]

    def _decode_all(self, items: list[bytes], joined: bytes) -> list[Record] | None:
        """All of a chunk's records (``joined``: its lines) in one call when every line is valid (the common case)."""
        if not self._ndjson:
            return None
        try:
            records = _json_any_id.decode_lines(joined)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        if len(records) != len(items):
            return None
        ids = {r.device_id for r in records}
        if ids != self._checked_ids and not all(valid_device_id(i) for i in ids):
            return None  # record by record, so each bad id gets its own quarantine line and reason
        self._checked_ids = ids
        return records

    def _decode_one(self, index: int, item: bytes, quarantined: list) -> Record | None:
        try:
            return self._decode(item)
        except msgspec.ValidationError as exc:
            quarantined.append(self._reject(index, item, "invalid", str(exc)))
        except msgspec.DecodeError as exc:
            quarantined.append(self._reject(index, item, "malformed", f"malformed record: {exc}"))
        except UnicodeDecodeError:  # msgspec raises it (not DecodeError) for some invalid UTF-8 strings
            quarantined.append(self._reject(index, item, "malformed", "malformed record: invalid UTF-8"))
        except RecursionError:
            quarantined.append(self._reject(index, item, "malformed", "malformed record: nested too deeply"))
        return None

    def _all_new_run(self, records: list[Record], events: list[int]) -> bool:
        """The common case checked in bulk: records of one device numbered without gaps, none of
        them seen before, in this request or in the ledger; they are tracked as ``_is_duplicate`` would."""
        seqs = [r.seq for r in records]
        first, last = seqs[0], seqs[-1]
        if first is None or last != first + len(seqs) - 1 or len(self.new_seqs) + len(seqs) > self._max_tracked:
            return False
        if seqs != list(range(first, last + 1)):
            return False
        device_id = records[0].device_id
        if {r.device_id for r in records} != {device_id}:  # a request no device signed may carry many
            return False
        keys = [(device_id, seq, event_ms) for seq, event_ms in zip(seqs, events)]
        if not self._seqs_here.isdisjoint(keys) or not self._seq_index.none_recorded(device_id, first, last):
            return False
        self._seqs_here.update(keys)
        self.new_seqs.extend(keys)
        return True

    def _is_duplicate(self, device_id: str, seq: int, event_ms: int) -> bool:
        key = (device_id, seq, event_ms)
        if key in self._seqs_here or self._seq_index.is_duplicate(device_id, seq, event_ms):
            self.duplicates += 1
            return True
        if len(self.new_seqs) < self._max_tracked:
            self._seqs_here.add(key)
            self.new_seqs.append(key)
        return False

    def _reject(self, index: int, item: bytes, kind: str, reason: str):
        self.rejected += 1
        self.rejections[_reason_class(kind, reason)] += 1
        if len(self.errors) < self._max_errors:
            self.errors.append({"index": index, "reason": reason})
        return quarantine_line(self.ctx, index, item, reason)


def _by_hour(hours: list[int], lines: list[bytes], events: list[int]) -> dict[int, tuple[list[bytes], list[int]]]:
    """A chunk's raw lines and event times per partition hour, hours in the order first seen."""
    if not hours or hours.count(hours[0]) == len(hours):  # the common case: one hour
        return {hours[0]: (lines, events)} if hours else {}
    groups: dict[int, tuple[list[bytes], list[int]]] = {}
    for hour, raw_line, event_ms in zip(hours, lines, events):
        group = groups.get(hour)
        if group is None:
            groups[hour] = group = ([], [])
        group[0].append(raw_line)
        group[1].append(event_ms)
    return groups


def _reason_class(kind: str, reason: str) -> str:
    """A low-cardinality label for metrics: the field a validation error points at."""
    if kind == "malformed":
        return "malformed"
    _, _, path = reason.rpartition(" - at `$.")
    field = path.split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
    return f"invalid_{field}" if field in {"device_id", "ts", "seq", "metrics", "tags"} else "invalid"
