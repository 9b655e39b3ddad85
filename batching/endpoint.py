"""One endpoint as the batcher sees it: its concurrency limiter, its service-time models, and a
prediction of when it will have finished the work already sent to it."""

from __future__ import annotations

from dataclasses import dataclass

from batching.clock import Clock, MONOTONIC
from batching.concurrency import AdaptiveConcurrency
from batching.service_time import DEFAULT_PRIOR_A_S, DEFAULT_PRIOR_C_S, DEFAULT_PRIOR_RHO, ServiceTimeModel


@dataclass(slots=True, eq=False)
class Ticket:
    """One batch in flight to an endpoint."""

    sent_at: float
    predicted_secs: float
    tail_secs: float
    queued_behind: int  # batches of ours already in flight when this one was sent


class Endpoint:
    """An endpoint that serves one or more models.

    ``lanes`` is how many batches it runs at once (Triton instance count x replicas). The drain
    estimate is re-anchored on every response, so it cannot drift ahead of reality under load.
    """

    def __init__(
        self,
        name: str,
        *,
        lanes: int = 1,
        concurrency: AdaptiveConcurrency | None = None,
        clock: Clock | None = None,
        prior_a_secs: float = DEFAULT_PRIOR_A_S,
        prior_c_secs: float = DEFAULT_PRIOR_C_S,
        prior_rho: float = DEFAULT_PRIOR_RHO,
    ) -> None:
        if lanes < 1:
            raise ValueError("an endpoint has at least one lane")
        self.name = name
        self.lanes = lanes
        # One batch running and one in transit per lane is the useful minimum (docs/batching.md §3.6).
        self.concurrency = concurrency or AdaptiveConcurrency(
            initial=lanes + 1, minimum=lanes + 1, maximum=max(8, 4 * lanes), clock=clock or MONOTONIC
        )
        self.clock = self.concurrency.clock
        self.available = True
        self.service_times: dict[str, ServiceTimeModel] = {}
        self._prior = (prior_a_secs, prior_c_secs, prior_rho)
        self._in_flight: list[Ticket] = []
        self._drained_at = 0.0
        self._drained_tail_at = 0.0
        self._last_response_at = float("-inf")
        self._resting_until = float("-inf")

    def service_time(self, model: str) -> ServiceTimeModel:
        """The service-time model of ``model`` on this endpoint, made from the prior on first use."""
        found = self.service_times.get(model)
        if found is None:
            a, c, rho = self._prior
            found = self.service_times[model] = ServiceTimeModel(a, c, prior_rho=rho)
        return found

    @property
    def busy(self) -> bool:
        """Whether any batch is in flight."""
        return bool(self._in_flight)

    def free_at(self, now: float) -> float:
        """When the endpoint typically finishes its in-flight work (``now`` if idle, or when it stops resting)."""
        start = max(now, self._resting_until)
        return max(start, self._drained_at) if self._in_flight else start

    def free_at_tail(self, now: float) -> float:
        """When the endpoint finishes its in-flight work at the tail quantile (``now`` if idle).

        Deadline checks use this, so a slow batch in flight cannot make the next one late.
        """
        start = max(now, self._resting_until)
        return max(start, self._drained_tail_at) if self._in_flight else start

    def has_slot(self) -> bool:
        """Whether another batch may be sent now."""
        return (
            self.available
            and self.concurrency.in_flight < self.concurrency.limit
            and self.clock.now() >= self._resting_until
        )

    @property
    def resting_until(self) -> float:
        """Until when nothing is sent here because nothing behind it could take a call (-inf: not resting)."""
        return self._resting_until

    def rest(self, until: float) -> None:
        """Send nothing here before ``until`` (the endpoint said nothing behind it can take a call)."""
        self._resting_until = until

    def wake(self) -> None:
        """End a rest early (the endpoint says it can take calls again)."""
        self._resting_until = float("-inf")

    def on_send(self, now: float, predicted_secs: float, tail_secs: float) -> Ticket:
        """Record a batch leaving for this endpoint, with its typical and tail service times."""
        ticket = Ticket(now, predicted_secs, tail_secs, len(self._in_flight))
        self._in_flight.append(ticket)
        self._drained_at = max(now, self._drained_at) + predicted_secs / self.lanes
        self._drained_tail_at = max(now, self._drained_tail_at) + tail_secs / self.lanes
        return ticket

    def on_response(self, ticket: Ticket, now: float) -> float:
        """Record the batch's response; returns its service time (its RTT minus our own queueing)."""
        self._in_flight.remove(ticket)
        rtt = now - ticket.sent_at
        if ticket.queued_behind < self.lanes:
            service = rtt
        else:
            # It queued behind our own batches: only the time since the previous response is service.
            service = min(rtt, self.lanes * (now - max(ticket.sent_at, self._last_response_at)))
        self._last_response_at = now
        self._drained_at = now + sum(t.predicted_secs for t in self._in_flight) / self.lanes
        self._drained_tail_at = now + sum(t.tail_secs for t in self._in_flight) / self.lanes
        return service
