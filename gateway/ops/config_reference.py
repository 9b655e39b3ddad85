"""The configuration reference (``docs/configuration.md``), generated from the config structs.

Types, constraints and defaults come from the msgspec structs; descriptions from the comments
written above (or beside) each field in the source, falling back to ``NOTES`` for fields the
source leaves uncommented; units from the option's name (``_bytes``, ``_secs``, ``_ms``, ...).
A test regenerates the page and compares it with the checked-in one, so it is never stale:

    python -m gateway.ops.config_reference > docs/configuration.md
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from typing import Any, Literal

import msgspec

from gateway.config_types import MiB
from gateway.settings import ENV_PREFIX, RELOADABLE_SECTIONS, Settings

# Descriptions for fields whose definition carries no comment; keyed "section.key".
NOTES: dict[str, str] = {
    "listen.host": "Address the device listener binds (`0.0.0.0`: every IPv4 interface; `::`: every interface, IPv4 and IPv6).",
    "listen.port": "Port of the device listener (0: any free port, for tests).",
    "listen.backlog": "Pending connections the kernel queues before the gateway accepts them.",
    "gateway.metadata_endpoint": "Where EC2 instance metadata (IMDSv2) is asked for the availability zone.",
    "gateway.metadata_timeout_secs": "How long to wait for instance metadata before using `unknown`.",
    "gateway.dataset": "The dataset part of every lake key (`<zone>/<dataset>/dt=.../hour=...`).",
    "auth.mode": "`hmac`: every request is signed (scheme v1); `none`: no authentication, loopback only.",
    "auth.registry_path": "The device registry file (`edge-gateway device add` writes it); re-read when it changes.",
    "auth.timestamp_window_secs": "A signed `X-Timestamp` further than this from the gateway's clock is refused (401).",
    "limits.max_body_bytes": "Largest body as sent (compressed, if it is); beyond it: 413.",
    "limits.max_decompressed_bytes": "Largest body once decompressed (decompression-bomb guard); beyond it: 413.",
    "limits.max_record_bytes": "Largest single record; beyond it the record is quarantined.",
    "limits.max_records_per_request": "Most records one request may carry; beyond it: 413.",
    "limits.max_errors_reported": "Rejected records listed in a 202's `errors` (the rest are counted).",
    "limits.dedup_window_secs": "How long a retried request or `(device_id, seq)` is recognised as a duplicate.",
    "limits.dedup_max_keys": "Retry keys, and runs of consecutive sequence numbers, remembered per kind within the window.",
    "wal.dir": "Where the write-ahead log lives; each worker uses its own directory under it. Use a local disk: on a tmpfs or ramfs, what is acknowledged and not yet landed is lost when the machine restarts (warned at start).",
    "wal.segment_bytes": "Size of one WAL segment file; a segment is deleted once every zone has landed it.",
    "wal.max_total_bytes": "WAL capacity per worker; when full, devices get 503 with Retry-After.",
    "wal.retry_after_secs": "`Retry-After` of a 503 answered because the WAL is full or its disk is.",
    "lake.kind": "`local`: a directory (`lake.dir`); `s3`: a bucket (`[s3]`).",
    "lake.dir": "The local lake's root directory (with `kind = \"local\"`); not `wal.dir`, inside it or above it.",
    "lake.target_object_bytes": "An object is rolled once this much input has gone into it.",
    "lake.max_object_age_secs": "An open object is rolled at this age even if small: how long a record may wait to land.",
    "lake.max_open_partitions": "Objects open at once per zone and WAL (one per hour partition); beyond it the least recently written is rolled early. A read of frames spanning more hours than this rolls at most one object per hour.",
    "lake.max_open_bytes": "Memory the open objects of a zone may hold together, per WAL (compressed lines; curated columns not yet in a row group and the Parquet before them); beyond it the largest are rolled early until they hold half of it. Bounds the lake's memory when a backfill writes many hours at once.",
    "lake.zstd_level": "zstd level of raw and quarantine objects (and of curated Parquet pages).",
    "lake.landing": "With `listen.workers` > 1: `process` lands and scores every worker's WAL in one lake process, apart from the ingest workers; `worker`: each worker lands its own WAL. One worker always lands its own.",
    "inference.endpoints": "Triton endpoints (KServe v2), tried with failover: `url`, `protocol`, `name`.",
    "inference.model": "The model's name on the endpoints.",
    "inference.model_version": "The model version to call; empty: the endpoint's default.",
    "inference.features": "Metrics fed to the model, in this order.",
    "inference.max_batch_records": "Most records in one inference call.",
    "inference.max_wait_ms": "Longest the batcher waits to fill a batch.",
    "inference.call_timeout_secs": "An inference call slower than this fails (and the endpoint's breaker counts it).",
    "inference.max_queue_records": "Records waiting for scoring at most; beyond it new ones are deferred.",
    "inference_endpoints.protocol": "`grpc` or `http` (KServe v2 over either).",
    "inference_endpoints.name": "The endpoint's name in metrics and logs (default: its URL).",
    "drain.deadline_secs": "On SIGTERM, how long in-flight requests and landing may take; the rest stays in the WAL.",
    "tls.enabled": "Terminate TLS on the device listener (`cert_path`, `key_path`).",
    "tls.cert_path": "PEM certificate chain of the device listener.",
    "tls.key_path": "PEM private key of the device listener (readable by the service account only).",
    "tls.min_version": "Oldest TLS version accepted.",
    "tls.handshake_timeout_secs": "A TLS handshake taking longer than this is dropped.",
    "rate_limits.enabled": "Per-device rate limits (429 with Retry-After).",
    "rate_limits.max_retry_after_secs": "The longest `Retry-After` a 429 asks for.",
    "admission.max_inflight_bytes": "Body bytes of requests in progress at most; beyond it: 503.",
    "admission.max_loop_lag_ms": "Event-loop lag beyond which new requests get 503 (the process is saturated).",
    "admission.loop_turn_ms": "Milliseconds of request decoding per turn of a worker's event loop before it reads its sockets again; 0: all that is ready.",
    "admission.retry_after_secs": "`Retry-After` of an overload 503 (the least it asks for).",
    "admin.enabled": "The operator API, status page and tap, on their own listener (never the device one).",
    "admin.host": "Address of the admin listener.",
    "admin.port": "Port of the admin listener.",
    "s3.bucket": "The lake's bucket (required with `lake.kind = \"s3\"`).",
    "s3.addressing_style": "`virtual` (bucket.host), `path` (host/bucket) or `auto`.",
    "s3.multipart_threshold_bytes": "Objects at least this large are uploaded in parts.",
    "s3.part_size_bytes": "Size of one part of a multipart upload.",
    "s3.max_parts_in_flight": "Parts of one object uploaded at once.",
    "s3.checksum_algorithm": "Checksum S3 verifies on every upload.",
    "s3.storage_class": "Storage class of landed objects.",
    "s3.tags": "Tags set on every object (at most 10).",
    "s3.initial_concurrency": "Uploads in flight at start; adapted between `min_concurrency` and `max_concurrency`.",
    "s3.min_concurrency": "Fewest uploads in flight the adaptive limit goes down to (on throttling).",
    "s3.max_concurrency": "Most uploads in flight the adaptive limit goes up to.",
    "s3.connect_timeout_secs": "Connecting to S3 gives up after this long (then retried).",
    "s3.read_timeout_secs": "An S3 answer slower than this fails (then retried).",
    "gateway.max_event_age_secs": "Records stamped further in the past than this are partitioned by arrival time.",
    "inference.enabled": "Score records and land the curated zone (Parquet); off: raw and quarantine only (turned off, the curated zone first lands what it owes).",
    "log.level": "Log level of the JSON lines on stderr; `DEBUG` adds the gateway's own detail.",
    "glue.database": "The Glue database holding the lake's tables (required in `[glue]`).",
    "glue.datasets": "Datasets whose tables are created at start.",
    "glue.table_prefix": "Prefix of every table name (`<prefix><zone>_<dataset>`).",
    "glue.connect_timeout_secs": "Connecting to Glue gives up after this long (then retried).",
    "glue.read_timeout_secs": "A Glue answer slower than this fails (then retried).",
    "eventbridge.event_bus_name": "The bus landed-object events are put on.",
    "eventbridge.source": "The events' `source`.",
    "eventbridge.detail_type": "The events' `detail-type`.",
    "eventbridge.connect_timeout_secs": "Connecting to EventBridge gives up after this long (then retried).",
    "eventbridge.read_timeout_secs": "An EventBridge answer slower than this fails (then retried).",
    "secretsmanager.secret_ids": "Secrets holding the devices (`{\"devices\": {...}}`), one per shard of the fleet.",
    "secretsmanager.connect_timeout_secs": "Connecting to Secrets Manager gives up after this long (then retried).",
    "secretsmanager.read_timeout_secs": "A Secrets Manager answer slower than this fails (then retried).",
    "rate_limits.burst_records": "Records a device may send at once before `records_per_sec` applies.",
    "rate_limits.burst_bytes": "Body bytes a device may send at once before `bytes_per_sec` applies.",
    "rate_limits.burst_auth_failures": "Failed authentications a source may make at once before `auth_failures_per_sec` applies.",
    "connections.body_idle_timeout_secs": "A body that pauses longer than this is cut off (408).",
    "connections.body_rate_grace_secs": "How long a body may start slowly before `min_body_bytes_per_sec` applies.",
    "connections.max_age_jitter": "Fraction of `max_age_secs` by which each connection's age limit varies, so they do not all close at once.",
    "retry.initial_interval_secs": "First wait between attempts (full jitter).",
    "retry.max_interval_secs": "Longest wait between attempts.",
    "retry.multiplier": "Each wait is this many times the previous one, up to `max_interval_secs`.",
}

_UNITS = {
    "bytes": "bytes",
    "secs": "seconds",
    "ms": "milliseconds",
    "records": "records",
    "entries": "entries",
    "keys": "keys",
    "connections": "connections",
    "requests": "requests",
    "hops": "hops",
    "devices": "devices",
    "events": "events",
    "failures": "failures",
    "parts": "parts",
}


def describe_type(annotation: Any) -> str:
    """A reader's words for a field's type and constraints."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *metas = typing.get_args(annotation)
        words = [describe_type(base)]
        for meta in metas:
            if isinstance(meta, msgspec.Meta):
                words += _constraints(meta)
        return ", ".join(words)
    if origin is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(describe_type(a) for a in args) + (" (optional)" if len(args) < len(typing.get_args(annotation)) else "")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict:
        key, value = typing.get_args(annotation)
        return f"table of {describe_type(key)} to {describe_type(value)}"
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(meta: msgspec.Meta) -> list[str]:
    out = []
    for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        value = getattr(meta, attr)
        if value is not None:
            out.append(f"{sign} {_number(value)}")
    if meta.min_length is not None:
        out.append(f"length ≥ {meta.min_length}")
    if meta.max_length is not None:
        out.append(f"length ≤ {meta.max_length}")
    if meta.pattern is not None:
        out.append(f"matching `{meta.pattern}`")
    return out


def _number(value: float) -> str:
    if isinstance(value, int) and value >= MiB and value % MiB == 0:
        return f"{value} ({value // MiB} MiB)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def unit(name: str) -> str:
    """The unit an option's name carries: `max_body_bytes` bytes, `records_per_sec` records/s."""
    words = name.split("_")
    if words[-2:] == ["per", "sec"]:
        noun = words[-3] if len(words) >= 3 else ""
        return f"{_UNITS.get(noun, noun)}/s"
    for word in reversed(words):
        if word in _UNITS:
            return _UNITS[word]
    return ""


def default(info: msgspec.structs.FieldInfo, parent: msgspec.Struct | None = None) -> str:
    """The default, as TOML; a table inside another takes its values from the parent's default."""
    if parent is not None:
        value = getattr(parent, info.name)
    elif info.default is msgspec.NODEFAULT and info.default_factory is msgspec.NODEFAULT:
        return "required"
    else:
        value = info.default if info.default is not msgspec.NODEFAULT else info.default_factory()
    if isinstance(value, msgspec.Struct):
        return "see below"
    from gateway.settings import _toml_value

    text = f"`{_toml_value(msgspec.to_builtins(value))}`"
    if isinstance(value, int) and not isinstance(value, bool) and value >= MiB and value % MiB == 0:
        text += f" ({value // MiB} MiB)"
    return text


def comments(struct: type) -> dict[str, str]:
    """Comment lines directly above each field (and a comment at the end of its line), inherited ones too."""
    found: dict[str, str] = {}
    # Base structs first, so a subclass's own comment wins over the one on the field it redeclares.
    for cls in reversed(struct.__mro__):
        if isinstance(cls, type) and issubclass(cls, msgspec.Struct) and cls is not msgspec.Struct:
            found.update({name: text for name, text in _own_comments(cls).items() if text})
    return found


def _own_comments(struct: type) -> dict[str, str]:
    lines = inspect.getsource(struct).splitlines()
    found: dict[str, str] = {}
    pending: list[str] = []
    field = re.compile(r"^\s{4}([a-z_][a-z0-9_]*)\s*:")
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = field.match(line)
        if m:
            text = " ".join(pending)
            trailing = re.search(r"#\s*(.+)$", line)
            if trailing and "noqa" not in trailing.group(1):
                text = f"{text} {trailing.group(1)}".strip()
            found[m.group(1)] = text
        if not stripped.startswith("#"):
            pending = []
        if stripped.startswith("def "):
            break
    return found


def _struct_of(annotation: Any) -> type | None:
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
            return arg
        if typing.get_origin(arg) in (list, tuple):
            inner = _struct_of(typing.get_args(arg)[0])
            if inner is not None:
                return inner
    return None


def options() -> list[tuple[str, str, msgspec.structs.FieldInfo, str, str]]:
    """Every option: (table, key, field, default, description), in the order of the structs."""
    out = []

    def walk(table: str, struct: type, note_prefix: str, parent: msgspec.Struct | None = None) -> None:
        notes = comments(struct)
        nested = []
        for info in msgspec.structs.fields(struct):
            text = notes.get(info.name) or NOTES.get(f"{note_prefix}.{info.name}", "")
            inner = _struct_of(info.type)
            if not text and inner is not None:
                text = f"A table of its own: `[{table}.{info.name}]` below."
            out.append((table, info.name, info, default(info, parent), text))
            if inner is not None:
                nested.append((info, inner))
        for info, inner in nested:
            array = typing.get_origin(info.type) in (list, tuple)
            name = f"{table}.{info.name}"
            value = getattr(parent, info.name) if parent is not None else info.default
            instance = value if isinstance(value, msgspec.Struct) else None
            walk(f"[{name}]]" if array else name, inner, info.name if info.name == "retry" else f"{note_prefix}_{info.name}", instance)

    for section in msgspec.structs.fields(Settings):
        walk(section.name, _struct_of(section.type), section.name)
    return out


def render() -> str:
    rows = options()
    out = [
        "# Configuration reference",
        "",
        "Generated from the configuration structs by `python -m gateway.ops.config_reference`; a test keeps it",
        "current. One TOML file; every option below is optional unless marked *required*, and an unknown",
        "key is an error. `EDGE_GATEWAY__<SECTION>__<KEY>=value` overrides a top-level section's key",
        f"(`{ENV_PREFIX}LISTEN__PORT=9000`). `edge-gateway check-config FILE` reports every mistake at once",
        "and prints the effective configuration. An annotated example is `docs/gateway.example.toml`.",
        "",
        "SIGHUP reloads these sections in a running gateway: "
        + ", ".join(f"`[{s}]`" for s in sorted(RELOADABLE_SECTIONS))
        + "; a change anywhere else is logged as needing a restart. The device registry file is re-read",
        "whenever it changes.",
        "",
    ]
    tables: dict[str, list] = {}
    for table, key, info, text_default, text in rows:
        tables.setdefault(table, []).append((key, info, text_default, text))
    optional_sections = {f.name for f in msgspec.structs.fields(Settings) if type(None) in typing.get_args(f.type)}
    for table, fields in tables.items():
        header = f"[{table}]" if not table.endswith("]]") else f"[{table}"
        out.append(f"## `{header}`")
        out.append("")
        struct_doc = _doc_for(table)
        if struct_doc:
            out.append(struct_doc)
            out.append("")
        if table in optional_sections:
            out.append("This section is absent by default; writing it turns the feature on.")
            out.append("")
        out.append("| option | type | default | unit | description |")
        out.append("|---|---|---|---|---|")
        for key, info, text_default, text in fields:
            cells = [f"`{key}`", describe_type(info.type), text_default, unit(key), text]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def _doc_for(table: str) -> str:
    path = table.strip("[]").split(".")
    struct: Any = Settings
    for part in path:
        spec = {f.name: f for f in msgspec.structs.fields(struct)}.get(part)
        if spec is None:
            return ""
        struct = _struct_of(spec.type)
    doc = inspect.getdoc(struct) or ""
    own = doc if struct.__doc__ and doc else ""
    return " ".join(own.split("\n\n")[0].split())


if __name__ == "__main__":
    sys.stdout.write(render())
