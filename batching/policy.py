"""The batching decision: when to send, how many records, or how long to wait. Pure arithmetic.

Everything here counts records, not items: an item may carry many records (a chunk), and the
service time grows with records. ``b`` and ``n`` below are record counts; ``s`` is the head item's.

Notation (docs/batching.md §2 and §3.2), for one endpoint and the queue's head item:

    free   when the endpoint finishes what is already in flight, at the tail (now if idle)
    d      the head's deadline; D its whole latency budget (deadline - enqueue time)
    S_q(b) the tail service time rho * (a + c*b); lambda the arrival rate, records/s

    b*     = max{ b <= max_batch : 2 * S_q(b) <= phi * D }     "wait one + run one" (Nexus),
             but at least the batch that keeps up with lambda
    b_cap  = min(b*, max{ b : free + S_q(b) <= d })              deadline cap for this dispatch
    w*     = (d - free - S_q(n)) / (1 + rho * c * lambda)        wait that still meets the deadline

Every item in a batch has a deadline no earlier than the head's (the queue is earliest-deadline
first), so ``free + S_q(b) <= d_head`` keeps the whole batch on time at the tail quantile. Items are
never split, so the head alone needs ``free + S_q(s) <= d``; a head larger than ``b_cap`` goes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from batching.service_time import ServiceTimeModel

# Below this, two times are the same instant (guards timer loops against float noise).
EPSILON_S = 1e-9

# Why a batch went out now (exported as a label, so keep the words stable).
REASON_FULL = "full"
REASON_DEADLINE_CAP = "deadline_cap"
REASON_WAIT_EXPIRED = "wait_expired"
REASON_NOT_WORTH_WAITING = "not_worth_waiting"
REASON_FLUSH = "flush"
# Why the decision was to hold or drop instead.
REASON_LATE_BINDING = "late_binding"
REASON_WAIT = "wait"
REASON_HOPELESS = "hopeless"


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Knobs of the adaptive batcher; docs/batching.md §4 says why each default is what it is."""

    # Records per call. An item carrying more records than this still goes, alone in its call.
    max_batch: int = 128
    # tau_cap: the longest any item waits for company; trades latency for fewer, fuller calls.
    max_wait_secs: float = 0.005
    # phi: share of the latency budget for "wait for one batch, then run in one".
    wait_and_run_share: float = 0.8
    # theta: do not wait for fewer than this many expected extra records (the name predates sizes).
    worth_waiting_items: float = 0.5
    # How long before an endpoint drains we hand it the next batch (serialisation + one-way network).
    lead_secs: float = 0.0015

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.max_wait_secs < 0 or self.lead_secs < 0 or self.worth_waiting_items < 0:
            raise ValueError("max_wait_secs, lead_secs and worth_waiting_items must be >= 0")
        if not 0 < self.wait_and_run_share <= 1:
            raise ValueError("wait_and_run_share must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the queue right now on one endpoint.

    Exactly one of: ``defer_head`` (the head cannot make its deadline), ``send > 0`` (send up to that
    many records now, in whole items from the head, at least the head), or ``wake_at`` (hold
    everything and decide again then).
    """

    reason: str
    send: int = 0
    defer_head: bool = False
    wake_at: float | None = None
    wait_secs: float = 0.0  # the wait the policy chose (0 when sending or dropping)


@dataclass(frozen=True, slots=True)
class QueueView:
    """The facts about the queue that a decision needs."""

    length: int  # records queued, over all items
    head_deadline: float
    head_budget_secs: float  # the head's whole budget: its deadline minus when it was first queued
    oldest_enqueued_at: float
    head_size: int = 1  # records in the head item: the smallest batch that can serve it


@dataclass(frozen=True, slots=True)
class EndpointView:
    """The facts about one endpoint that a decision needs."""

    model: ServiceTimeModel
    free_at: float  # max(now, drain of in-flight work at the tail): deadlines are checked against it
    drain_at: float  # max(now, typical drain of in-flight work): late binding hands over before it
    busy: bool  # something is in flight


def wait_and_run_cap(model: ServiceTimeModel, budget_secs: float, policy: BatchPolicy, rate_per_sec: float = 0.0) -> int:
    """b*: the largest batch that can wait for one such batch and then run, within the budget; but
    never smaller than the batch that keeps up with the arrival rate (smaller batches cannot serve
    the load at all, and their per-call cost is what an overloaded process can least afford)."""
    fits = model.largest_batch_within(policy.wait_and_run_share * budget_secs / 2, policy.max_batch)
    return max(1, fits, model.smallest_batch_keeping_up(rate_per_sec, policy.max_batch))


def deadline_cap(model: ServiceTimeModel, free_at: float, deadline: float, limit: int) -> int:
    """The largest batch (at most ``limit``) that finishes by ``deadline`` when started at ``free_at``."""
    return model.largest_batch_within(deadline - free_at, limit)


def wait_budget(model: ServiceTimeModel, queued: int, free_at: float, deadline: float, rate_per_sec: float) -> float:
    """w*: how long to wait for more records, counting those that arrive meanwhile, and still finish."""
    slack = deadline - free_at - model.predict_tail(queued)
    return slack / (1.0 + model.rho * model.c_secs * rate_per_sec)


def decide(
    now: float,
    queue: QueueView,
    endpoint: EndpointView,
    policy: BatchPolicy,
    rate_per_sec: float,
    *,
    flushing: bool = False,
) -> Decision:
    """One decision for an endpoint with a free slot (docs/batching.md §3.2, steps 1 to 5)."""
    model, free = endpoint.model, endpoint.free_at
    best = wait_and_run_cap(model, queue.head_budget_secs, policy, rate_per_sec)
    # 1. Early drop: under overload keep efficient batches rather than serve hopeless heads. A head
    # that could only go in a batch of less than half of what is queued (up to b*) would shrink the
    # batch, and shrinking batches is how goodput collapses when every head reaches the front at the
    # edge of its deadline. Half, not all: demanding a full b* there deferred nearly every head on a
    # busy event loop (docs/batching.md §6). The head is never split, so it needs a batch of its size.
    smallest = min(queue.length, best) // 2
    needed = model.predict_tail(max(queue.head_size, smallest, 1))
    if free + needed > queue.head_deadline:
        return Decision(REASON_HOPELESS, defer_head=True)
    cap = max(1, deadline_cap(model, free, queue.head_deadline, best))
    # 2. Enough records to fill the largest batch that still meets the head's deadline: go. (A head
    # larger than ``cap`` passed the check above, so it goes alone.)
    if queue.length >= cap:
        return Decision(REASON_FULL if cap >= best else REASON_DEADLINE_CAP, send=cap)
    if flushing:
        return Decision(REASON_FLUSH, send=queue.length)
    # 3. Late binding: the endpoint is busy anyway, so let the batch grow until it is about to drain.
    hand_over_at = endpoint.drain_at - policy.lead_secs
    if endpoint.busy and hand_over_at > now + EPSILON_S:
        return Decision(REASON_LATE_BINDING, wake_at=hand_over_at, wait_secs=hand_over_at - now)
    # 4. Wait budget, capped by the age bound of the oldest item.
    wait = wait_budget(model, queue.length, free, queue.head_deadline, rate_per_sec)
    wait = min(wait, policy.max_wait_secs - (now - queue.oldest_enqueued_at))
    if wait <= EPSILON_S:
        return Decision(REASON_WAIT_EXPIRED, send=queue.length)
    if rate_per_sec * wait < policy.worth_waiting_items:
        return Decision(REASON_NOT_WORTH_WAITING, send=queue.length)
    # 5. Hold; any arrival or response brings the decision forward.
    return Decision(REASON_WAIT, wake_at=now + wait, wait_secs=wait)
