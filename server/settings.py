"""Everything a Ponder server is configured with, beyond vLLM's own engine arguments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TraceContent = Literal["keep", "hash", "drop"]
TRACE_CONTENT_MODES: tuple[TraceContent, ...] = ("keep", "hash", "drop")


@dataclass(frozen=True)
class ServerSettings:
    model_path: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    default_strategy: str = "single"
    trace_dir: Path = Path("traces")
    max_samples_per_request: int = 16  # n of best_of_n / self_consistency, and the request's own n
    max_tokens_cap: int = 4096  # per sample; also bounded by the model's context
    heartbeat_interval_s: float = 2.0  # SSE comments while a search strategy works, so proxies keep the stream
    request_timeout_s: float | None = None  # per-request deadline for the strategy's engine calls
    trace_flush_interval_s: float = 0.5  # how much a kill -9 can lose at most
    # -- security
    api_keys: tuple[str, ...] = ()  # empty: no authentication (a local development server)
    metrics_require_auth: bool = False  # Prometheus scrapers often cannot send a key; /health never needs one
    max_body_bytes: int = 4 * 2**20  # a 4096-token context is ~16 KiB of text: 4 MiB leaves room, stops abuse
    max_messages: int = 256
    max_tests: int = 64  # code_tests snippets, each run in a subprocess per candidate
    trace_content: TraceContent = "keep"  # message and candidate text in traces: kept, hashed or dropped
    mask_secrets: bool = True  # API keys, bearer tokens, sk-... in any text written to traces or logs
    # -- admission (global): cost = planned samples x max_tokens, the tokens a request may make the engine produce
    max_inflight_cost: int = 65536  # tokens in flight across admitted requests; a bigger request runs alone
    max_queued_requests: int = 64  # waiting for admission; beyond: 429
    max_queue_wait_s: float = 30.0  # waited this long without admission: 503
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish before the server stops
    # -- per-client rate limits (server/rate_limits.py), per API key (or address without keys); None: off
    rate_limit_requests_per_minute: int | None = None
    rate_limit_tokens_per_minute: int | None = None  # tokens = samples x max_tokens, the admission cost

    def __post_init__(self) -> None:
        if self.max_samples_per_request < 1:
            raise ValueError("max_samples_per_request must be at least 1")
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if self.trace_content not in TRACE_CONTENT_MODES:
            raise ValueError(f"trace_content must be one of {TRACE_CONTENT_MODES}, got {self.trace_content!r}")
        if self.max_inflight_cost < 1 or self.max_queued_requests < 0 or self.max_queue_wait_s <= 0:
            raise ValueError("max_inflight_cost must be >= 1, max_queued_requests >= 0, max_queue_wait_s > 0")
        for limit in (self.rate_limit_requests_per_minute, self.rate_limit_tokens_per_minute):
            if limit is not None and limit < 1:
                raise ValueError(f"a rate limit must be at least 1 per minute (or None: off), got {limit}")
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
