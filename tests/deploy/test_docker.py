"""hadolint on the Dockerfile, and the properties the image promises."""

from __future__ import annotations

from pathlib import Path

from .conftest import DOCKER, output, run, tool


def hadolint(path: Path):
    return run([tool("hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), str(path)])


def test_hadolint_passes():
    result = hadolint(DOCKER / "Dockerfile")
    assert result.returncode == 0, output(result)


def test_hadolint_fails_a_careless_dockerfile(tmp_path: Path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        "FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\nADD . app\nWORKDIR app\n"
        "RUN pip install .\nCMD edge-gateway serve\n"
    )
    result = hadolint(broken)
    assert result.returncode != 0
    for rule in ("DL3008", "DL3020", "DL3000", "DL3042", "DL3025"):
        assert rule in result.stdout, (rule, output(result))


def test_image_config_passes_the_gateways_own_check():
    result = run([tool("edge-gateway"), "check-config", str(DOCKER / "config.toml")])
    assert result.returncode == 0, output(result)


def test_image_is_multi_stage_pinned_non_root_and_healthchecked():
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2 and all("@sha256:" in line for line in froms)
    assert any(line.startswith("USER ") and "root" not in line and line != "USER 0" for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("HEALTHCHECK"))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    healthcheck = " ".join(lines[start : end + 1])
    # Liveness: a full WAL makes /readyz 503, which must not get the container replaced.
    assert "/healthz" in healthcheck and "/readyz" not in healthcheck, healthcheck
    assert "STOPSIGNAL SIGTERM" in lines
    assert any(line.startswith("ENTRYPOINT [") for line in lines)
