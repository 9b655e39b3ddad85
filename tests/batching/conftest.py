"""Shared fixtures for the batching tests."""

from __future__ import annotations

import pytest

from batching import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
