"""The gateway's one configuration file, decoded into frozen structs.

Decoding *is* validation: every constraint lives in the types, unknown keys are rejected, and an
error names the offending path (``Expected `int` >= 1 - at `$.limits.max_body_bytes```). Options
carry their unit in their name. ``EDGE_GATEWAY__SECTION__KEY=value`` environment variables override
the file, so a fleet can vary deployment knobs without templating secrets into it.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from connectors.aws.eventbridge import EventBridgeSettings
from connectors.aws.glue import GlueCatalogSettings
from connectors.aws.s3 import S3SinkSettings
from connectors.aws.secrets import SecretsManagerSettings
from gateway.config_types import MiB, NonNegativeInt, Port, PositiveFloat, PositiveInt, Section
from gateway.edge.settings import (
    AdminSettings,
    AdmissionSettings,
    ConnectionSettings,
    OpsSettings,
    ProxySettings,
    RateLimitSettings,
    TlsSettings,
)

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]

ENV_PREFIX = "EDGE_GATEWAY__"

class ListenSettings(Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    backlog: PositiveInt = 1024
    # Worker processes sharing the port (the supervisor binds it once); one per core uses every core.
    workers: Annotated[int, Meta(ge=1, le=256)] = 1
    # With several workers: a worker or the lake process whose event loop has not turned for this
    # long (stuck, or stopped by a signal) is killed and restarted like one that died (not after a
    # pause of the whole instance or machine, which stops the supervisor too); 0: never.
    stall_timeout_secs: Annotated[float, Meta(ge=0)] = 30.0
    # With several workers: one that has not finished starting (its WAL recovered, its listener
    # open) this long after it was started is killed and restarted; 0: wait however long. Generous:
    # a start reads the whole WAL; this is for one stuck on a disk or a lock that never answers.
    start_timeout_secs: Annotated[float, Meta(ge=0)] = 300.0


class GatewaySettings(Section):
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


class AuthSettings(Section):
    mode: Literal["hmac", "none"] = "hmac"
    # "file": registry_path (the embedded default). "secretsmanager": the [secretsmanager] section.
    registry_source: Literal["file", "secretsmanager"] = "file"
    registry_path: str = "devices.json"
    timestamp_window_secs: PositiveInt = 300
    # Verified signatures remembered within the window, so a request sent again as it was lands nothing
    # again (its first answer, or 401 once the retry ledger may have forgotten it); the oldest go first beyond it.
    replay_cache_max_entries: PositiveInt = 200_000


class LimitsSettings(Section):
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


class WalSettings(Section):
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


class LakeSettings(Section):
    kind: Literal["local", "s3"] = "local"
    dir: str = "var/lake"
    target_object_bytes: PositiveInt = 32 * MiB
    max_object_age_secs: PositiveFloat = 60.0
    max_open_partitions: PositiveInt = 512
    max_open_bytes: PositiveInt = 32 * MiB
    zstd_level: Annotated[int, Meta(ge=1, le=19)] = 1
    # With listen.workers > 1: "process" lands and scores every worker's WAL in one process of its
    # own (the lake process), so landing never takes an ingest worker's CPU; "worker": each worker
    # lands its own WAL. A single worker always lands its own.
    landing: Literal["process", "worker"] = "process"
    # How much lower the lake process's CPU priority is than the ingest workers' (a nice increment):
    # when the cores are contended, acknowledgements get them first and the WAL holds what the lake
    # has not landed yet; with cores to spare it changes nothing.
    process_nice: Annotated[int, Meta(ge=0, le=19)] = 10


_HOST_PORT = re.compile(r"[^/]+:[0-9]+\Z")


class InferenceEndpointSettings(Section):
    url: Annotated[str, Meta(min_length=1)]  # host:port, for gRPC and HTTP alike (no scheme)
    protocol: Literal["grpc", "http"] = "grpc"
    name: str = ""

    def __post_init__(self) -> None:
        # Triton's clients take host:port for both protocols; a scheme would only fail at start-up.
        if not _HOST_PORT.match(self.url):
            raise ValueError(f"url must be host:port without a scheme or path, e.g. 10.0.3.7:8001; got {self.url!r}")


class InferenceSettings(Section):
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
    # event loop (acks) alone; "thread" stays in the landing process. "auto": a thread in the lake
    # process (no device waits on its loop, and the hand-over to another process costs more than it
    # spares), another process where a worker lands its own zones.
    offload: Literal["auto", "process", "thread"] = "auto"

    def __post_init__(self) -> None:
        if self.backend == "triton" and not self.endpoints:
            raise ValueError('inference.backend = "triton" needs at least one [[inference.endpoints]]')


class DrainSettings(Section):
    deadline_secs: PositiveFloat = 25.0


class LogSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # One JSON line per HTTP request on the `gateway.access` logger; SIGHUP turns it on or off.
    access_log: bool = False
    # Access lines written per second at most; the rest are counted in the next line's `skipped`.
    access_log_max_per_sec: PositiveInt = 100


class Settings(Section):
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
    # Device security and abuse resistance (gateway/edge/settings.py).
    secretsmanager: SecretsManagerSettings = SecretsManagerSettings()
    tls: TlsSettings = TlsSettings()
    proxy: ProxySettings = ProxySettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    connections: ConnectionSettings = ConnectionSettings()
    admin: AdminSettings = AdminSettings()
    ops: OpsSettings = OpsSettings()

    def __post_init__(self) -> None:
        if self.proxy.client_cert_header and not self.tls.client_ca_path:
            raise ValueError("proxy.client_cert_header needs tls.client_ca_path: forwarded certificates must chain to it")
        if self.admin.enabled and (self.admin.host, self.admin.port) == (self.listen.host, self.listen.port):
            raise ValueError("the admin listener must not share the device listener's address")
        if self.ops.enabled and self.ops.port and (self.ops.host, self.ops.port) == (self.listen.host, self.listen.port):
            raise ValueError("the ops listener must not share the device listener's address")
        if self.ops.enabled and self.admin.enabled and self.ops.port and (self.ops.host, self.ops.port) == (self.admin.host, self.admin.port):
            raise ValueError("the ops listener must not share the admin listener's address")
        if self.lake.kind == "s3" and self.s3 is None:
            raise ValueError('lake.kind = "s3" needs an [s3] section with at least `bucket`')
        if self.glue is not None and self.lake.kind != "s3":
            raise ValueError('[glue] registers S3 partitions: it needs lake.kind = "s3"')
        if self.auth.mode == "none" and not is_loopback(self.listen.host):
            raise ValueError(
                f"refusing to listen on {self.listen.host!r} with auth.mode = \"none\": "
                "unauthenticated ingest is only allowed on a loopback address"
            )


def lake_process_lands(settings: Settings) -> bool:
    """Whether one lake process lands every worker's WAL (several workers, ``lake.landing = "process"``)."""
    return settings.listen.workers > 1 and settings.lake.landing == "process"


# Sections that SIGHUP may replace in a running gateway; the others need a restart.
RELOADABLE_SECTIONS = frozenset({"limits", "log", "auth", "proxy", "rate_limits", "admission", "connections"})


def with_run_time_sections(running: Settings, new: Settings) -> Settings:
    """What a reload runs with: ``new``'s run-time sections, ``running``'s others (they need a restart)."""
    return Settings(**{f.name: getattr(new if f.name in RELOADABLE_SECTIONS else running, f.name) for f in msgspec.structs.fields(Settings)})


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path``, or its nearest ancestor that exists: where a directory not created yet would live."""
    found = Path(path).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def wal_budget_problem(settings: Settings) -> str | None:
    """Why the WAL budget cannot fit the filesystem under ``wal.dir`` (every worker has its own log), or None."""
    wal = settings.wal
    try:
        stats = os.statvfs(nearest_existing(wal.dir))
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


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, and where it came from."""

    message: str  # msgspec's wording, ending in "- at `$.section.key`" where it has a place
    source: str  # "gateway.toml:12", "EDGE_GATEWAY__LIMITS__MAX_BODY_BYTES" or "<defaults>"
    path: str = ""  # "limits.max_body_bytes"
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.source}: {'warning: ' if self.severity == 'warning' else ''}{self.message}"


class ConfigError(Exception):
    """The configuration cannot be loaded; the message says where and why (every problem, one a line)."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [Problem(message, "")]


@dataclass
class Sources:
    """Where each setting came from: a line of the file or an environment variable."""

    file: str = "<defaults>"
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    env: dict[tuple[str, str], str] = field(default_factory=dict)

    def of(self, *path: str) -> str:
        if len(path) >= 2 and (path[0], path[1]) in self.env:
            return self.env[(path[0], path[1])]
        for n in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                return f"{self.file}:{line}"
        return self.file


def read_config(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> tuple[Settings | None, list[Problem], Sources]:
    """Decode the file (or the defaults) with environment overrides; every problem at once, each with its source."""
    raw: dict[str, Any] = {}
    sources = Sources()
    if path is not None:
        sources.file = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, [Problem("no such file", str(path))], sources
        except OSError as exc:
            return None, [Problem(f"cannot read it: {exc.strerror}", str(path))], sources
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            return None, [Problem(f"not valid TOML: {exc}", str(path))], sources
        sources.lines = _key_lines(text)
    try:
        _apply_env_overrides(raw, os.environ if environ is None else environ, sources.env)
    except ConfigError as exc:
        return None, exc.problems, sources
    problems = _check_sections(raw, sources)
    if problems:
        return None, problems, sources
    try:
        return msgspec.convert(raw, Settings), [], sources
    except msgspec.ValidationError as exc:  # a rule across sections (Settings.__post_init__)
        return None, [Problem(str(exc), sources.file)], sources


def load_settings(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Settings:
    """Read the TOML file (or the defaults), apply environment overrides, validate."""
    settings, problems, _ = read_config(path, environ)
    if settings is None:
        raise ConfigError("\n".join(str(p) for p in problems), problems)
    return settings


def _check_sections(raw: dict[str, Any], sources: Sources) -> list[Problem]:
    """Each key on its own, so one run reports every mistake; then each section's own rules."""
    problems: list[Problem] = []
    sections = {f.name: f for f in msgspec.structs.fields(Settings)}
    for section, values in raw.items():
        where = sources.of(section)
        spec = sections.get(section)
        if spec is None:
            problems.append(Problem(f"Object contains unknown field `{section}` - at `$`{_did_you_mean(section, sections)}", where, section))
            continue
        struct = _struct_of(spec.type)
        if not isinstance(values, dict):
            problems.append(Problem(f"Expected a [{section}] table, got `{type(values).__name__}` - at `$.{section}`", where, section))
            continue
        fields = {f.name: f for f in msgspec.structs.fields(struct)}
        section_ok = True
        for key, value in values.items():
            where = sources.of(section, key)
            spec_field = fields.get(key)
            if spec_field is None:
                message = f"Object contains unknown field `{key}` - at `$.{section}`{_did_you_mean(key, fields)}"
                problems.append(Problem(message, where, f"{section}.{key}"))
                section_ok = False
                continue
            try:
                msgspec.convert(value, spec_field.type)
            except msgspec.ValidationError as exc:
                problems.append(Problem(_located(str(exc), f"$.{section}.{key}") + _allowed(spec_field.type, str(exc)), where, f"{section}.{key}"))
                section_ok = False
        if section_ok:
            try:
                msgspec.convert(values, struct)
            except msgspec.ValidationError as exc:  # a missing key, or a rule across the section's keys
                problems.append(Problem(_located(str(exc), f"$.{section}"), sources.of(section), section))
    return problems


def _struct_of(annotation: Any) -> type:
    """``S3SinkSettings | None`` -> ``S3SinkSettings``."""
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
            return arg
    return annotation


def _located(message: str, at: str) -> str:
    """msgspec's message for a value converted on its own, with the value's place in the file."""
    if " - at `$" in message:
        return message.replace(" - at `$", f" - at `{at}", 1)
    return f"{message} - at `{at}`"


def _allowed(annotation: Any, message: str) -> str:
    if "enum value" not in message:
        return ""
    values = _literal_values(annotation)
    return f" (allowed: {', '.join(f'`{v}`' for v in values)})" if values else ""


def _literal_values(annotation: Any) -> tuple:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _literal_values(arg)
        if found:
            return found
    return ()


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line each table and key is written on (the first, for arrays of tables)."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
        if header:
            table = tuple(part.strip().strip('"') for part in header.group(1).split("."))
            lines.setdefault(table, number)
            continue
        key = re.match(r"^([A-Za-z0-9_\-.\"]+)\s*=", stripped)
        if key:
            lines.setdefault(table + tuple(part.strip().strip('"') for part in key.group(1).split(".")), number)
    return lines


def _apply_env_overrides(raw: dict[str, Any], environ: dict[str, str] | os._Environ[str], sources: dict[tuple[str, str], str] | None = None) -> None:
    problems = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if len(path) != 2 or not all(path):
            problems.append(Problem(f"expected {ENV_PREFIX}<SECTION>__<KEY>", name))
            continue
        section = raw.setdefault(path[0], {})
        if not isinstance(section, dict):
            problems.append(Problem(f"`{path[0]}` is not a section", name))
            continue
        section[path[1]] = _parse_env_value(value)
        if sources is not None:
            sources[(path[0], path[1])] = name
    if problems:
        raise ConfigError("\n".join(str(p) for p in problems), problems)

def _parse_env_value(value: str) -> Any:
    """Read a value as TOML (numbers, booleans, quoted strings, arrays), else keep the text."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def effective_config(settings: Settings) -> dict[str, Any]:
    return msgspec.to_builtins(settings)


def dump_toml(settings: Settings, sources: Sources | None = None) -> str:
    """The effective configuration as TOML that loads back to the same settings.

    A value an environment variable set says so in a comment on its line.
    """
    lines: list[str] = []
    for section, values in effective_config(settings).items():
        if values is None:
            continue
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            line = f"{_toml_key(key)} = {_toml_value(value)}"
            env = sources.env.get((section, key)) if sources is not None else None
            lines.append(f"{line}  # {env}" if env else line)
        lines.append("")
    return "\n".join(lines)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else msgspec.json.encode(key).decode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    return msgspec.json.encode(str(value)).decode()
