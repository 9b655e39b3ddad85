"""Sources that keep coming back while refused get their next refusals late.

A 429 or 503 carries ``Retry-After``. A client that ignores it and asks again at once (a flood, a
reconnect loop) would otherwise cost the gateway a whole request for every round trip it makes, and
the faster the gateway refuses, the faster it comes back. So a source refused again before the
``Retry-After`` of its previous refusal is over waits about ``refusal_delay_secs`` for its answer
(between half and one and a half times it, so that connections refused together do not all come
back together): its loop runs at one request per delay per connection, and the time goes to the
others. A first refusal,
and one that honoured ``Retry-After``, is answered at once. The waiting costs a timer per connection,
bounded by ``MAX_WAITING`` (beyond it refusals are answered at once again). A drain releases
every waiting answer at once and ends the delays.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_SOURCES = 65536
MAX_WAITING = 4096


class Tarpit:
    def __init__(
        self,
        delay_secs: Callable[[], float],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._delay_secs = delay_secs
        self._clock = clock
        self._rng = rng
        self._until: OrderedDict[str, float] = OrderedDict()  # source -> end of its last Retry-After
        self._released = asyncio.Event()
        self._pending: dict[asyncio.TimerHandle, Callable[[], None]] = {}
        self.waiting = 0

    def delay(self, source: str, retry_after_secs: float) -> float:
        """Seconds to hold this refusal of ``source`` before answering it (0: answer now)."""
        now = self._clock()
        until = self._until.pop(source, None)
        self._until[source] = now + retry_after_secs
        while len(self._until) > MAX_SOURCES:
            self._until.popitem(last=False)
        delay = self._delay_secs()
        if not delay or self._released.is_set() or until is None or now >= until or self.waiting >= MAX_WAITING:
            return 0.0
        return delay * (0.5 + self._rng())

    async def hold(self, seconds: float) -> None:
        self.waiting += 1
        try:
            await asyncio.wait_for(self._released.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self.waiting -= 1

    def later(self, seconds: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``seconds``, counted as waiting until then."""
        self.waiting += 1

        def run() -> None:
            self._pending.pop(handle, None)
            self.waiting -= 1
            callback()

        handle = asyncio.get_running_loop().call_later(seconds, run)
        self._pending[handle] = run

    def release(self) -> None:
        """Answer everything waiting now, and delay nothing from now on (the gateway drains)."""
        self._released.set()
        for handle, run in list(self._pending.items()):
            handle.cancel()
            run()
