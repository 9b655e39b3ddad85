"""The gateway's one configuration file, decoded into frozen structs.

Decoding *is* validation: every constraint lives in the types, unknown keys are rejected, and an
error names the offending path (``Expected `int` >= 1 - at `$.limits.max_body_bytes```). Options
carry their unit in their name. ``EDGE_GATEWAY__SECTION__KEY=value`` environment variables override
the file, so a fleet can vary deployment knobs without templating secrets into it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from connectors.eventbridge import EventBridgeSettings
from connectors.glue import GlueCatalogSettings
from connectors.s3 import S3SinkSettings
from connectors.secrets import SecretsManagerSettings
from gateway.security_settings import (
    AdminSettings,
    AdmissionSettings,
    ConnectionSettings,
    ProxySettings,
    RateLimitSettings,
    TlsSettings,
)

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]

ENV_PREFIX = "EDGE_GATEWAY__"
MiB = 1024 * 1024


class ConfigError(Exception):
    """The configuration cannot be loaded; the message says where and why."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ListenSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    backlog: PositiveInt = 1024
    # Worker processes sharing the port (SO_REUSEPORT); one per core uses every core.
    workers: Annotated[int, Meta(ge=1, le=256)] = 1


class GatewaySettings(_Section):
    # Empty means "the host name": it names lake objects, so it must be unique in the fleet.
    gateway_id: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = ""
    # Empty means "ask EC2 instance metadata (IMDSv2)"; unreachable metadata falls back to "unknown".
    availability_zone: Annotated[str, Meta(max_length=64)] = ""
    metadata_endpoint: str = "http://169.254.169.254"
    metadata_timeout_secs: PositiveFloat = 1.0
    dataset: Name = "telemetry"
    # Records stamped further in the future than this, or older than max_event_age_secs, are
    # partitioned by arrival time: a wrong device clock must not scatter data across the lake.
    max_clock_skew_secs: PositiveInt = 3600
    max_event_age_secs: PositiveInt = 7 * 24 * 3600


class AuthSettings(_Section):
    mode: Literal["hmac", "none"] = "hmac"
    # "file": registry_path (the embedded default). "secretsmanager": the [secretsmanager] section.
    registry_source: Literal["file", "secretsmanager"] = "file"
    registry_path: str = "devices.json"
    timestamp_window_secs: PositiveInt = 300
    # Verified signatures remembered to refuse replays within the window; the oldest go first beyond it.
    replay_cache_max_entries: PositiveInt = 200_000


class LimitsSettings(_Section):
    max_body_bytes: PositiveInt = 16 * MiB
    max_decompressed_bytes: PositiveInt = 64 * MiB
    # JSON arrays and msgpack are whole documents: they are buffered, so they get a smaller bound.
    max_document_bytes: PositiveInt = 8 * MiB
    max_record_bytes: PositiveInt = 64 * 1024
    max_records_per_request: PositiveInt = 100_000
    max_errors_reported: NonNegativeInt = 100
    # Decoded records beyond this per request spill to a temporary file until the request commits.
    spool_memory_bytes: PositiveInt = 4 * MiB
    dedup_window_secs: PositiveInt = 600
    dedup_max_keys: PositiveInt = 100_000
    # Sequence numbers remembered per request; beyond it a request's records are not deduplicated.
    dedup_max_keys_per_request: PositiveInt = 10_000

    def __post_init__(self) -> None:
        if self.max_record_bytes > self.max_decompressed_bytes:
            raise ValueError("max_record_bytes must not exceed max_decompressed_bytes")


class WalSettings(_Section):
    dir: str = "var/wal"
    segment_bytes: PositiveInt = 64 * MiB
    max_total_bytes: PositiveInt = 2048 * MiB
    # fsync may only be turned off for benchmarks that measure what durability costs.
    fsync: bool = True
    retry_after_secs: PositiveInt = 5

    def __post_init__(self) -> None:
        # A segment is released only once a newer one exists, so the log needs room for two at least.
        if self.max_total_bytes < 2 * self.segment_bytes:
            raise ValueError(
                f"max_total_bytes ({self.max_total_bytes}) must be at least twice segment_bytes ({self.segment_bytes}): "
                "a full segment is released only once the next one exists"
            )


class LakeSettings(_Section):
    kind: Literal["local", "s3"] = "local"
    dir: str = "var/lake"
    target_object_bytes: PositiveInt = 32 * MiB
    max_object_age_secs: PositiveFloat = 60.0
    max_open_partitions: PositiveInt = 64
    zstd_level: Annotated[int, Meta(ge=1, le=19)] = 1


class InferenceEndpointSettings(_Section):
    url: Annotated[str, Meta(min_length=1)]  # host:port (gRPC) or http://host:port (HTTP)
    protocol: Literal["grpc", "http"] = "grpc"
    name: str = ""


class InferenceSettings(_Section):
    """Steps 8-9: scoring records for the curated zone (off: no curated zone)."""

    enabled: bool = True
    # "local": the embedded CPU model; "triton": the endpoints below (KServe v2), with failover.
    backend: Literal["local", "triton"] = "local"
    endpoints: list[InferenceEndpointSettings] = []
    model: Name = "telemetry_anomaly"
    model_version: str = ""
    features: tuple[Annotated[str, Meta(min_length=1)], ...] = (
        "temperature_c", "humidity_pct", "pressure_hpa", "battery_v", "rssi_dbm", "cpu_pct", "mem_pct", "uptime_s",
    )
    # A record missing a feature: "fill" it with the model's typical value, or "reject" (status failed).
    missing: Literal["fill", "reject"] = "fill"
    # Records not scored within this long land in curated with inference.status = "deferred".
    max_defer_secs: PositiveFloat = 2.0
    max_batch_records: PositiveInt = 1024
    max_wait_ms: Annotated[float, Meta(ge=0)] = 5.0
    call_timeout_secs: PositiveFloat = 1.0
    # After this long without calls an endpoint is idle: readiness is checked and it is warmed up again.
    idle_after_secs: PositiveFloat = 60.0
    max_queue_records: PositiveInt = 65536
    # Where records are decoded for the curated zone: "process" uses another core and leaves the
    # event loop (acks) alone; "thread" stays in this process.
    offload: Literal["process", "thread"] = "process"

    def __post_init__(self) -> None:
        if self.backend == "triton" and not self.endpoints:
            raise ValueError('inference.backend = "triton" needs at least one [[inference.endpoints]]')


class DrainSettings(_Section):
    deadline_secs: PositiveFloat = 25.0


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False


class Settings(_Section):
    listen: ListenSettings = ListenSettings()
    gateway: GatewaySettings = GatewaySettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    wal: WalSettings = WalSettings()
    lake: LakeSettings = LakeSettings()
    inference: InferenceSettings = InferenceSettings()
    drain: DrainSettings = DrainSettings()
    log: LogSettings = LogSettings()
    # Connector sections, present only when used (lake.kind = "s3" needs [s3]).
    s3: S3SinkSettings | None = None
    glue: GlueCatalogSettings | None = None
    eventbridge: EventBridgeSettings | None = None
    # Device security and abuse resistance (gateway/security_settings.py).
    secretsmanager: SecretsManagerSettings = SecretsManagerSettings()
    tls: TlsSettings = TlsSettings()
    proxy: ProxySettings = ProxySettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    connections: ConnectionSettings = ConnectionSettings()
    admin: AdminSettings = AdminSettings()

    def __post_init__(self) -> None:
        if self.proxy.client_cert_header and not self.tls.client_ca_path:
            raise ValueError("proxy.client_cert_header needs tls.client_ca_path: forwarded certificates must chain to it")
        if self.admin.enabled and (self.admin.host, self.admin.port) == (self.listen.host, self.listen.port):
            raise ValueError("the admin listener must not share the device listener's address")
        if self.lake.kind == "s3" and self.s3 is None:
            raise ValueError('lake.kind = "s3" needs an [s3] section with at least `bucket`')
        if self.glue is not None and self.lake.kind != "s3":
            raise ValueError('[glue] registers S3 partitions: it needs lake.kind = "s3"')
        if self.auth.mode == "none" and not is_loopback(self.listen.host):
            raise ValueError(
                f"refusing to listen on {self.listen.host!r} with auth.mode = \"none\": "
                "unauthenticated ingest is only allowed on a loopback address"
            )


# Sections that SIGHUP may replace in a running gateway; the others need a restart.
RELOADABLE_SECTIONS = frozenset({"limits", "log", "auth", "proxy", "rate_limits", "admission", "connections"})


def wal_budget_problem(settings: Settings) -> str | None:
    """Why the WAL budget cannot fit the filesystem under ``wal.dir`` (every worker has its own log), or None."""
    wal = settings.wal
    path = Path(wal.dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    size = stats.f_blocks * stats.f_frsize
    budget = wal.max_total_bytes * settings.listen.workers
    if budget > size:
        return (
            f"wal.max_total_bytes ({wal.max_total_bytes}) x listen.workers ({settings.listen.workers}) = {budget} bytes, "
            f"but the filesystem holding {wal.dir} is {size} bytes: lower wal.max_total_bytes to at most "
            f"{size // settings.listen.workers} or give the WAL a larger volume"
        )
    return None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Settings:
    """Read the TOML file (or the defaults), apply environment overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _apply_env_overrides(raw, os.environ if environ is None else environ)
    try:
        return msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path or '<defaults>'}: {exc}") from None


def _apply_env_overrides(raw: dict[str, Any], environ: dict[str, str] | os._Environ[str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if len(path) != 2 or not all(path):
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        section = raw.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: `{path[0]}` is not a section")
        section[path[1]] = _parse_env_value(value)


def _parse_env_value(value: str) -> Any:
    """Read a value as TOML (numbers, booleans, quoted strings, arrays), else keep the text."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def effective_config(settings: Settings) -> dict[str, Any]:
    return msgspec.to_builtins(settings)


def dump_toml(settings: Settings) -> str:
    """Render the effective configuration as TOML, the same format the file is written in."""
    lines: list[str] = []
    for section, values in effective_config(settings).items():
        if values is None:
            continue
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return msgspec.json.encode(str(value)).decode()
