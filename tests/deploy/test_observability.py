"""Prometheus rules (promtool check and unit tests) and the Grafana dashboard against the metric contract."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .conftest import ANSIBLE, GATEWAY_METRICS, HISTOGRAMS, OBSERVABILITY, output, run, tool

RULES = OBSERVABILITY / "prometheus" / "edge-gateway.rules.yml"
RULE_TESTS = OBSERVABILITY / "prometheus" / "tests" / "edge-gateway.rules.test.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "edge-gateway.json"
NAME = re.compile(r"\bedge_gateway(?::[a-z0-9_]+:[a-z0-9_]+|_[a-z0-9_]+)\b")


def recorded_names() -> set[str]:
    return set(re.findall(r"record: (edge_gateway:[a-z0-9_:]+)", RULES.read_text()))


def unknown_metrics(names: set[str]) -> set[str]:
    """Names that are neither contract metrics, their histogram series, nor our recording rules."""
    allowed = set(GATEWAY_METRICS) | recorded_names()
    allowed |= {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    return {name for name in names if name not in allowed}


def test_promtool_check_rules():
    result = run([tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, output(result)
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_pass():
    result = run([tool("promtool"), "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, output(result)


def test_promtool_rejects_a_broken_rule(tmp_path: Path):
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("edge_gateway:wal_fill:ratio > 0.8", "edge_gateway:wal_fill:ratio >", 1))
    result = run([tool("promtool"), "check", "rules", str(broken)])
    assert result.returncode != 0, output(result)


def test_rule_unit_tests_catch_a_changed_threshold(tmp_path: Path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "edge-gateway.rules.yml").write_text(RULES.read_text().replace("> 0.8", "> 0.995", 1))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    result = run([tool("promtool"), "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name)])
    assert result.returncode != 0, output(result)
    assert "EdgeGatewayWalNearlyFull" in result.stdout + result.stderr


def test_rules_use_only_contract_metrics():
    names = set(NAME.findall(RULES.read_text()))
    assert names
    assert unknown_metrics(names) == set()


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def test_dashboard_is_valid_and_covers_the_stages():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    used = {name for expr in dashboard_exprs() for name in NAME.findall(expr)}
    # Every contract metric appears on the dashboard.
    base = {re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(r"_(bucket|sum|count)$", "", n) in HISTOGRAMS else n for n in used}
    assert GATEWAY_METRICS <= base, GATEWAY_METRICS - base


def test_dashboard_uses_only_contract_metrics():
    used = {name for expr in dashboard_exprs() for name in NAME.findall(expr)}
    assert unknown_metrics(used) == set()


def test_metric_check_flags_an_unknown_name():
    assert unknown_metrics({"edge_gateway_requests_total", "edge_gateway_wal_bytes"}) == {"edge_gateway_requests_total"}


def cloudwatch_agent_metrics() -> set[str]:
    text = (ANSIBLE / "roles" / "cloudwatch_agent" / "templates" / "amazon-cloudwatch-agent.json.j2").read_text()
    return set(re.findall(r"\^?(edge_gateway_[a-z0-9_]+)", text))


def test_cloudwatch_agent_publishes_only_contract_metrics():
    names = cloudwatch_agent_metrics()
    assert names and unknown_metrics(names) == set()


def test_every_cloudwatch_alarm_watches_a_metric_the_agent_publishes():
    # An alarm on a name the agent never sends sits in INSUFFICIENT_DATA (or, missing data not
    # breaching, OK) for ever.
    cloudformation = OBSERVABILITY.parent / "cloudformation"
    alarmed = {name for path in cloudformation.glob("*.yaml") for name in re.findall(r"MetricName: (edge_gateway_[a-z0-9_]+)", path.read_text())}
    assert "edge_gateway_start_waiting_for_room" in alarmed
    assert alarmed - cloudwatch_agent_metrics() == set()
