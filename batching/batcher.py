"""The adaptive batcher: a deadline-ordered queue, one scheduler task, and a dispatch seam.

    async def dispatch(endpoint: str, items: list[T]) -> Sequence[R]: ...   # one call, one result each

    async with Batcher(dispatch, endpoints=["gpu-a", "gpu-b"]) as batcher:
        future = await batcher.submit(record, deadline=batcher.clock.now() + 0.045)
        outcome = await future                     # Ok(value=...) | Deferred(reason) | Failed(error)
        future = await batcher.submit(chunk, deadline, size=len(chunk))   # one item, many records

The scheduler wakes on every arrival, every response and its own timer. Each time it (1) defers
items that no endpoint can finish by their deadline, then (2) while an endpoint has a free slot,
picks the endpoint with the earliest predicted completion and asks the policy what to do: send a
batch now, drop a hopeless head, or wait (late binding or the wait budget). Every submitted item
resolves to exactly one outcome; none is lost, and none is sent when it is predicted to be late.

An item may carry many records (``size``). Every decision counts records: the policy's queue length
and ``max_batch``, the service-time model's ``b``, the arrival rate. Items are never split: a batch
is whole items from the head, and an item larger than the chosen batch goes alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from batching.admission import LagEstimate, WindowedExtreme
from batching.clock import Cancellable, Clock, MONOTONIC, wait_event
from batching.concurrency import ConcurrencyPermit
from batching.endpoint import Endpoint, Ticket
from batching.errors import BatcherClosedError, BatchingError, QueueFullError, UnavailableError, is_backpressure_error
from batching.outcome import DEFER_BACKPRESSURE, DEFER_DEADLINE, DEFER_OVERLOAD, DEFER_SHUTDOWN, Deferred, Failed, Ok, Outcome
from batching.pending import PendingItem, PendingQueue
from batching.policy import EPSILON_S, BatchPolicy, EndpointView, QueueView, decide, wait_and_run_cap
from batching.rate import ArrivalRate
from batching.service_time import ServiceTimeModel
from batching.stats import BatcherStats, EndpointStats

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)

# How far past the last feasible instant the scheduler wakes to defer a head (timer granularity).
_HOPELESS_MARGIN_S = 1e-6
# Weight of the newest batch in the mean batch size.
_BATCH_SIZE_ALPHA = 0.1
# How long an endpoint that had nothing to take a call rests, whatever its own estimate says: long
# enough not to spin on it, short enough that a lost "available again" costs little.
_MIN_REST_S = 0.05
_MAX_REST_S = 2.0
# How long the largest recent latency budget is remembered.
_BUDGET_WINDOW_S = 1.0
# One shared outcome for every item refused on arrival (outcomes are immutable).
_REFUSED = Deferred(DEFER_OVERLOAD)


@dataclass(slots=True, eq=False)
class _RoomWaiter:
    """A submitter waiting for room in the queue, and how many records it brings."""

    future: asyncio.Future[None]
    size: int


class Batcher(Generic[T, R]):
    """Groups submitted items into batches for ``dispatch``, sized and timed by their deadlines.

    ``endpoints`` are names or :class:`Endpoint` objects (share an ``Endpoint`` between batchers of
    different models so both see its in-flight work). ``model`` names the service-time model this
    batcher uses on each endpoint. ``max_queue`` bounds the queue in items and ``max_queue_records``
    (None: no bound) in records: ``submit`` waits for room under both. An item carrying more than
    ``max_queue_records`` records is let in once the queue is empty, so it cannot wait forever.
    ``max_attempts`` bounds how often a batch refused with backpressure goes back to the queue.
    ``admission`` (on by default) refuses, as ``Deferred("overload")`` at once, an item whose
    remaining budget the standing queue ahead of it would use up (see ``batching.admission``).

    ``dispatch`` gets items, not records, and returns one result per item.
    """

    def __init__(
        self,
        dispatch: Callable[[str, list[T]], Awaitable[Sequence[R]]],
        *,
        endpoints: Sequence[str | Endpoint],
        model: str = "default",
        policy: BatchPolicy | None = None,
        clock: Clock | None = None,
        max_queue: int = 10_000,
        max_queue_records: int | None = None,
        max_attempts: int = 3,
        is_backpressure: Callable[[BaseException], bool] = is_backpressure_error,
        admission: bool = True,
    ) -> None:
        if max_queue < 1 or max_attempts < 1:
            raise ValueError("max_queue and max_attempts must be >= 1")
        if max_queue_records is not None and max_queue_records < 1:
            raise ValueError("max_queue_records must be >= 1 (or None for no bound)")
        self.clock: Clock = clock or MONOTONIC
        self.policy = policy or BatchPolicy()
        self.model = model
        self.max_queue = max_queue
        self.max_queue_records = max_queue_records
        self.max_attempts = max_attempts
        self.endpoints = tuple(self._adopt(endpoint) for endpoint in endpoints)
        if not self.endpoints:
            raise ValueError("a batcher needs at least one endpoint")
        if len({endpoint.name for endpoint in self.endpoints}) != len(self.endpoints):
            raise ValueError("endpoint names must be unique")
        self._by_name = {endpoint.name: endpoint for endpoint in self.endpoints}
        self._dispatch = dispatch
        self._is_backpressure = is_backpressure
        self._queue = PendingQueue()
        self._rate = ArrivalRate(start=self.clock.now())
        self._wake = asyncio.Event()
        self._woken_at = math.inf  # when the scheduler was first asked to run since it last ran
        self._drained = asyncio.Event()
        self._timer: Cancellable | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._batches_in_flight = 0
        self._room_waiters: deque[_RoomWaiter] = deque()
        # Room promised to woken submitters that have not enqueued yet, in items and in records.
        self._reserved = 0
        self._reserved_records = 0
        self._closing = False
        self._flushing = False
        self._crashed: BaseException | None = None
        self._counts: Counter[str] = Counter()
        self._deferred: Counter[str] = Counter()
        self._last_batch_size = 0
        self._mean_batch_size = 0.0
        self._planned_wait_secs = 0.0
        self._last_batch_wait_secs = 0.0
        self._last_reason = ""
        self._admission = admission
        self._floor = WindowedExtreme()  # standing queue: least queueing delay of recent batches
        # The full latency budget items come with, as submitted promptly: b* is sized on it, not on
        # what is left to an item that reached the queue late (that shrank batches as the loop fell behind).
        self._budget = WindowedExtreme(_BUDGET_WINDOW_S, largest=True)
        self._lag = LagEstimate()
        # The longest recent wait between waking the scheduler and its pass: the loop's turn.
        self._turn = WindowedExtreme(largest=True)
        # What admission needs, refreshed by every scheduling pass: the fastest call alone, the fastest
        # call of a typical batch, when the endpoints drain, and the cost of one queued record.
        self._admit_alone_secs = 0.0
        self._admit_batch_secs = 0.0
        self._admit_free_at = -math.inf  # when the first endpoint in rotation drains (at the tail)
        self._admit_per_record_secs = 0.0  # typical service time per record of a typical batch, over every lane
        self._refused_future: asyncio.Future[Outcome[R]] | None = None

    def _adopt(self, endpoint: str | Endpoint) -> Endpoint:
        if isinstance(endpoint, str):
            return Endpoint(endpoint, clock=self.clock)
        if endpoint.clock is not self.clock:
            raise ValueError(f"endpoint {endpoint.name!r} runs on a different clock than the batcher")
        return endpoint

    # ---------- lifecycle ----------

    async def __aenter__(self) -> Batcher[T, R]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(flush=True)

    def start(self) -> None:
        """Start the scheduler task (submitting starts it too). Needs a running event loop."""
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._run(), name="batcher-scheduler")

    async def close(self, *, flush: bool = True, timeout_secs: float | None = None) -> None:
        """Stop taking items, then finish up, in this order:

        1. refuse new submits, and wake submitters waiting for room with BatcherClosedError;
        2. flush: send what is queued without waiting for company (or, with ``flush=False``, defer it);
        3. wait up to ``timeout_secs`` for the queue to empty and every call to return;
        4. defer whatever is still queued and cancel calls still running (their items are deferred);
        5. stop the scheduler.
        """
        if not self._closing:
            self._closing = True
            while self._room_waiters:
                waiter = self._room_waiters.popleft().future
                if not waiter.done():
                    waiter.set_exception(BatcherClosedError("the batcher is closing"))
            if flush:
                self._flushing = True
            else:
                self._defer_all(DEFER_SHUTDOWN)
            self.start()
            self._poke()
        deadline = None if timeout_secs is None else self.clock.now() + timeout_secs
        if not await wait_event(self.clock, self._drained, deadline):
            self._defer_all(DEFER_SHUTDOWN)
            for call in list(self._calls):
                call.cancel()
            await asyncio.gather(*self._calls, return_exceptions=True)
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        self._cancel_timer()

    def set_available(self, endpoint: str, available: bool) -> None:
        """Take an endpoint out of rotation (a circuit breaker opened) or put it back (ending any rest)."""
        found = self._by_name[endpoint]
        found.available = available
        if available:
            found.wake()
        self._poke()

    # ---------- submitting ----------

    def submit_nowait(self, item: T, deadline: float, *, size: int = 1) -> asyncio.Future[Outcome[R]]:
        """Queue ``item`` of ``size`` records, due by ``deadline`` on this batcher's clock.

        Raises QueueFullError if there is no room.
        """
        size = _check_size(size)
        self._check_open()
        if self._refused(deadline, size):
            return self._refuse()
        if self._room_waiters or not self._has_room(size):
            raise QueueFullError(f"no room for {size} more records: {self._bounds()}")
        return self._enqueue(item, deadline, size)

    async def submit(
        self, item: T, deadline: float, *, size: int = 1, timeout_secs: float | None = None
    ) -> asyncio.Future[Outcome[R]]:
        """Queue ``item``, which carries ``size`` records (a chunk of records is one item).

        While the queue is full, wait for room up to ``timeout_secs`` (None: no limit). Returns a future
        that resolves to the item's :class:`Ok`, :class:`Deferred` or :class:`Failed` outcome.
        Raises QueueFullError if no room came in time, BatcherClosedError once closing began,
        ValueError if ``size`` is not an int >= 1.
        """
        size = _check_size(size)
        self._check_open()
        if self._refused(deadline, size):
            return self._refuse()
        if not self._room_waiters and self._has_room(size):
            return self._enqueue(item, deadline, size)
        entry = _RoomWaiter(asyncio.get_running_loop().create_future(), size)
        waiter = entry.future
        self._room_waiters.append(entry)
        timer = None
        if timeout_secs is not None:
            timer = self.clock.call_at(
                self.clock.now() + timeout_secs,
                lambda: waiter.done() or waiter.set_exception(QueueFullError(f"no room within {timeout_secs} s")),
            )
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Room was promised to us just as we were cancelled: offer it to the next in line.
                self._release_room(size)
                self._admit_waiters()
            elif entry in self._room_waiters:
                self._room_waiters.remove(entry)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._release_room(size)
        self._check_open()
        return self._enqueue(item, deadline, size)

    async def submit_and_wait(
        self, item: T, deadline: float, *, size: int = 1, timeout_secs: float | None = None
    ) -> Outcome[R]:
        """Submit ``item`` of ``size`` records and wait for its outcome."""
        return await (await self.submit(item, deadline, size=size, timeout_secs=timeout_secs))

    def _poke(self) -> None:
        # Only a running scheduler's wait is the loop's turn: before start, nothing waits to run.
        if self._woken_at == math.inf and self._scheduler is not None:
            self._woken_at = self.clock.now()
        self._wake.set()

    def _check_open(self) -> None:
        if self._crashed is not None:
            raise BatchingError("the batcher's scheduler stopped") from self._crashed
        if self._closing:
            raise BatcherClosedError("the batcher is closing")

    def _enqueue(self, item: T, deadline: float, size: int) -> asyncio.Future[Outcome[R]]:
        now = self.clock.now()
        future: asyncio.Future[Outcome[R]] = asyncio.get_running_loop().create_future()
        self._queue.push(PendingItem(item, deadline, now, future, size))
        self._rate.observe(now, size)
        self._budget.observe(now, deadline - now)
        self._counts["submitted"] += 1
        self.start()
        self._poke()
        return future

    def _refused(self, deadline: float, size: int) -> bool:
        """Whether the standing queue and the dispatch lag leave this item no chance of its deadline."""
        if not self._admission:
            return False
        now = self.clock.now()
        # Waiting ahead of it: what recent batches waited here (the standing queue), or the work already
        # sent plus the records queued at the typical cost per record (Little's law), whichever is longer.
        drain = self._admit_free_at - now + self._queue.records * self._admit_per_record_secs
        ahead = max(self._floor.value(now), drain)
        need = self._lag.value(now) + self._turn.value(now) + (ahead + self._admit_batch_secs if ahead > 0 else self._admit_alone_secs)
        if deadline - now >= need:
            return False
        self._rate.observe(now, size)  # offered load, for the arrival rate and desired_slots
        if self._turn.stale(now):
            # Nothing ran the scheduler for a window: its next pass measures the loop's turn again,
            # so an estimate that refuses items cannot outlive the load that raised it.
            self._poke()
        return True

    def _refuse(self) -> asyncio.Future[Outcome[R]]:
        # Resolved on the spot, and one shared resolved future for all (a done future can be awaited
        # by any number of callers and never changes): refusing must cost far less than scoring, or
        # under overload the refusals alone would take the time the scored records need.
        if self._refused_future is None:
            self._refused_future = asyncio.get_running_loop().create_future()
            self._refused_future.set_result(_REFUSED)
        self._counts["submitted"] += 1
        self._deferred[DEFER_OVERLOAD] += 1
        return self._refused_future

    def _has_room(self, size: int) -> bool:
        """Whether an item of ``size`` records fits under both bounds, counting promised room."""
        if len(self._queue) + self._reserved >= self.max_queue:
            return False
        if self.max_queue_records is None:
            return True
        held = self._queue.records + self._reserved_records
        # An item larger than the whole bound gets in once nothing else is held, or it never would.
        return held == 0 or held + size <= self.max_queue_records

    def _bounds(self) -> str:
        records = "" if self.max_queue_records is None else f" or {self.max_queue_records} records"
        return f"the queue holds at most {self.max_queue} items{records}"

    def _release_room(self, size: int) -> None:
        self._reserved -= 1
        self._reserved_records -= size

    def _admit_waiters(self) -> None:
        # First come, first served: a large item at the front is not overtaken by small ones behind it.
        while self._room_waiters and self._has_room(self._room_waiters[0].size):
            entry = self._room_waiters.popleft()
            if not entry.future.done():
                self._reserved += 1
                self._reserved_records += entry.size
                entry.future.set_result(None)

    # ---------- scheduling ----------

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._woken_at != math.inf:
                    now = self.clock.now()
                    self._turn.observe(now, now - self._woken_at)
                    self._woken_at = math.inf
                self._schedule()
        except Exception as error:
            # A bug here must not strand items: fail them loudly and refuse new ones.
            logger.exception("batcher scheduler stopped")
            self._crashed = error
            for pending in self._queue.drain():
                self._resolve(pending, Failed(error, ""))
            self._drained.set()

    def _schedule(self) -> None:
        now = self.clock.now()
        self._cancel_timer()
        wake_at = math.inf
        lag = self._lag.value(now)
        self._defer_hopeless(now)
        while len(self._queue):
            choice = self._choose_endpoint(now)
            if choice is None:
                break  # every slot is taken; a response will wake us
            endpoint, model = choice
            head = self._queue.head()
            queue = QueueView(
                length=self._queue.records,
                head_deadline=head.deadline,
                head_budget_secs=self._full_budget(now, head),
                oldest_enqueued_at=self._queue.oldest_enqueued_at(),
                head_size=head.size,
            )
            # A batch starts only once the event loop runs its call: deadlines are checked from then.
            view = EndpointView(model, endpoint.free_at_tail(now) + lag, endpoint.free_at(now), endpoint.busy)
            decision = decide(now, queue, view, self.policy, self._rate.per_sec(now), flushing=self._flushing)
            self._planned_wait_secs = decision.wait_secs
            if decision.defer_head:
                self._resolve(self._queue.pop(), Deferred(DEFER_DEADLINE))
            elif decision.send:
                if not self._send(endpoint, model, decision.send, decision.reason, now):
                    break
            else:
                wake_at = decision.wake_at if decision.wake_at is not None else math.inf
                break
        if len(self._queue):
            wake_at = min(wake_at, self._hopeless_at(now), self._rest_ends_at(now))
        if wake_at < math.inf:
            self._timer = self.clock.call_at(max(wake_at, now + EPSILON_S), self._poke)
        self._refresh_admission(now)
        self._admit_waiters()
        if self._closing and not len(self._queue) and not self._batches_in_flight:
            self._drained.set()

    def _choose_endpoint(self, now: float) -> tuple[Endpoint, ServiceTimeModel] | None:
        """The endpoint with a free slot that would finish the next batch first."""
        head = self._queue.head()
        rate = self._rate.per_sec(now)
        best: tuple[float, Endpoint, ServiceTimeModel] | None = None
        for endpoint in self.endpoints:
            if not endpoint.has_slot():
                continue
            model = endpoint.service_time(self.model)
            # The records the next batch would carry: at most b*, but never less than the whole head.
            cap = wait_and_run_cap(model, self._full_budget(now, head), self.policy, rate)
            size = max(head.size, min(self._queue.records, cap))
            finish = endpoint.free_at_tail(now) + model.predict_tail(size)
            if best is None or finish < best[0]:
                best = (finish, endpoint, model)
        return None if best is None else (best[1], best[2])

    def _full_budget(self, now: float, head: PendingItem) -> float:
        """The budget to size batches on: the head's own, or the largest recent one if that is larger."""
        return max(head.deadline - head.enqueued_at, self._budget.value(now))

    def _starts(self, now: float) -> list[tuple[float, ServiceTimeModel]]:
        """For each endpoint in rotation (or, if none is, each in case one comes back: at its best),
        the earliest a batch sent now could start on it, and its service-time model."""
        lag = self._lag.value(now)
        candidates = [endpoint for endpoint in self.endpoints if endpoint.available]
        if not candidates:
            return [(now + lag, e.service_time(self.model)) for e in self.endpoints]
        return [(e.free_at_tail(now) + lag, e.service_time(self.model)) for e in candidates]

    def _defer_hopeless(self, now: float) -> None:
        # Only the head is judged: a later, larger item can be hopeless sooner, but it is judged (and
        # never sent late) once it reaches the head.
        if not len(self._queue):
            return
        starts = self._starts(now)  # once per pass: under overload many heads leave at once
        while len(self._queue):
            head = self._queue.head()
            if min(start + model.predict_tail(head.size) for start, model in starts) <= head.deadline:
                return
            self._resolve(self._queue.pop(), Deferred(DEFER_DEADLINE))

    def _hopeless_at(self, now: float) -> float:
        """When the head stops being feasible on any endpoint, so it leaves the queue then, not later."""
        head = self._queue.head()
        fastest = min(endpoint.service_time(self.model).predict_tail(head.size) for endpoint in self.endpoints)
        return max(now, head.deadline - fastest - self._lag.value(now)) + _HOPELESS_MARGIN_S

    def _refresh_admission(self, now: float) -> None:
        in_rotation = [endpoint for endpoint in self.endpoints if endpoint.available] or self.endpoints
        self._admit_free_at = min(endpoint.free_at_tail(now) for endpoint in in_rotation)
        models = [endpoint.service_time(self.model) for endpoint in in_rotation]
        typical = max(1.0, self._mean_batch_size)
        self._admit_alone_secs = min(model.predict_tail(1) for model in models)
        self._admit_batch_secs = min(model.predict_tail(typical) for model in models)
        lanes = sum(endpoint.lanes for endpoint in in_rotation)
        self._admit_per_record_secs = min(model.predict(typical) for model in models) / typical / lanes

    def _rest_ends_at(self, now: float) -> float:
        """When the first resting endpoint in rotation may take a batch again (inf: none is resting)."""
        ends = [e.resting_until for e in self.endpoints if e.available and e.resting_until > now]
        return min(ends, default=math.inf)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---------- dispatching ----------

    def _send(self, endpoint: Endpoint, model: ServiceTimeModel, max_records: int, reason: str, now: float) -> bool:
        permit = endpoint.concurrency.try_acquire()
        if permit is None:
            return False  # someone else outside this batcher holds or awaits the endpoint's slots
        oldest = self._queue.oldest_enqueued_at()
        self._floor.observe(now, now - oldest)
        batch = self._queue.pop_batch(max_records)
        size = _records(batch)  # may fall short of max_records (whole items) or exceed it (one big item)
        predicted = model.predict(size)
        # The RTT we expect includes waiting behind our own in-flight batches; only the excess is
        # queueing the concurrency limiter should react to.
        expected_rtt = endpoint.free_at(now) - now + predicted
        ticket = endpoint.on_send(now, predicted, model.predict_tail(size))
        self._batches_in_flight += 1
        self._last_batch_size = size
        self._mean_batch_size = (
            float(size)
            if self._mean_batch_size == 0.0
            else (1 - _BATCH_SIZE_ALPHA) * self._mean_batch_size + _BATCH_SIZE_ALPHA * size
        )
        self._last_batch_wait_secs = now - oldest
        self._last_reason = reason
        call = asyncio.get_running_loop().create_task(self._call(endpoint, model, batch, permit, ticket, expected_rtt))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        return True

    async def _call(
        self,
        endpoint: Endpoint,
        model: ServiceTimeModel,
        batch: list[PendingItem],
        permit: ConcurrencyPermit,
        ticket: Ticket,
        expected_rtt_secs: float,
    ) -> None:
        responded = False
        # The call starts only when the event loop gets to it: the wait since the decision is lag,
        # not the endpoint's service time, and the deadline checks account for it separately.
        started = self.clock.now()
        self._lag.observe(started, started - ticket.sent_at)
        ticket.sent_at = started
        try:
            batch = self._drop_late_starters(batch, started + model.predict_tail(_records(batch)))
            if not batch:
                return
            try:
                results = list(await self._dispatch(endpoint.name, [pending.item for pending in batch]))
                if len(results) != len(batch):
                    raise ValueError(f"dispatch returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                endpoint.on_response(ticket, self.clock.now())
                responded = True
                permit.failure()
                for pending in batch:
                    self._resolve(pending, Deferred(DEFER_SHUTDOWN))
                raise
            except Exception as error:
                now = self.clock.now()
                endpoint.on_response(ticket, now)
                responded = True
                if isinstance(error, UnavailableError):
                    # Nothing was sent: the items keep their place and their attempts.
                    endpoint.rest(now + min(_MAX_REST_S, max(_MIN_REST_S, error.retry_after_secs)))
                    for pending in batch:
                        self._queue.push(pending)
                elif self._is_backpressure(error):
                    permit.backpressure()
                    self._retry_or_defer(batch)
                else:
                    permit.failure()
                    for pending in batch:
                        self._resolve(pending, Failed(error, endpoint.name))
                return
            now = self.clock.now()
            records = _records(batch)
            model.observe(records, endpoint.on_response(ticket, now))
            responded = True
            permit.success(now - ticket.sent_at, expected_secs=expected_rtt_secs)
            for pending, value in zip(batch, results):
                late = now > pending.deadline
                self._resolve(pending, Ok(value, endpoint.name, records, now - pending.enqueued_at, late))
        finally:
            if not responded:
                endpoint.on_response(ticket, self.clock.now())
            permit.release()
            self._batches_in_flight -= 1
            self._poke()

    def _drop_late_starters(self, batch: list[PendingItem], finish: float) -> list[PendingItem]:
        """Defer the items that the call, starting now rather than when it was decided, would make late."""
        if batch[0].deadline >= finish:  # earliest deadline first: the common case costs one comparison
            return batch
        keep = []
        for pending in batch:
            if pending.deadline < finish:
                self._resolve(pending, Deferred(DEFER_DEADLINE))
            else:
                keep.append(pending)
        return keep

    def _retry_or_defer(self, batch: list[PendingItem]) -> None:
        for pending in batch:
            pending.attempts += 1
            if pending.attempts >= self.max_attempts or (self._closing and not self._flushing):
                self._resolve(pending, Deferred(DEFER_BACKPRESSURE))
            else:
                # Back in line with its original deadline; the scheduler defers it if that is now hopeless.
                self._queue.push(pending)

    def _defer_all(self, reason: str) -> None:
        for pending in self._queue.drain():
            self._resolve(pending, Deferred(reason))

    def _resolve(self, pending: PendingItem, outcome: Outcome[R]) -> None:
        match outcome:
            case Ok(late=late):
                self._counts["ok"] += 1
                self._counts["late"] += int(late)
            case Deferred(reason=reason):
                self._deferred[reason] += 1
            case Failed():
                self._counts["failed"] += 1
        # The submitter may have cancelled its future; the count above still accounts for the item.
        if not pending.future.done():
            pending.future.set_result(outcome)

    # ---------- observing ----------

    def stats(self) -> BatcherStats:
        """A snapshot for metrics export."""
        now = self.clock.now()
        rate = self._rate.per_sec(now)
        typical = max(1.0, self._mean_batch_size)  # records
        in_rotation = [endpoint for endpoint in self.endpoints if endpoint.available] or list(self.endpoints)
        per_call_secs = [e.service_time(self.model).predict(typical) for e in in_rotation]
        per_record_secs = sum(per_call_secs) / len(per_call_secs) / typical
        endpoints = []
        for endpoint in self.endpoints:
            model = endpoint.service_time(self.model)
            endpoints.append(
                EndpointStats(
                    name=endpoint.name,
                    available=endpoint.available,
                    concurrency_limit=endpoint.concurrency.limit,
                    in_flight=endpoint.concurrency.in_flight,
                    idle_secs=endpoint.concurrency.idle_secs,
                    service_a_secs=model.a_secs,
                    service_c_secs=model.c_secs,
                    tail_factor=model.rho,
                    drains_in_secs=endpoint.free_at(now) - now,
                )
            )
        return BatcherStats(
            queue_depth=len(self._queue),
            batches_in_flight=self._batches_in_flight,
            last_batch_size=self._last_batch_size,
            mean_batch_size=self._mean_batch_size,
            planned_wait_secs=self._planned_wait_secs,
            last_batch_wait_secs=self._last_batch_wait_secs,
            last_dispatch_reason=self._last_reason,
            arrival_rate_per_sec=rate,
            desired_slots=rate * per_record_secs,
            submitted=self._counts["submitted"],
            ok=self._counts["ok"],
            late=self._counts["late"],
            failed=self._counts["failed"],
            deferred=sum(self._deferred.values()),
            deferred_by_reason=dict(self._deferred),
            endpoints=tuple(endpoints),
            queued_records=self._queue.records,
        )


def _check_size(size: int) -> int:
    """``size`` as a plain int (numpy integers welcome); ValueError unless it is an integer >= 1."""
    # bool is an int, but True records is a caller's mistake, not one record.
    if not isinstance(size, bool):
        try:
            records = operator.index(size)
        except TypeError:
            pass
        else:
            if records >= 1:
                return records
    raise ValueError(f"size is a count of records, an integer >= 1, not {size!r}")


def _records(batch: list[PendingItem]) -> int:
    return sum(pending.size for pending in batch)
