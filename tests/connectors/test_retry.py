"""The shared retry policy, in process with an injected clock."""

from __future__ import annotations

import msgspec
import pytest

from connectors.errors import PermanentError, ThrottledError, TransientError
from connectors.retry import RetryPolicy, RetrySettings


class FakeTime:
    """A clock that only moves when the policy sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, secs: float) -> None:
        self.sleeps.append(secs)
        self.now += secs


def policy(fake: FakeTime, rng: float = 1.0, **settings: float) -> RetryPolicy:
    values = {"initial_interval_secs": 0.1, "max_interval_secs": 1.0, "max_elapsed_secs": 5.0, **settings}
    return RetryPolicy(RetrySettings(**values), sleep=fake.sleep, rng=lambda: rng * 0.999999, clock=fake.clock)


async def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    fake = FakeTime()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 6:
            raise ThrottledError("SlowDown")
        return "ok"

    assert await policy(fake).run(flaky) == "ok"
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0], rel=1e-5)

    half = FakeTime()
    calls = 0
    await policy(half, rng=0.5).run(flaky)
    assert half.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5], rel=1e-5)


async def test_gives_up_at_the_deadline_with_the_same_error_type() -> None:
    fake = FakeTime()
    retries: list[int] = []

    async def down() -> None:
        raise ThrottledError("SlowDown", endpoint="s3")

    with pytest.raises(ThrottledError, match="gave up after") as caught:
        await policy(fake, max_elapsed_secs=3.0).run(down, on_retry=lambda n, d, e: retries.append(n))
    assert fake.now <= 3.0
    assert sum(fake.sleeps) == pytest.approx(fake.now)
    assert retries == list(range(len(fake.sleeps)))
    assert caught.value.endpoint == "s3"


async def test_permanent_errors_are_not_retried() -> None:
    fake = FakeTime()

    async def denied() -> None:
        raise PermanentError("AccessDenied")

    with pytest.raises(PermanentError):
        await policy(fake).run(denied)
    assert fake.sleeps == []


async def test_zero_budget_means_one_attempt() -> None:
    fake = FakeTime()

    async def down() -> None:
        raise TransientError("refused")

    with pytest.raises(TransientError, match="^refused$"):
        await policy(fake, max_elapsed_secs=0).run(down)
    assert fake.sleeps == []


def test_settings_validate() -> None:
    with pytest.raises(msgspec.ValidationError, match="initial_interval_secs"):
        msgspec.convert({"initial_interval_secs": 10, "max_interval_secs": 1}, RetrySettings)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"max_elapsed_time": 10}, RetrySettings)
