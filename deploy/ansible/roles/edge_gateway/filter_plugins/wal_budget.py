"""How many bytes each gateway worker's write-ahead log may hold on the file system it lives on."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

MIB = 1024 * 1024


def wal_budget(filesystem_bytes, workers, segment_bytes, share=0.85):
    """[wal] max_total_bytes per worker: ``share`` of the file system, split between the workers.

    Every worker keeps its own WAL directory on the same file system. A WAL can pass its limit by one
    append before backpressure starts, and keeps consumer positions and a spool beside its segments,
    so each worker's part leaves one segment of slack. Rounded down to whole MiB; 0 when not even
    that fits (the role then refuses the host).
    """
    try:
        filesystem_bytes, workers, segment_bytes = int(filesystem_bytes), int(workers), int(segment_bytes)
        share = float(share)
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError(f"edge_gateway_wal_budget: {exc}") from exc
    if filesystem_bytes < 0 or workers < 1 or segment_bytes < 1 or not 0 < share <= 1:
        raise AnsibleFilterError(
            "edge_gateway_wal_budget: needs a file system size >= 0, at least one worker, a positive "
            f"segment size and a share in (0, 1]; got {filesystem_bytes}, {workers}, {segment_bytes}, {share}"
        )
    per_worker = int(filesystem_bytes * share) // workers - segment_bytes
    return max(0, per_worker // MIB * MIB)


class FilterModule:
    def filters(self):
        return {"edge_gateway_wal_budget": wal_budget}
