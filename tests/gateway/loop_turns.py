"""Counting the event loop's turns in a test: a callback that re-arms itself with ``call_soon`` runs
once per turn, after the loop has polled its sockets."""

from __future__ import annotations

import asyncio


class LoopTurns:
    """The loop's turn number, advanced once per turn until ``stop``."""

    def __init__(self) -> None:
        self.number = 0
        self._running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if self._running:
            self.number += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False
