"""Snapshots of the batcher's state, shaped for export as gauges and counters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """One endpoint, as of the snapshot."""

    name: str
    available: bool
    concurrency_limit: int
    in_flight: int
    idle_secs: float  # total time with nothing in flight
    service_a_secs: float
    service_c_secs: float  # per record
    tail_factor: float
    drains_in_secs: float  # predicted time until the in-flight work is done


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """The batcher as of the snapshot. Counters only grow; the rest are gauges."""

    queue_depth: int  # items queued (what ``max_queue`` bounds)
    batches_in_flight: int
    last_batch_size: int  # records in the last batch sent
    mean_batch_size: float  # records per batch, exponentially weighted over recent batches
    planned_wait_secs: float  # the wait the policy chose at its last decision
    last_batch_wait_secs: float  # how long the oldest item of the last batch waited in the queue
    last_dispatch_reason: str
    arrival_rate_per_sec: float  # records per second
    # Endpoint slots the current arrival rate keeps busy: rate x predicted service time per record.
    desired_slots: float
    # The counters below count items (one outcome each), not records.
    submitted: int
    ok: int
    late: int
    failed: int
    deferred: int
    deferred_by_reason: dict[str, int] = field(default_factory=dict)
    endpoints: tuple[EndpointStats, ...] = ()
    queued_records: int = 0  # records carried by the queued items
