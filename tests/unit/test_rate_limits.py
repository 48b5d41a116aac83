"""Per-client rate limits: token-bucket math on a fake clock, then what clients see over HTTP (429s, headers)."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import add_ponder_args, settings_from
from server.rate_limits import (
    RateLimiter,
    RateLimitExceeded,
    TokenBucket,
    client_identity,
    go_duration,
)
from server.security import key_label
from server.settings import ServerSettings
from server.trace_journal import read_records
from tests.fakes import CharRenderer, ScriptedEngine
from tests.unit.test_admission import metric

MODEL = "toy"
KEY_A, KEY_B = "sk-ponder-key-a-0000000001", "sk-ponder-key-b-0000000002"
AUTH_A, AUTH_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 16}
RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def refusal(limiter: RateLimiter, identity: str, cost: int) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.take(identity, cost)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    return refused.value


# ---------------------------------------------------------------------------------------------- one bucket
def test_a_bucket_starts_full_and_refills_continuously_up_to_its_capacity():
    bucket = TokenBucket.full(60, now=0.0)  # 60 a minute: one a second
    bucket.take(60, now=0.0)
    assert bucket.level == 0 and bucket.wait_s(1, now=0.0) == pytest.approx(1.0)
    assert bucket.wait_s(30, now=10.0) == pytest.approx(20.0)  # 10 refilled, 20 to go
    bucket.refill(now=30.0)
    assert bucket.level == pytest.approx(30.0)
    bucket.refill(now=10_000.0)
    assert bucket.level == 60  # never above capacity, however long it idles
    assert bucket.wait_s(61, now=10_000.0) == float("inf")  # more than it can ever hold


def test_giving_back_never_overfills_a_bucket():
    bucket = TokenBucket.full(100, now=0.0)
    bucket.take(30, now=0.0)
    bucket.give_back(30, now=0.0)
    bucket.give_back(30, now=0.0)
    assert bucket.level == 100


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (0.0004, "1ms"), (1, "1s"), (1.5, "1.5s"), (59.9999, "1m0s"), (60, "1m0s")],
)
def test_reset_durations_print_as_go_and_openai_do(seconds, text):
    assert go_duration(seconds) == text


# ---------------------------------------------------------------------------------------------- the limiter
def test_requests_per_minute_refuses_then_admits_after_retry_after():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=None, clock=clock)
    for _ in range(3):
        limiter.take("key:a", 10)
    refused = refusal(limiter, "key:a", 10)
    assert refused.limit == "requests"
    assert refused.headers["Retry-After"] == "20" and refused.headers["x-should-retry"] == "true"  # 3/min: one/20 s
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ratelimit-limit-tokens" not in refused.headers  # only the limits that are on
    clock.advance(19.9)
    assert refusal(limiter, "key:a", 10).headers["Retry-After"] == "1"  # 0.1 s left: at least 1
    clock.advance(0.1)
    limiter.take("key:a", 10)


def test_tokens_per_minute_counts_the_cost_and_a_refusal_takes_nothing():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=10, tokens_per_minute=1000, clock=clock)
    limiter.take("key:a", 600)
    refused = refusal(limiter, "key:a", 600)  # 400 left
    assert refused.limit == "tokens"
    assert refused.headers["Retry-After"] == "12"  # 200 short at 1000/60 a second
    assert refused.headers["x-ratelimit-remaining-tokens"] == "400"
    assert refused.headers["x-ratelimit-remaining-requests"] == "9"  # the refused request took no request either
    grant = limiter.take("key:a", 400)  # a smaller request fits at once: nothing was held for the refused one
    assert grant.headers()["x-ratelimit-remaining-tokens"] == "0"
    assert grant.headers()["x-ratelimit-remaining-requests"] == "8"


def test_a_request_costlier_than_the_whole_limit_is_told_it_can_never_fit():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=100, clock=clock)
    refused = refusal(limiter, "key:a", 101)
    assert refused.headers["x-should-retry"] == "false" and "Retry-After" not in refused.headers
    assert "can never be served" in refused.message and "101" in refused.message
    limiter.take("key:a", 100)  # nothing was taken: the whole minute's worth is still there


def test_a_given_back_grant_restores_both_buckets_once():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=5, tokens_per_minute=100, clock=clock)
    limiter.take("key:a", 50)
    grant = limiter.take("key:a", 30)
    grant.give_back()
    grant.give_back()  # idempotent
    headers = grant.headers()
    assert headers["x-ratelimit-remaining-tokens"] == "50" and headers["x-ratelimit-remaining-requests"] == "4"


def test_clients_have_buckets_of_their_own():
    limiter = RateLimiter(requests_per_minute=1, tokens_per_minute=None, clock=FakeClock())
    limiter.take("key:a", 1)
    refusal(limiter, "key:a", 1)
    limiter.take("key:b", 1)
    limiter.take("addr:10.0.0.1", 1)


def test_tracked_clients_stay_bounded_and_only_idle_ones_are_forgotten_first():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=1, tokens_per_minute=None, max_clients=2, clock=clock)
    limiter.take("key:a", 1)
    clock.advance(30)
    limiter.take("key:b", 1)
    clock.advance(30)  # a: idle a minute, so full again; b: half spent
    limiter.take("key:c", 1)
    assert list(limiter.clients) == ["key:b", "key:c"]
    refusal(limiter, "key:b", 1)  # b's debt is remembered
    limiter.take("key:d", 1)  # over the bound with nobody idle: the least recently seen goes
    assert len(limiter.clients) == 2 and "key:d" in limiter.clients
    clock.advance(60)
    limiter.take("key:e", 1)
    assert list(limiter.clients) == ["key:e"]


def test_no_limits_never_refuses_and_sends_no_headers():
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=None)
    assert not limiter.enabled
    grants = [limiter.take("key:a", 10**9) for _ in range(1000)]
    assert all(grant.headers() == {} for grant in grants) and not limiter.clients


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        RateLimiter(requests_per_minute=0, tokens_per_minute=None)
    with pytest.raises(ValueError):
        ServerSettings(model_path="m", served_model_name=MODEL, rate_limit_tokens_per_minute=0)


def test_the_cli_flags_reach_the_settings():
    parser = argparse.ArgumentParser()
    add_ponder_args(parser)
    settings = settings_from(parser.parse_args(["--rate-limit-rpm", "30", "--rate-limit-tpm", "5000"]), "m", "t", ())
    assert settings.rate_limit_requests_per_minute == 30 and settings.rate_limit_tokens_per_minute == 5000
    defaults = settings_from(parser.parse_args([]), "m", "t", ())
    assert defaults.rate_limit_requests_per_minute is None and defaults.rate_limit_tokens_per_minute is None


# ---------------------------------------------------------------------------------------------- identity
def request_with(client: tuple[str, int] | None, **state: Any) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": client, "state": state})


def test_the_identity_is_the_key_label_else_the_client_address():
    label = key_label(KEY_A)
    assert KEY_A not in label and label == key_label(KEY_A) and label != key_label(KEY_B)
    assert client_identity(request_with(("10.0.0.1", 5000), api_key_label=label)) == label
    assert client_identity(request_with(("10.0.0.1", 5000))) == "addr:10.0.0.1"
    assert client_identity(request_with(None)) == "addr:unknown"


# ---------------------------------------------------------------------------------------------- over HTTP
@contextmanager
def serve(tmp_path: Path, engine: ScriptedEngine | None = None, **settings: Any) -> Iterator[TestClient]:
    config = ServerSettings(
        model_path="unused",
        served_model_name=MODEL,
        trace_dir=tmp_path / "traces",
        trace_flush_interval_s=0.01,
        **settings,
    )
    with TestClient(
        create_app(config, lambda: engine or ScriptedEngine(["The answer is 42."]), CharRenderer)
    ) as client:
        yield client


def assert_rate_limited(response, limit: str) -> None:
    assert response.status_code == 429, response.text
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert f"{limit} per minute" in response.json()["error"]["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 60 and response.headers["x-should-retry"] == "true"
    assert response.headers[f"x-ratelimit-limit-{limit}"].isdigit()


@pytest.mark.parametrize("stream", [False, True])
def test_one_key_over_its_requests_limit_gets_429_while_another_is_served(tmp_path, stream):
    engine = ScriptedEngine(["The answer is 42."])
    with serve(tmp_path, engine, api_keys=(KEY_A, KEY_B), rate_limit_requests_per_minute=2) as client:
        body = CHAT | {"stream": stream}
        served = [client.post("/v1/chat/completions", json=body, headers=AUTH_A) for _ in range(2)]
        assert [r.status_code for r in served] == [200, 200]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in served] == ["1", "0"]
        assert served[0].headers["x-ratelimit-limit-requests"] == "2"
        refused = client.post("/v1/chat/completions", json=body, headers=AUTH_A)
        assert_rate_limited(refused, "requests")
        assert int(refused.headers["retry-after"]) == 30  # 2 a minute: the next one in 30 s
        assert KEY_A not in refused.text and KEY_A not in str(refused.headers)
        other = client.post("/v1/chat/completions", json=body, headers=AUTH_B)
        assert other.status_code == 200 and other.headers["x-ratelimit-remaining-requests"] == "1"
        assert len(engine.calls_of("stream" if stream else "generate")) == 3  # the refused one never ran
        assert metric(client, "ponder_rate_limited_requests_total", limit="requests") == 1
        assert metric(client, "ponder_rate_limited_requests_total", limit="tokens") == 0


def test_the_tokens_limit_refuses_a_request_whose_samples_times_max_tokens_exceed_what_is_left(tmp_path):
    with serve(tmp_path, api_keys=(KEY_A,), rate_limit_tokens_per_minute=100) as client:
        first = client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 40}, headers=AUTH_A)
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "60"
        two_samples = client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 40, "n": 2}, headers=AUTH_A)
        assert_rate_limited(two_samples, "tokens")  # 2 x 40 = 80 > 60
        assert "requested 80" in two_samples.json()["error"]["message"]
        assert "x-ratelimit-limit-requests" not in two_samples.headers  # that limit is off
        one_sample = client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 40}, headers=AUTH_A)
        assert one_sample.status_code == 200  # 40 fits: the refusal took nothing
        never = client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 101}, headers=AUTH_A)
        assert never.status_code == 429 and never.headers["x-should-retry"] == "false"
        assert "retry-after" not in never.headers and "can never be served" in never.json()["error"]["message"]
        assert metric(client, "ponder_rate_limited_requests_total", limit="tokens") == 2


def test_a_rate_limited_request_leaves_no_trace_and_loses_none(tmp_path):
    engine = ScriptedEngine(["The answer is 42."])
    with serve(tmp_path, engine, rate_limit_requests_per_minute=2) as client:  # no keys: limited by address
        served = [client.post("/v1/chat/completions", json=CHAT) for _ in range(2)]
        trace_ids = [r.headers["x-trace-id"] for r in served]
        refused = client.post("/v1/chat/completions", json=CHAT)
        assert_rate_limited(refused, "requests")
        assert "x-trace-id" not in refused.headers
        admission = client.app.state.service.admission
        assert admission.running == 0 and admission.inflight_cost == 0 and not admission.queue
        assert metric(client, "ponder_admitted_requests_total", how="immediately") == 2
        assert metric(client, "ponder_requests_total") == 2 and len(engine.calls) == 2
    records = [r for r in read_records(tmp_path / "traces") if r["type"] == "request"]
    assert sorted(r["trace_id"] for r in records) == sorted(trace_ids)


def test_a_request_admission_refuses_gives_its_tokens_back(tmp_path):
    # One request at a time, nobody may wait: the second is a 429 queue_full while the first runs.
    engine = ScriptedEngine(["The answer is 42."], delay_s=0.3)
    limits = {"max_inflight_cost": 16, "max_queued_requests": 0, "rate_limit_requests_per_minute": 2}
    with serve(tmp_path, engine, **limits) as client:
        admission = client.app.state.service.admission
        slow: list[Any] = []
        sender = threading.Thread(target=lambda: slow.append(client.post("/v1/chat/completions", json=CHAT)))
        sender.start()
        while not admission.running:
            time.sleep(0.01)
        shed = client.post("/v1/chat/completions", json=CHAT)
        assert shed.status_code == 429 and shed.json()["error"]["code"] == "queue_full"
        assert shed.headers["x-ratelimit-remaining-requests"] == "1"  # taken, then given back
        sender.join()
        assert slow[0].status_code == 200
        # Without the give-back, these two requests (the 3rd and 4th) would both be over 2 a minute.
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert_rate_limited(client.post("/v1/chat/completions", json=CHAT), "requests")


def test_limits_are_off_by_default(tmp_path):
    with serve(tmp_path, api_keys=(KEY_A,)) as client:
        responses = [client.post("/v1/chat/completions", json=CHAT, headers=AUTH_A) for _ in range(30)]
        responses.append(client.post("/v1/chat/completions", json=CHAT | {"stream": True}, headers=AUTH_A))
        assert all(r.status_code == 200 for r in responses)
        assert not any(name in r.headers for r in responses for name in RATE_LIMIT_HEADERS)
        assert not client.app.state.service.rate_limiter.enabled
        assert metric(client, "ponder_rate_limited_requests_total", limit="requests") == 0


def test_only_completions_are_limited(tmp_path):
    with serve(tmp_path, api_keys=(KEY_A,), rate_limit_requests_per_minute=1) as client:
        assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH_A).status_code == 200
        for _ in range(3):
            models = client.get("/v1/models", headers=AUTH_A)
            assert models.status_code == 200 and "x-ratelimit-limit-requests" not in models.headers
        completion = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4}, headers=AUTH_A
        )
        assert_rate_limited(completion, "requests")  # both completion endpoints share the key's bucket
