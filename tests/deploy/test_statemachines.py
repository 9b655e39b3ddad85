"""The ASL files: statelint, and their placeholders match the templates' DefinitionSubstitutions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cfnlint.decode import decode

from .conftest import CFN, output, run, tool

MACHINES = {"drill.asl.json": "drill.yaml", "enrichment.asl.json": "orchestration.yaml"}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_statelint_accepts(name: str):
    result = run([tool("statelint"), "--ignore=FLOAT", str(CFN / "statemachines" / name)])
    assert result.returncode == 0, output(result)


def test_statelint_rejects_a_dangling_next(tmp_path: Path):
    definition = json.loads((CFN / "statemachines" / "drill.asl.json").read_text())
    definition["States"]["WaitForStandby"]["Next"] = "NoSuchState"
    broken = tmp_path / "broken.asl.json"
    broken.write_text(json.dumps(definition))
    result = run([tool("statelint"), "--ignore=FLOAT", str(broken)])
    assert result.returncode != 0, output(result)
    assert "NoSuchState" in result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_substitutions_match(name: str):
    text = (CFN / "statemachines" / name).read_text()
    placeholders = set(re.findall(r"\$\{(\w+)\}", text))
    template, _ = decode(str(CFN / MACHINES[name]))
    machines = [r for r in template["Resources"].values() if r["Type"] == "AWS::StepFunctions::StateMachine"]
    assert len(machines) == 1
    props = machines[0]["Properties"]
    assert props["DefinitionS3Location"] == f"./statemachines/{name}"
    assert placeholders == set(props["DefinitionSubstitutions"])


def test_every_drill_task_has_timeout_retry_and_catch():
    states = json.loads((CFN / "statemachines" / "drill.asl.json").read_text())["States"]
    for name, state in states.items():
        if state["Type"] == "Task":
            assert state.get("TimeoutSeconds"), name
            assert state.get("Retry"), name
            assert state.get("Catch"), name
        if state["Type"] == "Parallel":
            assert state.get("Catch"), name
            # Tasks inside a branch retry and time out on their own; the Parallel catches for them.
            for branch in state["Branches"]:
                for inner, task in branch["States"].items():
                    if task["Type"] == "Task":
                        assert task.get("TimeoutSeconds") and task.get("Retry"), (name, inner)
