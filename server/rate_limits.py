"""Per-client rate limits, as OpenAI has them: requests per minute and tokens per minute, each a token bucket.

Global admission (server/admission.py) keeps the engine's latency bounded, but one busy client could fill it
alone. Here each client gets two optional buckets (both off by default), refilled continuously: `capacity` =
the per-minute limit, so an idle client may burst a whole minute's worth, then runs at the limit's rate.

- A request costs 1 request and `request_cost(samples, max_tokens)` tokens, the cost admission uses: what it
  may make the engine produce, known before it runs (OpenAI also counts max_tokens, not what was generated).
  Both buckets must hold enough, or nothing is taken.
- The client is the API key that authenticated the request, as a digest label (`security.key_label`; the raw
  key is never kept), or the client's address when the server has no keys (behind a proxy that is the proxy's
  address, unless uvicorn trusts its X-Forwarded-For: `FORWARDED_ALLOW_IPS`).
- `CompletionService._serve` calls `RateLimiter.take` once the request is validated and its cost known, before
  admission, so a refused request never queues. `take` never awaits. A request admission then refuses (429
  `queue_full`, 503 `overloaded`/`shutting_down`) or whose client leaves while queued never ran: its grant is
  given back, request and tokens, so the client may spend them once the server has room.
- Limits are per server process: N replicas behind a load balancer allow a client up to N times the limit.

| refusal | status | code | `Retry-After` | `x-should-retry` |
| --- | --- | --- | --- | --- |
| a bucket holds too little now | 429 | `rate_limit_exceeded` | s until both buckets hold enough (1-60) | `true` |
| the cost is over the whole tokens-per-minute limit | 429 | `rate_limit_exceeded` | none | `false` |

Every response to a rate-limited completion request (200, stream, or error, the 429s included) carries OpenAI's
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers for the limits that are on. `reset` is the time
until that bucket is full again, written as Go (and OpenAI) print durations: "0s", "250ms", "1.5s", "1m0s".

Memory stays bounded: a client untouched for a minute has full buckets, the same as a client never seen, so it
is dropped; beyond `max_clients` clients seen within the last minute, the least recently seen one is dropped too
(forgetting its debt: lenient, never stricter).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.admission import MAX_RETRY_AFTER_S, retry_headers
from server.errors import OpenAIError
from server.metrics import PonderMetrics

LimitKind = Literal["requests", "tokens"]
REFILL_S = 60.0  # an empty bucket is full again after a minute: capacity is a per-minute limit
MAX_TRACKED_CLIENTS = 10_000  # clients with a partly spent bucket; ~1 KiB each
GRANT_STATE = "rate_limit_grant"  # request.state attribute `RateLimitHeaders` reads the response's headers from


# ---------------------------------------------------------------------------------------------- one bucket
@dataclass
class TokenBucket:
    """Holds at most `capacity`, refills at `capacity` per minute, continuously. Starts full."""

    capacity: int
    level: float
    updated_at: float

    @classmethod
    def full(cls, capacity: int, now: float) -> TokenBucket:
        return cls(capacity, float(capacity), now)

    @property
    def refill_per_s(self) -> float:
        return self.capacity / REFILL_S

    def refill(self, now: float) -> None:
        if now > self.updated_at:
            self.level = min(float(self.capacity), self.level + (now - self.updated_at) * self.refill_per_s)
            self.updated_at = now

    def wait_s(self, amount: int, now: float) -> float:
        """Seconds until the bucket holds `amount` (0 if it does now); infinite if it never can."""
        if amount > self.capacity:
            return math.inf
        self.refill(now)
        return max(0.0, (amount - self.level) / self.refill_per_s)

    def take(self, amount: int, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def give_back(self, amount: int, now: float) -> None:
        self.refill(now)
        self.level = min(float(self.capacity), self.level + amount)

    def seconds_until_full(self, now: float) -> float:
        self.refill(now)
        return (self.capacity - self.level) / self.refill_per_s


# ---------------------------------------------------------------------------------------------- headers
def go_duration(seconds: float) -> str:
    """OpenAI's format for `x-ratelimit-reset-*`, Go's for a duration, to the millisecond: "1m0s", "1.5s", "20ms"."""
    ms = math.ceil(seconds * 1000 - 1e-6)  # 1e-6: float noise must not turn 1.5 s into "1.501s"
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(buckets: dict[LimitKind, TokenBucket], now: float) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind, bucket in buckets.items():
        reset = go_duration(bucket.seconds_until_full(now))  # refills first, so `level` is current below
        headers[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
        headers[f"x-ratelimit-reset-{kind}"] = reset
    return headers


# ---------------------------------------------------------------------------------------------- refusals
class RateLimitExceeded(OpenAIError):
    def __init__(self, message: str, limit: LimitKind, headers: dict[str, str]) -> None:
        super().__init__(429, message, code="rate_limit_exceeded")
        self.limit = limit
        self.headers.update(headers)


def over_limit(
    kind: LimitKind, bucket: TokenBucket, amount: int, wait_s: float, headers: dict[str, str]
) -> RateLimitExceeded:
    retry_after_s = max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait_s)))
    counted = "" if kind == "requests" else " (a request's tokens: samples x max_tokens)"
    message = (
        f"rate limit reached for {kind} per minute{counted}: limit {bucket.capacity}, "
        f"remaining {max(0, int(bucket.level))}, requested {amount}; retry in {retry_after_s} s"
    )
    return RateLimitExceeded(message, kind, headers | retry_headers(retry_after_s, should_retry=True))


def never_fits(capacity: int, cost: int, headers: dict[str, str]) -> RateLimitExceeded:
    message = (
        f"this request may generate {cost} tokens (samples x max_tokens), over this client's limit of {capacity} "
        "tokens per minute, so it can never be served: lower max_tokens, n, or the strategy's samples"
    )
    return RateLimitExceeded(message, "tokens", headers | {"x-should-retry": "false"})


# ---------------------------------------------------------------------------------------------- the limiter
@dataclass(eq=False)
class RateLimitGrant:
    """What one request took from its client's buckets; `give_back()` is idempotent and never awaits."""

    limiter: RateLimiter | None
    buckets: dict[LimitKind, TokenBucket] = field(default_factory=dict)
    amounts: dict[LimitKind, int] = field(default_factory=dict)
    given_back: bool = False

    def give_back(self) -> None:
        if self.limiter is not None and not self.given_back:
            self.given_back = True
            self.limiter._give_back(self)

    def headers(self) -> dict[str, str]:
        if self.limiter is None:
            return {}
        return rate_limit_headers(self.buckets, self.limiter.clock())


UNLIMITED = RateLimitGrant(limiter=None)  # what every request gets when no limit is on


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        max_clients: int = MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        metrics: PonderMetrics | None = None,
    ) -> None:
        limits = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self.limits: dict[LimitKind, int] = {kind: limit for kind, limit in limits.items() if limit is not None}
        if any(limit < 1 for limit in self.limits.values()):
            raise ValueError(f"rate limits must be at least 1 per minute, got {self.limits}")
        self.max_clients = max_clients
        self.clock = clock
        self.metrics = metrics
        self.clients: OrderedDict[str, dict[LimitKind, TokenBucket]] = OrderedDict()  # least recently seen first
        self.seen_at: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    def take(self, identity: str, cost: int) -> RateLimitGrant:
        """One request of `cost` tokens for `identity`, or RateLimitExceeded (429) with nothing taken."""
        if not self.enabled:
            return UNLIMITED
        now = self.clock()
        buckets = self._buckets_of(identity, now)
        amounts: dict[LimitKind, int] = {kind: 1 if kind == "requests" else cost for kind in buckets}
        waits = {kind: bucket.wait_s(amounts[kind], now) for kind, bucket in buckets.items()}
        binding = max(waits, key=lambda kind: waits[kind])
        if waits[binding] > 0:
            self._count_refusal(binding)
            headers = rate_limit_headers(buckets, now)
            if math.isinf(waits[binding]):
                raise never_fits(buckets[binding].capacity, cost, headers)
            raise over_limit(binding, buckets[binding], amounts[binding], waits[binding], headers)
        for kind, bucket in buckets.items():
            bucket.take(amounts[kind], now)
        return RateLimitGrant(self, buckets, amounts)

    def _give_back(self, grant: RateLimitGrant) -> None:
        now = self.clock()
        for kind, bucket in grant.buckets.items():
            bucket.give_back(grant.amounts[kind], now)

    def _buckets_of(self, identity: str, now: float) -> dict[LimitKind, TokenBucket]:
        self._forget_idle(now)
        buckets = self.clients.get(identity)
        if buckets is None:
            buckets = {kind: TokenBucket.full(limit, now) for kind, limit in self.limits.items()}
            self.clients[identity] = buckets
            if len(self.clients) > self.max_clients:
                oldest, _ = self.clients.popitem(last=False)
                del self.seen_at[oldest]
        self.clients.move_to_end(identity)
        self.seen_at[identity] = now
        return buckets

    def _forget_idle(self, now: float) -> None:
        """Drop clients unseen for a minute, oldest first: their buckets are full, as a new client's would be."""
        while self.clients:
            oldest = next(iter(self.clients))
            if now - self.seen_at[oldest] < REFILL_S:
                return
            del self.clients[oldest], self.seen_at[oldest]

    def _count_refusal(self, limit: LimitKind) -> None:
        if self.metrics is not None:
            self.metrics.rate_limited.labels(limit).inc()


# ---------------------------------------------------------------------------------------------- HTTP glue
def client_identity(request: Request) -> str:
    """The API key's digest label `require_api_key` left, else (a server without keys) the client's address."""
    label = getattr(request.state, "api_key_label", None)
    if label:
        return label
    return f"addr:{request.client.host if request.client else 'unknown'}"


class RateLimitHeaders:
    """ASGI middleware: the `x-ratelimit-*` headers of the request's grant (`request.state.rate_limit_grant`) on
    its response, however that response is made (JSON, a stream, an error raised after the grant). Computed as
    the response starts, so a grant given back (admission refused the request) shows in `remaining`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            grant = scope.get("state", {}).get(GRANT_STATE)
            if message["type"] == "http.response.start" and grant is not None:
                headers = MutableHeaders(scope=message)
                for name, value in grant.headers().items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
