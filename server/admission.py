"""Global admission control by cost, with a bounded FIFO queue, so admitted requests keep a bounded latency.

A request's cost is the tokens it may make the engine produce: planned samples x max_tokens. Requests run while
the admitted cost stays within `max_inflight_cost` (one request costlier than that runs alone); the others wait
in arrival order, at most `max_queued_requests` of them and at most `max_queue_wait_s` each. Beyond that:

| refusal | status | code | `Retry-After` | `x-should-retry` |
| --- | --- | --- | --- | --- |
| the queue is full | 429 | `queue_full` | a recent request's service time | `true` |
| waited `max_queue_wait_s` in the queue | 503 | `overloaded` | the same | `true` |
| the server is draining (SIGTERM) | 503 | `shutting_down` | 1 s | `true` (another replica, or the restarted one) |

`x-should-retry` is the header OpenAI's SDKs obey before their own status rules (see server/errors.py for the
statuses that say `false`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from server.errors import OpenAIError

SERVICE_TIME_SMOOTHING = 0.2  # weight of the newest request in the moving average of service times
MAX_RETRY_AFTER_S = 60  # OpenAI's clients ignore a longer Retry-After


class AdmissionRefused(OpenAIError):
    def __init__(self, status: int, message: str, code: str, retry_after_s: int) -> None:
        super().__init__(status, message, code=code)
        self.headers.update(retry_headers(retry_after_s, should_retry=True))


def retry_headers(retry_after_s: int, *, should_retry: bool) -> dict[str, str]:
    return {"Retry-After": str(retry_after_s), "x-should-retry": "true" if should_retry else "false"}


def request_cost(samples: int, max_tokens: int) -> int:
    return max(1, samples) * max(1, max_tokens)


@dataclass(eq=False)
class Ticket:
    """One admitted request's share of the budget; `release()` is idempotent and never awaits."""

    controller: AdmissionController
    cost: int
    admitted_at: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.controller._release(self)


@dataclass(eq=False)
class Waiter:
    cost: int
    future: asyncio.Future[None]


class AdmissionController:
    def __init__(self, max_inflight_cost: int, max_queued_requests: int, max_queue_wait_s: float, metrics=None):
        self.max_inflight_cost = max_inflight_cost
        self.max_queued_requests = max_queued_requests
        self.max_queue_wait_s = max_queue_wait_s
        self.metrics = metrics
        self.inflight_cost = 0
        self.running = 0
        self.queue: deque[Waiter] = deque()
        self.service_time_s = 1.0  # moving average, for Retry-After
        self.draining = False

    # -- the decision
    def fits(self, cost: int) -> bool:
        return self.running == 0 or self.inflight_cost + cost <= self.max_inflight_cost

    def retry_after_s(self) -> int:
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.service_time_s)))

    async def admit(self, cost: int) -> Ticket:
        """A ticket once the request may run; raises AdmissionRefused (429/503) when it may not."""
        if self.draining:
            self._count_shed("draining")
            raise AdmissionRefused(503, "the server is shutting down", "shutting_down", 1)
        if not self.queue and self.fits(cost):
            self._count_admitted("immediately")
            return self._take(cost)
        if len(self.queue) >= self.max_queued_requests:
            self._count_shed("queue_full")
            raise AdmissionRefused(
                429,
                f"the server is at capacity and {len(self.queue)} requests are already waiting; retry later",
                "queue_full",
                self.retry_after_s(),
            )
        return await self._wait(cost)

    async def _wait(self, cost: int) -> Ticket:
        waiter = Waiter(cost, asyncio.get_running_loop().create_future())
        self.queue.append(waiter)
        self._set_queue_gauge()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.max_queue_wait_s):  # not wait_for: it may swallow a cancellation
                await waiter.future
        except BaseException as exc:  # timed out, or the client left (cancelled) while waiting
            self._leave_queue(waiter)
            if isinstance(exc, TimeoutError):
                self._count_shed("queue_timeout")
                raise AdmissionRefused(
                    503,
                    f"the server is overloaded: not admitted within {self.max_queue_wait_s:g} s; retry later",
                    "overloaded",
                    self.retry_after_s(),
                ) from None
            raise
        if self.metrics is not None:
            self.metrics.queue_wait.observe(time.monotonic() - started)
        self._count_admitted("after_queue")
        return Ticket(self, cost)

    def _leave_queue(self, waiter: Waiter) -> None:
        if waiter.future.done() and not waiter.future.cancelled():
            self._give_back(waiter.cost)  # admitted just as it gave up: return the budget it was given
            return
        waiter.future.cancel()
        if waiter in self.queue:
            self.queue.remove(waiter)
        self._admit_waiters()  # a big request leaving the head may let smaller ones in

    def _take(self, cost: int) -> Ticket:
        self.inflight_cost += cost
        self.running += 1
        self._set_cost_gauge()
        return Ticket(self, cost)

    def _release(self, ticket: Ticket) -> None:
        elapsed = time.monotonic() - ticket.admitted_at
        self.service_time_s += SERVICE_TIME_SMOOTHING * (elapsed - self.service_time_s)
        self._give_back(ticket.cost)

    def _give_back(self, cost: int) -> None:
        self.inflight_cost -= cost
        self.running -= 1
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        """Admit from the head of the queue, in order, while the head fits (FIFO: no starving a big request)."""
        while self.queue and self.fits(self.queue[0].cost):
            waiter = self.queue.popleft()
            if waiter.future.done():
                continue
            self.inflight_cost += waiter.cost
            self.running += 1
            waiter.future.set_result(None)
        self._set_queue_gauge()
        self._set_cost_gauge()

    # -- metrics
    def _count_admitted(self, how: str) -> None:
        if self.metrics is not None:
            self.metrics.admitted.labels(how).inc()

    def _count_shed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.shed.labels(reason).inc()

    def _set_queue_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued.set(len(self.queue))

    def _set_cost_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.admitted_cost.set(self.inflight_cost)
