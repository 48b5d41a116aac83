"""Ponder's Prometheus metrics, on a registry of their own, exposed next to vLLM's engine metrics.

Names follow Prometheus conventions: base units, `_total` on counters, no colons (vLLM's own use `vllm:`),
labels of low cardinality (strategy names, verifier names, outcome classes; never request data).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SCORE_BUCKETS = tuple(i / 10 for i in range(1, 11))
SAMPLE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class PonderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ponder_requests", "Requests served, by strategy and outcome", ["strategy", "status"], registry=r
        )
        self.request_duration = Histogram(
            "ponder_request_duration_seconds",
            "Wall time of a request",
            ["strategy"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.samples = Histogram(
            "ponder_samples_per_request",
            "Samples drawn for one request",
            ["strategy"],
            buckets=SAMPLE_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "ponder_generated_tokens",
            "Tokens generated, returned to the client or hidden (search, judges)",
            ["strategy", "kind"],
            registry=r,
        )
        self.verifier_score = Histogram(
            "ponder_verifier_score",
            "Scores verifiers gave to candidates",
            ["verifier"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("ponder_requests_in_flight", "Requests being served now", ["strategy"], registry=r)
        self.trace_write_errors = Counter("ponder_trace_write_errors", "Failed writes to the trace journal", registry=r)
        self.feedback = Counter("ponder_feedback", "Feedback records accepted", registry=r)
        # admission control (server/admission.py): cost = planned samples x max_tokens
        self.admitted = Counter(
            "ponder_admitted_requests", "Requests admitted, immediately or after queueing", ["how"], registry=r
        )
        self.shed = Counter(
            "ponder_shed_requests",
            "Requests refused by admission control: queue_full (429), queue_timeout or draining (503)",
            ["reason"],
            registry=r,
        )
        self.deadline_exceeded = Counter(
            "ponder_deadline_exceeded",
            "Requests whose deadline passed: answered with the best so far, or a 504",
            ["strategy", "outcome"],
            registry=r,
        )
        self.queued = Gauge("ponder_queued_requests", "Requests waiting for admission now", registry=r)
        self.admitted_cost = Gauge(
            "ponder_admitted_cost_tokens", "Cost (samples x max_tokens) of the requests admitted now", registry=r
        )
        self.queue_wait = Histogram(
            "ponder_queue_wait_seconds",
            "Time admitted requests waited in the queue",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        # per-client rate limits (server/rate_limits.py); never labelled by client
        self.rate_limited = Counter(
            "ponder_rate_limited_requests",
            "Requests refused by a per-client rate limit, by the limit that refused them: requests or tokens",
            ["limit"],
            registry=r,
        )
        self.draining = Gauge("ponder_draining", "1 while the server drains after SIGTERM", registry=r)

    def exposition(self) -> bytes:
        """Ponder's metrics followed by vLLM's (which live in prometheus_client's default registry)."""
        from prometheus_client import REGISTRY

        return generate_latest(self.registry) + generate_latest(REGISTRY)
