"""The regression gate: compare this run's ratios with a baseline's, fail beyond a tolerance.

Only ratios are gated (gateway against the ceiling measured in the same run, and the like): absolute
figures move between machines and with the neighbours' load, ratios much less. A ratio regresses when
its median moves the wrong way by more than the tolerance, relative to the baseline's median::

    better = "higher":  current < baseline * (1 - tolerance)
    better = "lower":   current > baseline * (1 + tolerance)

A ratio the baseline has and this run lacks (its scenario did not run) is listed as ``missing``;
it fails the gate only with ``fail_on_missing``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TOLERANCE = 0.15

OK, IMPROVED, REGRESSED, MISSING, NEW = "ok", "improved", "REGRESSED", "missing", "new"


@dataclass(frozen=True)
class Row:
    name: str
    better: str
    baseline: float | None
    current: float | None
    current_min: float | None
    current_max: float | None
    tolerance: float
    verdict: str

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None or not self.baseline:
            return None
        return self.current / self.baseline - 1.0


def _median(spec: dict[str, Any] | None) -> float | None:
    if not spec:
        return None
    value = spec.get("median")
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def verdict(baseline: float | None, current: float | None, better: str, tolerance: float) -> str:
    """One ratio's verdict; see the module docstring for the rule."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    if baseline is None:
        return NEW
    if current is None:
        return MISSING
    if better == "higher":
        if current < baseline * (1.0 - tolerance):
            return REGRESSED
        return IMPROVED if current > baseline * (1.0 + tolerance) else OK
    if current > baseline * (1.0 + tolerance):
        return REGRESSED
    return IMPROVED if current < baseline * (1.0 - tolerance) else OK


def compare(baseline: dict[str, Any], current: dict[str, Any], tolerance: float = DEFAULT_TOLERANCE) -> list[Row]:
    """Rows for every ratio in either run: the baseline's order first, then ratios new in this run.

    A ratio may carry its own ``tolerance`` (in the baseline) for figures known to be noisier.
    """
    base_ratios: dict[str, Any] = baseline.get("ratios", {})
    cur_ratios: dict[str, Any] = current.get("ratios", {})
    rows = []
    for name in [*base_ratios, *(n for n in cur_ratios if n not in base_ratios)]:
        base, cur = base_ratios.get(name), cur_ratios.get(name)
        better = (base or cur or {}).get("better", "higher")
        tol = float((base or {}).get("tolerance", tolerance)) if base and "tolerance" in base else tolerance
        b, c = _median(base), _median(cur)
        rows.append(
            Row(
                name=name,
                better=better,
                baseline=b,
                current=c,
                current_min=(cur or {}).get("min"),
                current_max=(cur or {}).get("max"),
                tolerance=tol,
                verdict=verdict(b, c, better, tol),
            )
        )
    return rows


def failed(rows: list[Row], *, fail_on_missing: bool = False) -> bool:
    return any(r.verdict == REGRESSED or (fail_on_missing and r.verdict == MISSING) for r in rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(rows: list[Row], *, markdown: bool = False) -> str:
    """A side-by-side table: ratio, which way is better, baseline, current [min-max], change, verdict."""
    header = ["ratio", "better", "baseline", "current [min-max]", "change", "tolerance", "verdict"]
    body = []
    for r in rows:
        span = "" if r.current is None else f" [{_fmt(r.current_min)}-{_fmt(r.current_max)}]"
        change = "-" if r.change is None else f"{r.change:+.1%}"
        body.append([r.name, r.better, _fmt(r.baseline), _fmt(r.current) + span, change, f"{r.tolerance:.0%}", r.verdict])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in body)])


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
