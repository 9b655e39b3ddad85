"""Register the Glue partition of an object that landed in the lake, then announce it.

Invoked by the enrichment hand-off state machine with the S3 "Object Created" event. The gateway
registers partitions itself as it lands objects; this is the catch-all for objects written by
replays, backfills or other writers, so registering an existing partition is a success.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.exceptions import ClientError

# <zone>/<dataset>/dt=YYYY-MM-DD/hour=HH/<gateway_id>-<first_seq>-<last_seq>-<tag>.<ext>; the tag
# (letters) is absent from objects an earlier version landed.
KEY_PATTERN = re.compile(
    r"^(?P<zone>raw|curated|quarantine)/(?P<dataset>[a-z][a-z0-9_]*)/"
    r"dt=(?P<dt>\d{4}-\d{2}-\d{2})/hour=(?P<hour>[01]\d|2[0-3])/"
    r"(?P<gateway_id>[A-Za-z0-9._:-]+)-(?P<first_seq>\d+)-(?P<last_seq>\d+)(?:-(?P<tag>[a-z]+))?\.(?P<ext>ndjson\.zst|parquet)$"
)

ZONE_FORMAT = {
    "raw": "ndjson.zst",
    "curated": "parquet",
    "quarantine": "ndjson.zst",
}


class NotALakeObject(Exception):
    """The key does not follow the lake layout; nothing to register."""


def parse_key(key: str) -> dict[str, str]:
    match = KEY_PATTERN.match(key)
    if match is None:
        raise NotALakeObject(f"key does not follow the lake layout: {key}")
    parts = match.groupdict()
    if ZONE_FORMAT[parts["zone"]] != parts["ext"]:
        raise NotALakeObject(f"zone {parts['zone']} does not hold .{parts['ext']} objects: {key}")
    return parts


def table_name(zone: str, dataset: str) -> str:
    """The gateway's naming of zone tables in the lake database: <zone>_<dataset>."""
    return f"{zone}_{dataset.lower().replace('-', '_').replace('.', '_')}"


def register(event: Mapping[str, Any], env: Mapping[str, str], glue: Any) -> dict[str, Any]:
    bucket = event["detail"]["bucket"]["name"]
    key = event["detail"]["object"]["key"]
    parts = parse_key(key)
    database = env["LAKE_DATABASE"]
    table = table_name(parts["zone"], parts["dataset"])
    values = [parts["dt"], parts["hour"]]
    storage = glue.get_table(DatabaseName=database, Name=table)["Table"]["StorageDescriptor"]
    location = f"s3://{bucket}/{parts['zone']}/{parts['dataset']}/dt={parts['dt']}/hour={parts['hour']}/"
    created = True
    try:
        glue.create_partition(
            DatabaseName=database,
            TableName=table,
            PartitionInput={"Values": values, "StorageDescriptor": {**storage, "Location": location}},
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "AlreadyExistsException":
            raise
        created = False
    return {
        "zone": parts["zone"],
        "dataset": parts["dataset"],
        "database": database,
        "table": table,
        "partition": {"dt": parts["dt"], "hour": parts["hour"]},
        "location": location,
        "created": created,
        "object": {"bucket": bucket, "key": key, "gateway_id": parts["gateway_id"],
                   "first_seq": int(parts["first_seq"]), "last_seq": int(parts["last_seq"])},
    }


def lambda_handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    return register(event, os.environ, boto3.client("glue"))
