-- The curated zone with each record once across the fleet.
--
-- A gateway lands a retried request once (its retry ledger covers every worker and restarts), but
-- a device that lost an answer and retried through the load balancer may reach another instance,
-- which has never seen the request: both instances land it. Such copies share the device's
-- (device_id, seq) and event time; this view keeps the copy that arrived first. Records without a
-- seq cannot be told apart from new data and are kept as they are.
--
-- Run it in the gateway's Glue database (the `[glue] database` setting), in Athena or any Trino:
--   aws athena start-query-execution --query-execution-context Database=<database> \
--     --query-string file://deploy/athena/curated_deduplicated.sql --work-group <workgroup>
-- Filter on the partition columns (dt, hour) when querying the view, as with the table.
CREATE OR REPLACE VIEW curated_telemetry_deduplicated AS
SELECT *
FROM (
    SELECT
        c.*,
        row_number() OVER (
            PARTITION BY c.device_id, c.seq, c.event_time
            ORDER BY c.received_at, c.gateway_id, c.ingest_id, c.record_index
        ) AS copy_number
    FROM curated_telemetry AS c
    WHERE c.seq IS NOT NULL
) AS numbered
WHERE copy_number = 1
UNION ALL
SELECT c.*, CAST(1 AS BIGINT) AS copy_number
FROM curated_telemetry AS c
WHERE c.seq IS NULL
