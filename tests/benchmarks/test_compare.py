"""The regression gate: which way a ratio may move, by how much, and the exit status it gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import compare as gate
from benchmarks.harness import EXIT_OK, EXIT_REGRESSED, EXIT_USAGE, main


def results(**ratios: tuple[float, str]) -> dict:
    return {"ratios": {name: {"median": v, "min": v * 0.9, "max": v * 1.1, "better": better, "description": name}
                       for name, (v, better) in ratios.items()}}


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("baseline", "current", "better", "tolerance", "expected"),
    [
        (0.80, 0.80, "higher", 0.15, gate.OK),
        (0.80, 0.70, "higher", 0.15, gate.OK),  # -12.5%: inside 15%
        (0.80, 0.67, "higher", 0.15, gate.REGRESSED),  # -16.25%
        (0.80, 0.70, "higher", 0.10, gate.REGRESSED),  # the same drop fails a tighter tolerance
        (0.80, 0.95, "higher", 0.15, gate.IMPROVED),
        (1.00, 1.10, "lower", 0.15, gate.OK),
        (1.00, 1.20, "lower", 0.15, gate.REGRESSED),
        (1.00, 0.80, "lower", 0.15, gate.IMPROVED),
        (1.00, None, "higher", 0.15, gate.MISSING),
        (None, 1.00, "higher", 0.15, gate.NEW),
    ],
)
def test_verdict(baseline, current, better, tolerance, expected) -> None:
    assert gate.verdict(baseline, current, better, tolerance) == expected


def test_verdict_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        gate.verdict(1.0, 1.0, "sideways", 0.1)
    with pytest.raises(ValueError):
        gate.verdict(1.0, 1.0, "higher", -0.1)


def test_compare_lists_every_ratio_and_fails_only_on_a_regression() -> None:
    base = results(a=(0.8, "higher"), b=(1.0, "lower"), gone=(0.5, "higher"))
    cur = results(a=(0.6, "higher"), b=(0.9, "lower"), new=(2.0, "higher"))
    rows = {r.name: r for r in gate.compare(base, cur, 0.15)}
    assert [rows[n].verdict for n in ("a", "b", "gone", "new")] == [gate.REGRESSED, gate.OK, gate.MISSING, gate.NEW]
    assert rows["a"].change == pytest.approx(-0.25)
    assert gate.failed(list(rows.values()))


def test_missing_ratio_fails_only_when_asked() -> None:
    rows = gate.compare(results(a=(0.8, "higher")), results(), 0.15)
    assert not gate.failed(rows)
    assert gate.failed(rows, fail_on_missing=True)


def test_a_baseline_ratio_may_carry_its_own_tolerance() -> None:
    base = results(noisy=(1.0, "lower"))
    base["ratios"]["noisy"]["tolerance"] = 0.5
    rows = gate.compare(base, results(noisy=(1.4, "lower")), 0.15)
    assert rows[0].verdict == gate.OK and rows[0].tolerance == 0.5


def test_table_is_side_by_side() -> None:
    rows = gate.compare(results(a=(0.8, "higher")), results(a=(0.6, "higher")), 0.15)
    text = gate.table(rows)
    assert "baseline" in text and "0.800" in text and "0.600" in text and "-25.0%" in text and gate.REGRESSED in text
    md = gate.table(rows, markdown=True)
    assert md.splitlines()[0].startswith("| ratio |") and md.count("\n") == 2


def test_cli_exits_non_zero_on_a_regression(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write(tmp_path / "base.json", results(throughput=(0.8, "higher")))
    cur = write(tmp_path / "cur.json", results(throughput=(0.5, "higher")))
    assert main(["--compare", str(base), "--current", str(cur)]) == EXIT_REGRESSED
    assert gate.REGRESSED in capsys.readouterr().out


def test_cli_passes_an_improvement(tmp_path: Path) -> None:
    base = write(tmp_path / "base.json", results(throughput=(0.8, "higher"), rss=(1.2, "lower")))
    cur = write(tmp_path / "cur.json", results(throughput=(0.95, "higher"), rss=(1.0, "lower")))
    assert main(["--compare", str(base), "--current", str(cur)]) == EXIT_OK


def test_cli_respects_the_tolerance(tmp_path: Path) -> None:
    base = write(tmp_path / "base.json", results(throughput=(1.0, "higher")))
    cur = write(tmp_path / "cur.json", results(throughput=(0.9, "higher")))  # -10%
    assert main(["--compare", str(base), "--current", str(cur)]) == EXIT_OK  # default 15%
    assert main(["--compare", str(base), "--current", str(cur), "--tolerance", "0.05"]) == EXIT_REGRESSED
    assert main(["--compare", str(base), "--current", str(cur), "--tolerance", "-1"]) == EXIT_USAGE


def test_the_stored_baseline_is_well_formed() -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "baseline.json"
    doc = gate.load(path)
    assert doc["mode"] == "default"
    assert doc["ratios"], "the baseline has no ratios"
    for name, spec in doc["ratios"].items():
        assert {"median", "min", "max", "better"} <= spec.keys(), name
    assert gate.compare(doc, doc) and not gate.failed(gate.compare(doc, doc))


def test_a_baseline_keeps_every_figure_and_ratio_but_no_time_series() -> None:
    from benchmarks.harness import baseline_of

    doc = {"mode": "default", "ratios": {"a.r": {"median": 1.0}}, "comparison": {"rows": []},
           "scenarios": {"a": {"status": "ok", "figures": {"f": {"median": 2.0}}, "ratios": {"r": {"median": 1.0}},
                               "series": {"timeline": [1, 2, 3]}, "generator": [{"label": "x"}]},
                         "b": {"status": "not run", "reason": "why"}}}
    base = baseline_of(doc)
    assert base["ratios"] == doc["ratios"] and "comparison" not in base
    assert base["scenarios"]["a"] == {"status": "ok", "figures": {"f": {"median": 2.0}}, "ratios": {"r": {"median": 1.0}}}
    assert base["scenarios"]["b"] == {"status": "not run", "reason": "why"}
    assert "series" in doc["scenarios"]["a"]  # the run's own results are left alone
