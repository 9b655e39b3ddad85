"""The configuration reference and the example configuration stay true to the code."""

from __future__ import annotations

from pathlib import Path

from gateway.__main__ import main
from gateway.ops.config_reference import options, render
from gateway.auth.registry import add_device
from gateway.settings import load_settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_configuration_reference_is_current():
    assert (DOCS / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: python -m gateway.ops.config_reference > docs/configuration.md"
    )


def test_every_option_has_a_type_a_default_and_a_description():
    rows = options()
    assert len(rows) > 150
    undocumented = [f"{table}.{key}" for table, key, _, _, text in rows if not text]
    assert undocumented == []
    text = (DOCS / "configuration.md").read_text()
    for table, key, _, _, _ in rows:
        assert f"| `{key}` |" in text


def test_example_configuration_is_valid(tmp_path, monkeypatch, capsys):
    example = DOCS / "gateway.example.toml"
    settings = load_settings(example, environ={})
    assert settings.admin.enabled and settings.lake.kind == "local"
    # Once the files it names exist, check-config passes it as it is.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "var" / "example").mkdir(parents=True)
    add_device(settings.auth.registry_path, "pump-7", {})
    token = Path(settings.admin.token_path)
    token.write_text("x" * 32 + "\n")
    token.chmod(0o600)
    assert main(["check-config", str(example)]) == 0, capsys.readouterr().err
