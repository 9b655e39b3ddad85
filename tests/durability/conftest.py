"""Fixtures of the durability suite: every gateway process group and mount a test makes is undone."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.failing_disk import FailingDisk
from tests.fixtures.power_loss_disk import PowerLossDisk
from tests.durability.harness import Gateways


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    """Starts ``serve`` process groups; at teardown each group is SIGKILLed, pass or fail."""
    registry = Gateways(tmp_path)
    try:
        yield registry
    finally:
        registry.kill_all()


@pytest.fixture
def small_filesystem(gateways: Gateways) -> Iterator[Callable[[Path, int], Path]]:
    """Mount a real tmpfs of a given size; unmounted at teardown after every gateway is killed."""
    mounted: list[Path] = []

    def mount(directory: Path, size_bytes: int) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(directory)], capture_output=True, text=True
        )
        assert result.returncode == 0, (
            f"cannot mount a {size_bytes}-byte tmpfs on {directory} (this scenario needs root): {result.stderr.strip()}"
        )
        mounted.append(directory)
        return directory

    try:
        yield mount
    finally:
        gateways.kill_all()  # nothing may hold files on the mount any more
        for directory in reversed(mounted):
            if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(directory)], capture_output=True)


@pytest.fixture
def failing_disk(gateways: Gateways, tmp_path: Path) -> Iterator[FailingDisk]:
    """A FUSE filesystem whose fsyncs fail on command; unmounted at teardown after every gateway is killed."""
    with FailingDisk(tmp_path / "failing-disk") as disk:
        try:
            yield disk
        finally:
            gateways.kill_all()  # nothing may hold files on the mount any more


@pytest.fixture
def power_loss_disk(gateways: Gateways, tmp_path: Path) -> Iterator[PowerLossDisk]:
    """A FUSE filesystem that loses what was not fsynced when told to; unmounted at teardown after
    every gateway is killed."""
    with PowerLossDisk(tmp_path / "power-loss-disk") as disk:
        try:
            yield disk
        finally:
            gateways.kill_all()
