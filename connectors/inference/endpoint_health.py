"""The health of one inference endpoint as the pool sees it, and when to check its readiness again.

    starting ──► not ready ──► ready ──► failing ──► ready
                    ▲            │          │
                    └────────────┴──────────┘   (a readiness check answered no)

- **starting**: not checked yet.
- **not ready**: the server (or the model on it) answered not ready, or did not answer. This is not a
  failure: a model that is still loading is normal at start-up. Nothing is sent to it and its breaker
  is left alone; readiness is checked again every ``probe_secs``, backing off by half each time up to
  ``max_probe_secs``, so it is found within a couple of seconds of becoming ready.
- **ready**: it answered ready and served a warm-up inference; live traffic goes to it.
- **failing**: a live call failed (timeout, connection lost, server error). It stays in rotation, as
  its breaker allows, and its readiness is checked before the next live batch.

Every change is one log line, with the reason, so an operator can see why nothing is being scored.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

log = logging.getLogger("connectors.inference.pool")

# Seconds between readiness checks of an endpoint that is not ready: first, growth, and ceiling.
PROBE_SECS = 1.0
PROBE_BACKOFF = 1.5
MAX_PROBE_SECS = 2.0


class Health(enum.StrEnum):
    STARTING = "starting"
    NOT_READY = "not ready"
    READY = "ready"
    FAILING = "failing"


@dataclass(slots=True)
class ProbeSchedule:
    """When the next readiness check of a not-ready endpoint is due."""

    first_secs: float = PROBE_SECS
    max_secs: float = MAX_PROBE_SECS
    interval_secs: float = 0.0  # 0: no check has answered "not ready" yet
    due_at: float = float("-inf")

    def __post_init__(self) -> None:
        if not 0 < self.first_secs <= self.max_secs:
            raise ValueError("need 0 < probe_secs <= max_probe_secs")

    def not_ready(self, now: float) -> None:
        """A check answered not ready: the next one comes later than the last, up to ``max_secs``."""
        self.interval_secs = self.first_secs if self.interval_secs == 0 else min(self.max_secs, self.interval_secs * PROBE_BACKOFF)
        self.due_at = now + self.interval_secs

    def retry_soon(self, now: float) -> None:
        """Alive but busy (throttled during warm-up): check again after the shortest interval."""
        self.due_at = now + self.first_secs

    def ready(self) -> None:
        self.interval_secs = 0.0
        self.due_at = float("-inf")

    def due(self, now: float) -> bool:
        return now >= self.due_at


def log_change(endpoint: str, old: Health, new: Health, reason: str = "") -> None:
    """One line per health change: warnings when an endpoint leaves service, info otherwise."""
    leaving = new is Health.FAILING or (new is Health.NOT_READY and old in (Health.READY, Health.FAILING))
    level = logging.WARNING if leaving else logging.INFO
    log.log(level, "inference endpoint %s: %s -> %s%s", endpoint, old, new, f" ({reason})" if reason else "")
