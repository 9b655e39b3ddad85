"""The drill's shape: fleet, balancer, device load and step durations (``drill.toml``).

Every option has a default (what ``make drill`` runs); a file changes any of them. Thresholds come
from the runbook; ``[blocking]`` and ``[thresholds.<step>]`` here replace single numbers of it for
one run, and the report lists every replaced number.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from gateway.config_types import PositiveFloat, PositiveInt, Section

ZoneName = Annotated[str, Meta(pattern=r"^[a-z0-9]{1,8}$")]


class DrillConfigError(Exception):
    """The drill configuration cannot be used."""


class FleetSettings(Section):
    # One gateway instance per zone, each with its own gateway_id, availability zone, WAL and port.
    zones: Annotated[list[ZoneName], Meta(min_length=3)] = msgspec.field(default_factory=lambda: ["a", "b", "c"])
    gateway_id_prefix: str = "drill"  # gateway_id "<prefix>-<zone>"
    region: str = "drill-1"  # availability_zone "<region><zone>"
    workers: PositiveInt = 1
    inference: bool = True  # the curated zone needs the (embedded) model
    max_age_secs: PositiveFloat = 10.0  # connections.max_age_secs of every instance
    max_object_age_secs: PositiveFloat = 2.0
    drain_deadline_secs: PositiveFloat = 15.0
    wal_max_total_bytes: PositiveInt = 256 * 1024 * 1024
    start_timeout_secs: PositiveFloat = 30.0


class BalancerSettings(Section):
    """HAProxy in front of the instances, checking ``/readyz`` the way the ALB's target group does."""

    binary: str = ""  # empty: haproxy on PATH, else /usr/sbin/haproxy
    check_interval_ms: PositiveInt = 500
    fall: PositiveInt = 2
    rise: PositiveInt = 2
    retries: PositiveInt = 3  # connection attempts (a refused connection goes to another instance)
    # false: a refused connection is answered 503 by HAProxy, as an ALB answers 502 to a target that
    # refuses before its health check fails (AWS deregisters an instance before the drain hook stops it)
    redispatch: bool = True
    connect_timeout_ms: PositiveInt = 1000
    server_timeout_secs: PositiveFloat = 15.0


class LoadSettings(Section):
    devices: PositiveInt = 24
    requests_per_sec: PositiveFloat = 48.0  # offered, for the whole fleet of devices
    records_per_request: PositiveInt = 25
    request_timeout_secs: PositiveFloat = 5.0
    retry_deadline_secs: PositiveFloat = 60.0  # a device gives a request up after this long
    max_retry_wait_secs: PositiveFloat = 1.0  # Retry-After is honoured up to this


class LakeSettings(Section):
    # "s3": the instances land through the S3 API in a bucket of moto's server, started by the drill
    kind: Literal["local", "s3"] = "local"
    bucket: str = "drill-lake"


class TimingSettings(Section):
    precheck_secs: PositiveFloat = 8.0  # steady load measured before anything changes
    planned_shift_secs: PositiveFloat = 12.0
    unplanned_loss_secs: PositiveFloat = 12.0
    rebalanced_secs: PositiveFloat = 8.0  # observed after the fleet rebalanced
    sample_interval_secs: PositiveFloat = 0.5


class DrillSettings(Section):
    workdir: str = "var/drill"  # instances' WALs, the lake, logs; emptied at start
    report_dir: str = ""  # empty: <workdir>/report
    runbook: str = ""  # empty: deploy/runbooks/az-failover.yaml of this checkout
    fleet: FleetSettings = FleetSettings()
    balancer: BalancerSettings = BalancerSettings()
    lake: LakeSettings = LakeSettings()
    load: LoadSettings = LoadSettings()
    timing: TimingSettings = TimingSettings()
    blocking: dict[str, float] = {}
    thresholds: dict[str, dict[str, float]] = {}

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir) if self.report_dir else Path(self.workdir) / "report"


def load_drill_settings(path: Path | None) -> DrillSettings:
    if path is None:
        return DrillSettings()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DrillConfigError(f"no drill configuration at {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DrillConfigError(f"cannot read {path}: {exc}") from None
    try:
        settings = msgspec.convert(data, DrillSettings)
    except msgspec.ValidationError as exc:
        raise DrillConfigError(f"{path}: {exc}") from None
    if len(set(settings.fleet.zones)) != len(settings.fleet.zones):
        raise DrillConfigError(f"{path}: fleet.zones has a zone twice")
    return settings


def dump_drill_settings(settings: DrillSettings) -> str:
    """The effective configuration as TOML (``edge-gateway drill --print-config``)."""
    lines: list[str] = []
    data = msgspec.to_builtins(settings)
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml(value)}")
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        if section == "thresholds":
            for step, numbers in values.items():
                lines += ["", f"[thresholds.{step}]", *(f"{k} = {_toml(v)}" for k, v in numbers.items())]
            continue
        lines += ["", f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
