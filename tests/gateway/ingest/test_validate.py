"""RequestBatch: one request's records into WAL frames, a frame per partition hour."""

from __future__ import annotations

import orjson
import pytest

from gateway.durable.wal import HEADER_SIZE, KIND_QUARANTINE, KIND_RECORDS_SHARED, META, PREFIX, expand_shared, shared_payload
from gateway.errors import Forbidden
from gateway.ingest.body import LineFramer
from gateway.ingest.enrich import HOUR_MS, PartitionPolicy, new_context
from gateway.ingest.spool import Spool
from gateway.ingest.validate import RequestBatch

NOW_MS = 1_800_000_000_000 - 1_800_000_000_000 % HOUR_MS + HOUR_MS // 2  # the middle of an hour
POLICY = PartitionPolicy(max_future_skew_ms=3 * HOUR_MS, max_event_age_ms=48 * HOUR_MS)


class NoneSeen:
    def is_duplicate(self, device_id: str, seq: int, event_ms: int) -> bool:
        return False

    def none_recorded(self, device_id: str, lowest: int, highest: int) -> bool:
        return True

    def close(self) -> None:
        pass


def batch_for(tmp_path, device_id: str | None = "dev-1") -> RequestBatch:
    ctx = new_context(gateway_id="gw", availability_zone="az", device_id=device_id, device_metadata={}, clock_skew_ms=0,
                      now=NOW_MS / 1000)
    return RequestBatch(ctx, "ndjson", spool=Spool(tmp_path, 1 << 20), policy=POLICY, seq_index=NoneSeen(), max_records=1000,
                        max_errors_reported=10)


def frames(batch: RequestBatch) -> list[tuple[int, int, int, int, list[dict]]]:
    """(kind, hour, min event, max event, lines) of each frame the batch spooled."""
    out = []
    for chunk in batch.spool.chunks():
        for frame in chunk:
            length = PREFIX.unpack_from(frame)[0]
            count, hour, _, low, high, kind = META.unpack_from(frame, PREFIX.size)
            payload = frame[HEADER_SIZE:HEADER_SIZE + length]
            if kind == KIND_RECORDS_SHARED:
                payload = expand_shared(payload)
            lines = [orjson.loads(line) for line in payload.splitlines()]
            assert len(lines) == count
            out.append((kind, hour, low, high, lines))
    return out


def chunk(*records: dict) -> list[bytes]:
    return LineFramer(1 << 20).feed(b"".join(orjson.dumps(r) + b"\n" for r in records))


def test_records_of_two_hours_go_to_a_frame_each_with_their_own_event_times(tmp_path) -> None:
    earlier = NOW_MS - HOUR_MS
    batch = batch_for(tmp_path)
    batch.add(chunk(*({"device_id": "dev-1", "ts": ts, "metrics": {"t": 1.0}, "seq": i}
                      for i, ts in enumerate([NOW_MS, earlier, NOW_MS + 5, earlier - 7, NOW_MS - 3]))))
    got = frames(batch)
    assert [(kind, hour, low, high) for kind, hour, low, high, _ in got] == [
        (KIND_RECORDS_SHARED, NOW_MS // HOUR_MS, NOW_MS - 3, NOW_MS + 5),
        (KIND_RECORDS_SHARED, earlier // HOUR_MS, earlier - 7, earlier),
    ]
    assert [[line["seq"] for line in lines] for *_, lines in got] == [[0, 2, 4], [1, 3]]
    assert [line["index"] for line in got[0][4]] == [0, 2, 4]
    assert batch.accepted == 5 and batch.records == 5


class Seen(NoneSeen):
    def __init__(self, *seqs: int) -> None:
        self.seqs = set(seqs)

    def is_duplicate(self, device_id: str, seq: int, event_ms: int) -> bool:
        return seq in self.seqs

    def none_recorded(self, device_id: str, lowest: int, highest: int) -> bool:
        return not any(lowest <= seq <= highest for seq in self.seqs)


def test_a_run_checked_in_bulk_still_finds_its_duplicates_in_the_ledger_and_in_this_request(tmp_path) -> None:
    batch = batch_for(tmp_path)
    batch._seq_index = Seen(13)
    run = [{"device_id": "dev-1", "ts": NOW_MS + i, "metrics": {"t": 1.0}, "seq": i} for i in range(20)]
    batch.add(chunk(*run[:10]))  # new to the ledger: checked as one run
    batch.add(chunk(*run[5:13]))  # 5-9 again in this request
    batch.add(chunk(*run[13:20]))  # 13 in the ledger
    accepted = [line["seq"] for *_, lines in frames(batch) for line in lines]
    assert accepted == list(range(10)) + [10, 11, 12, 14, 15, 16, 17, 18, 19]
    assert (batch.accepted, batch.duplicates) == (19, 6)
    assert batch.new_seqs == [("dev-1", seq, NOW_MS + seq) for seq in accepted], "tracked for the ledger, in order"


def test_consecutive_seqs_of_several_devices_are_tracked_for_each(tmp_path) -> None:
    batch = batch_for(tmp_path, device_id=None)  # no signer: records may name any device
    batch.add(chunk(*({"device_id": f"dev-{seq % 2}", "ts": NOW_MS, "metrics": {"t": 1.0}, "seq": seq} for seq in range(6))))
    assert batch.new_seqs == [(f"dev-{seq % 2}", seq, NOW_MS) for seq in range(6)]


@pytest.mark.parametrize("signed_by", ["dev-1", None])
def test_duplicates_clock_skew_and_times_before_1970_keep_every_records_index(tmp_path, signed_by) -> None:
    # A chunk decoded whole takes the bulk path unless a record needs a check of its own.
    batch = batch_for(tmp_path, signed_by)
    batch._seq_index = Seen(1, 3)
    far_future = NOW_MS + 10 * HOUR_MS  # beyond max_future_skew_ms: filed by arrival time
    records = [{"device_id": "dev-1", "ts": ts, "metrics": {"t": 1.0}, "seq": i} for i, ts in enumerate([NOW_MS, NOW_MS, far_future, NOW_MS])]
    batch.add(chunk(*records, {"device_id": "dev-1", "ts": NOW_MS + 1, "metrics": {"t": 2.0}}))
    ((_, hour, _, _, lines),) = frames(batch)
    assert hour == NOW_MS // HOUR_MS
    assert [(line["index"], line["seq"], line["partitioned_by"]) for line in lines] == [
        (0, 0, "event_time"), (2, 2, "arrival_time"), (4, None, "event_time")
    ]
    assert (batch.accepted, batch.duplicates, batch.records) == (3, 2, 5)
    batch.add(chunk({"device_id": "dev-1", "ts": NOW_MS, "metrics": {"t": 1.0}, "seq": 9},
                    {"device_id": "dev-1", "ts": "1969-12-31T23:59:59Z", "metrics": {"t": 1.0}, "seq": 10}))
    got = frames(batch)
    assert [line["index"] for line in got[1][4]] == [5] and got[2][0] == KIND_QUARANTINE
    assert [(line["index"], line["reason"]) for line in got[2][4]] == [(6, "Expected a time after 1970-01-01 - at `$.ts`")]
    assert batch.new_seqs == [("dev-1", 0, NOW_MS), ("dev-1", 2, far_future), ("dev-1", 9, NOW_MS)], "the refused one is not seen"


def test_a_record_for_another_device_is_refused_by_its_index(tmp_path) -> None:
    batch = batch_for(tmp_path)
    batch.add(chunk({"device_id": "dev-1", "ts": NOW_MS, "metrics": {"t": 1.0}}))
    with pytest.raises(Forbidden, match="record 2 is for device 'dev-2'"):
        batch.add(chunk(*({"device_id": d, "ts": NOW_MS, "metrics": {"t": 1.0}} for d in ("dev-1", "dev-2"))))


def test_a_carriage_return_inside_a_line_does_not_break_the_raw_line(tmp_path) -> None:
    batch = batch_for(tmp_path)
    line = b'{"device_id":"dev-1",\r"ts":%d,"metrics":{"t":1.0}}' % NOW_MS
    batch.add(LineFramer(1 << 20).feed(line + b"\n"))
    ((_, _, _, _, lines),) = frames(batch)
    assert lines[0]["record"] == {"device_id": "dev-1", "ts": NOW_MS, "metrics": {"t": 1.0}}


@pytest.mark.parametrize("signed_by", ["dev-1", None])
@pytest.mark.parametrize("seq", [7, None])
@pytest.mark.parametrize("by_event_time", [True, False])
def test_a_raw_line_is_the_raw_line_schema_with_the_record_as_sent(signed_by, seq, by_event_time) -> None:
    import msgspec

    from gateway.ingest.enrich import RawLineWriter
    from gateway.ingest.records import RawLine, Record

    ctx = new_context(gateway_id="gw", availability_zone="az", device_id=signed_by, device_metadata={"site": "a"},
                      clock_skew_ms=-3, source_ip="10.0.0.1", now=NOW_MS / 1000)
    sent = b'{"device_id": "dev-1", "ts": %d, "metrics": {"t": 1.5}%b}' % (NOW_MS, b', "seq": %d' % seq if seq is not None else b"")
    record = msgspec.json.decode(sent, type=Record)
    writer = RawLineWriter(ctx)
    # The line as the WAL hands it to the raw zone: what the request's lines share, then its own rest.
    stored = shared_payload(writer.shared, writer.rests([4], [record], [sent], [NOW_MS - 9], [by_event_time]))
    line = msgspec.json.decode(expand_shared(stored).rstrip(b"\n"), type=RawLine)
    assert line == RawLine(ingest_id=ctx.ingest_id, index=4, received_at=ctx.received_at, gateway_id="gw", availability_zone="az",
                           device_id="dev-1", event_time_ms=NOW_MS - 9, partitioned_by="event_time" if by_event_time else "arrival_time",
                           seq=seq, clock_skew_ms=-3, device={"site": "a"}, source_ip="10.0.0.1", record=msgspec.Raw(sent))


def test_a_requests_lines_share_their_beginning_once_in_the_wal(tmp_path) -> None:
    batch = batch_for(tmp_path)
    records = [{"device_id": "dev-1", "ts": NOW_MS, "metrics": {"t": float(i)}, "seq": i} for i in range(300)]
    batch.add(chunk(*records))
    ((frame,),) = batch.spool.chunks()
    length = PREFIX.unpack_from(frame)[0]
    assert META.unpack_from(frame, PREFIX.size)[5] == KIND_RECORDS_SHARED
    stored = frame[HEADER_SIZE:HEADER_SIZE + length]
    lines = expand_shared(stored).splitlines()
    assert [orjson.loads(line)["record"] for line in lines] == records  # each record as sent, in its envelope
    assert all(line.startswith(lines[0][: lines[0].index(b',"index":')]) for line in lines)
    assert len(stored) < 0.6 * sum(len(line) + 1 for line in lines)
