"""The drill's runbook: steps, checks and thresholds, read from ``deploy/runbooks/az-failover.yaml``.

The same document drives the cloud drill's Lambda (deploy/cloudformation/lambdas/drill), so a
threshold changes in one place. Loading is strict: an unknown key, a missing threshold or a step
out of order is an error that names it, never a silently ignored line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

# The steps in the order they run; the local drill implements each one (gateway/drill/steps.py).
STEP_IDS = ("precheck", "planned_shift", "unplanned_loss", "restore", "postcheck")

# Every threshold a step reads; the runbook must give each one and nothing else.
THRESHOLDS: dict[str, frozenset[str]] = {
    "precheck": frozenset({"min_ready_instances", "max_error_rate_percent", "max_wal_backlog_bytes"}),
    "planned_shift": frozenset(
        {"min_ready_outside_shifted_zone", "max_shift_secs", "max_unretried_errors", "max_abandoned_requests"}
    ),
    "unplanned_loss": frozenset({"max_recovery_secs", "min_goodput_percent", "max_abandoned_requests"}),
    "restore": frozenset({"max_ready_secs", "max_backlog_landed_secs", "max_rebalance_secs", "min_share_percent"}),
    "postcheck": frozenset({"max_lost_records", "max_duplicated_records", "max_refused_records_landed"}),
}

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "deploy" / "runbooks" / "az-failover.yaml"


class RunbookError(Exception):
    """The runbook cannot be read or does not describe the drill this code runs."""


class Zones(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    shifted: str
    lost: str
    survivor: str


class Blocking(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device_error_rate_percent: float
    wal_fill_percent: float
    wal_oldest_unlanded_age_secs: float
    error_rate_window_secs: float


class Step(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: str
    does: str
    cloud_states: list[str] = []
    cloud_actions: list[str] = []
    thresholds: dict[str, float] = {}


class Runbook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    version: int
    zones: Zones
    blocking: Blocking
    steps: dict[str, Step]

    def threshold(self, step: str, name: str) -> float:
        return self.steps[step].thresholds[name]

    def with_overrides(self, blocking: dict[str, float], thresholds: dict[str, dict[str, float]]) -> Runbook:
        """A copy with some numbers replaced (a drill configuration's own shape); unknown names are errors."""
        unknown = sorted(set(blocking) - set(Blocking.__struct_fields__))
        if unknown:
            raise RunbookError(f"unknown blocking thresholds {unknown}; known: {sorted(Blocking.__struct_fields__)}")
        steps = dict(self.steps)
        for step_id, values in thresholds.items():
            if step_id not in THRESHOLDS:
                raise RunbookError(f"unknown step {step_id!r} in threshold overrides; steps: {list(STEP_IDS)}")
            bad = sorted(set(values) - THRESHOLDS[step_id])
            if bad:
                raise RunbookError(f"unknown thresholds {bad} for step {step_id}; known: {sorted(THRESHOLDS[step_id])}")
            steps[step_id] = msgspec.structs.replace(steps[step_id], thresholds={**steps[step_id].thresholds, **values})
        return msgspec.structs.replace(
            self, blocking=msgspec.structs.replace(self.blocking, **blocking), steps=steps
        )

    def summary(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


def parse_runbook(data: Any, source: str = "runbook") -> Runbook:
    try:
        runbook = msgspec.convert(data, Runbook)
    except msgspec.ValidationError as exc:
        raise RunbookError(f"{source}: {exc}") from None
    if tuple(runbook.steps) != STEP_IDS:
        raise RunbookError(f"{source}: steps must be {list(STEP_IDS)} in that order, got {list(runbook.steps)}")
    for step_id, step in runbook.steps.items():
        given = set(step.thresholds)
        missing, unknown = sorted(THRESHOLDS[step_id] - given), sorted(given - THRESHOLDS[step_id])
        if missing or unknown:
            raise RunbookError(f"{source}: step {step_id}: missing thresholds {missing}, unknown thresholds {unknown}")
    zones = (runbook.zones.shifted, runbook.zones.lost, runbook.zones.survivor)
    if len(set(zones)) != 3:
        raise RunbookError(f"{source}: zones.shifted, zones.lost and zones.survivor must be three different zones")
    return runbook


def load_runbook(path: Path | None = None) -> Runbook:
    import yaml  # the test/drill extra; the gateway itself never needs it

    path = path or DEFAULT_PATH
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunbookError(f"no runbook at {path} (give one with --runbook or drill.runbook)") from None
    except (OSError, yaml.YAMLError) as exc:
        raise RunbookError(f"cannot read the runbook {path}: {exc}") from None
    return parse_runbook(data, str(path))
