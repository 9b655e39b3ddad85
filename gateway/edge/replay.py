"""Replay protection: a verified signature is accepted once within the timestamp window.

The timestamp window alone lets an eavesdropper resend a captured request for five minutes; this
remembers every verified signature until its timestamp leaves the window. Memory is bounded: beyond
``max_entries`` the oldest entries are forgotten first (and counted, so an operator can see it).
Only signatures that verified are remembered, so forgeries cannot fill the cache.

A request that was refused for a reason the device should retry (503, 500) releases its
signature, so the device's retry of the very same bytes is not mistaken for a replay. A replay gets
its request's answer again from the retry ledger (it lands nothing), or, when the request was never
answered (its first sending died with a killed process, or still runs), runs as any retry of it:
the retry ledger runs a key once, so a device that lost an acknowledgement, or the gateway with it,
can resend exactly what it sent. That key is the request's ``Idempotency-Key``, or else its body's
hash; a replay goes on only while the ledger holds it or has forgotten no request since the
signature was claimed (so it was never claimed): one the ledger has forgotten would land again.

Once the gateway has opened its retry ledger (``use_ledger``), signatures are remembered there
instead: shared by every worker of the instance and kept across restarts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class ReplayGuard:
    def __init__(
        self,
        window_secs: Callable[[], float],
        max_entries: Callable[[], int],
        *,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        self._window = window_secs
        self._max = max_entries
        self._clock = clock
        self._on_evict = on_evict
        self._seen: OrderedDict[str, float] = OrderedDict()  # signature -> when it may be forgotten
        self._ledger = None

    def use_ledger(self, ledger) -> None:
        """Remember signatures in the instance's retry ledger (``retry_ledger.RetryLedger``)."""
        self._ledger = ledger

    def __len__(self) -> int:
        return self._ledger.counts()["signature"] if self._ledger is not None else len(self._seen)

    def claim(self, signature: str, timestamp_secs: float) -> bool:
        """Remember ``signature``; False if it was already claimed and has not expired."""
        now = self._clock()
        if self._ledger is not None:
            return self._ledger.claim_signature(signature, max(now, timestamp_secs) + self._window())
        self._expire(now)
        expires = self._seen.get(signature)
        if expires is not None and expires > now:
            return False
        # The signature stays replayable until its timestamp is outside the window on either side.
        self._seen[signature] = max(now, timestamp_secs) + self._window()
        self._seen.move_to_end(signature)
        limit = self._max()
        while len(self._seen) > limit:
            self._seen.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict()
        return True

    def release(self, signature: str) -> None:
        if self._ledger is not None:
            self._ledger.release_signature(signature)
        self._seen.pop(signature, None)

    def _expire(self, now: float) -> None:
        # Entries are nearly in expiry order (insertion order, equal window); stop at the first live one.
        seen = self._seen
        while seen:
            signature, expires = next(iter(seen.items()))
            if expires > now:
                return
            del seen[signature]
