"""One runbook for both drills: the local drill and the cloud drill read the same document and agree.

deploy/runbooks/az-failover.yaml is loaded by gateway/drill (PyYAML) and, packaged beside it, by the
cloud drill's Lambda (its own reader, since the Lambda runtime has no PyYAML). These tests hold the
state machine, the Lambda's actions and the CloudWatch alarms behind the blocking gate to it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.drill.runbook import DEFAULT_PATH, STEP_IDS, THRESHOLDS, RunbookError, load_runbook, parse_runbook

REPO = Path(__file__).resolve().parents[2]
CFN = REPO / "deploy" / "cloudformation"
RUNBOOK = REPO / "deploy" / "runbooks" / "az-failover.yaml"


def _lambda() -> Any:
    spec = importlib.util.spec_from_file_location("drill_lambda", CFN / "lambdas" / "drill" / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


drill_lambda = _lambda()


class _CfnLoader(yaml.SafeLoader):
    """CloudFormation YAML with its short-form tags kept as plain values."""


_CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: (
    loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else
    loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)))


def template(name: str) -> dict[str, Any]:
    return yaml.load((CFN / name).read_text(), Loader=_CfnLoader)  # noqa: S506 - SafeLoader plus tags


# ---- the document ------------------------------------------------------------------------------------


def test_the_local_drill_reads_the_shared_runbook():
    runbook = load_runbook()
    assert DEFAULT_PATH == RUNBOOK
    assert tuple(runbook.steps) == STEP_IDS
    for step_id, step in runbook.steps.items():
        assert set(step.thresholds) == THRESHOLDS[step_id]
        assert step.title and step.does


def test_the_lambda_packages_the_same_document():
    packaged = CFN / "lambdas" / "drill" / "runbook.yaml"
    # A link: `aws cloudformation package` and deploy/package_templates.py zip the file it points to.
    assert packaged.is_symlink() and packaged.resolve() == RUNBOOK.resolve()
    assert Path(drill_lambda.RUNBOOK_PATH).resolve() == RUNBOOK.resolve()


def test_the_lambdas_reader_reads_it_exactly_as_pyyaml():
    text = RUNBOOK.read_text()
    assert drill_lambda.read_runbook(text) == yaml.safe_load(text)


@pytest.mark.parametrize("text", [
    "steps:\n  - precheck\n",                 # block lists
    "a: &anchor 1\nb: *anchor\n",             # anchors
    "a: |\n  two\n  lines\n",                 # block scalars
    "a: {b: 1}\n",                            # flow mappings
    "a: [1, 2\n",                             # an unclosed flow list
    "a: 1\na: 2\n",                           # a key twice
    "a:1\n",                                  # not a mapping line
])
def test_the_lambdas_reader_refuses_what_it_does_not_understand(text: str):
    with pytest.raises(drill_lambda.RunbookInvalid):
        drill_lambda.read_runbook(text)


def test_the_lambdas_reader_keeps_quoted_text_and_comments_apart():
    assert drill_lambda.read_runbook('a: "x: y # not a comment"  # a comment\nb: \'it\'\'s\'\nc: [x, "y", 3, 0.5, true]\n') == {
        "a": "x: y # not a comment", "b": "it's", "c": ["x", "y", 3, 0.5, True]}


def test_the_runbook_refuses_a_missing_or_unknown_threshold():
    data = yaml.safe_load(RUNBOOK.read_text())
    del data["steps"]["planned_shift"]["thresholds"]["max_shift_secs"]
    with pytest.raises(RunbookError, match="missing thresholds \\['max_shift_secs'\\]"):
        parse_runbook(data)
    data = yaml.safe_load(RUNBOOK.read_text())
    data["steps"]["restore"]["thresholds"]["max_restore_seconds"] = 1
    with pytest.raises(RunbookError, match="unknown thresholds \\['max_restore_seconds'\\]"):
        parse_runbook(data)
    data = yaml.safe_load(RUNBOOK.read_text())
    data["steps"] = dict(reversed(list(data["steps"].items())))
    with pytest.raises(RunbookError, match="in that order"):
        parse_runbook(data)


def test_overrides_replace_single_numbers_and_refuse_unknown_names():
    runbook = load_runbook().with_overrides({"wal_fill_percent": 50}, {"planned_shift": {"max_shift_secs": 3}})
    assert runbook.blocking.wal_fill_percent == 50
    assert runbook.threshold("planned_shift", "max_shift_secs") == 3
    assert runbook.threshold("planned_shift", "max_unretried_errors") == 0
    with pytest.raises(RunbookError, match="unknown thresholds"):
        load_runbook().with_overrides({}, {"planned_shift": {"max_shift_seconds": 3}})
    with pytest.raises(RunbookError, match="unknown step"):
        load_runbook().with_overrides({}, {"failover": {"max_shift_secs": 3}})
    with pytest.raises(RunbookError, match="unknown blocking"):
        load_runbook().with_overrides({"error_rate": 1}, {})


# ---- the cloud drill against the runbook ----------------------------------------------------------------


def test_every_state_of_the_cloud_drill_belongs_to_one_step():
    states = json.loads((CFN / "statemachines" / "drill.asl.json").read_text())["States"]
    claimed: dict[str, str] = {}
    for step_id, step in load_runbook().steps.items():
        for state in step.cloud_states:
            assert state not in claimed, f"{state} is in {claimed.get(state)} and {step_id}"
            claimed[state] = step_id
    assert set(claimed) == set(states), (set(states) - set(claimed), set(claimed) - set(states))


def test_every_lambda_action_belongs_to_the_step_of_the_states_that_call_it():
    states = json.loads((CFN / "statemachines" / "drill.asl.json").read_text())["States"]
    runbook = load_runbook()
    step_of_state = {s: step_id for step_id, step in runbook.steps.items() for s in step.cloud_states}
    step_of_action = {a: step_id for step_id, step in runbook.steps.items() for a in step.cloud_actions}
    assert set(step_of_action) == set(drill_lambda.ACTIONS) - {"runbook"}
    for name, state in states.items():
        action = (state.get("Parameters") or {}).get("Payload", {}).get("action")
        if action:
            assert step_of_action[action] == step_of_state[name], (name, action)
    assert {a: drill_lambda.runbook_step(a) for a in step_of_action} == step_of_action


def test_the_lambda_enforces_the_runbooks_healthy_target_floor():
    floor = load_runbook().threshold("planned_shift", "min_ready_outside_shifted_zone")
    assert drill_lambda._healthy_target_floor() == floor
    assert template("drill.yaml")["Parameters"]["MinHealthyTargets"]["Default"] == floor
    described = drill_lambda.handle({"action": "runbook"}, {}, lambda service: None)
    assert described["name"] == "az-failover" and list(described["steps"]) == list(STEP_IDS)
    assert described["steps"]["planned_shift"]["thresholds"]["min_ready_outside_shifted_zone"] == floor


def test_blocking_thresholds_are_the_alarms_behind_the_cloud_gate():
    blocking = load_runbook().blocking
    analytics = template("analytics.yaml")
    resources = analytics["Resources"]
    assert resources["TargetErrorRateAlarm"]["Properties"]["Threshold"] == blocking.device_error_rate_percent
    assert resources["WalNearlyFullAlarm"]["Properties"]["Threshold"] == blocking.wal_fill_percent
    assert analytics["Parameters"]["WalAgeAlarmSeconds"]["Default"] == blocking.wal_oldest_unlanded_age_secs
    gate = resources["DrillBlockingAlarm"]["Properties"]["AlarmRule"]
    for alarm in ("TargetErrorRateAlarm", "WalNearlyFullAlarm", "WalOldestUnlandedAlarm"):
        assert alarm in gate
