"""Overload, faults and security against the real server: API keys, shedding a burst with 429 + Retry-After, a
cancellation storm that leaves the engine idle, SIGTERM draining with no process left, kill -9 and the journal.

Two servers of their own (a key, a small admission budget): one is stopped with SIGTERM, the other with kill -9.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.trace_journal import TraceJournal, read_records
from tests.integration.conftest import SERVER_ARGS, MetricsSnapshot, RemoteOpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.own_servers, pytest.mark.usefixtures("no_shared_server")]

KEY = "sk-ponder-integration-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Say hello."}]
STORY = [{"role": "user", "content": "Tell me a long story about a dragon."}]
NO_EOS = {"0": -100, "2": -100}  # generation runs to max_tokens
# Budget 4096 tokens in flight, 2 waiting: a best_of_n n=8 x 256 request costs 2048, so of a burst of 10, two run,
# two wait and six are refused; 16 single requests of 200 tokens (3200) all run at once.
ADMISSION_ARGS = ["--max-inflight-cost", "4096", "--max-queued-requests", "2", "--max-queue-wait", "60"]


# Generous: the module's bursts (26 requests at most at once) stay inside it; the headers show the key's bucket.
RATE_LIMIT_ARGS = ["--rate-limit-rpm", "120"]


def start_server(tmp_path: Path, *extra: str) -> RemoteOpenAIServer:
    remote = RemoteOpenAIServer(
        [*SERVER_ARGS, "--api-key", KEY, *extra], trace_dir=tmp_path / "traces", log_path=tmp_path / "server.log"
    )
    try:
        remote.wait_until_ready()
    except BaseException:
        remote.stop()
        raise
    return remote


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteOpenAIServer]:
    """The server the SIGTERM test ends; other tests of this module run before it."""
    remote = start_server(
        tmp_path_factory.mktemp("guarded"), *ADMISSION_ARGS, *RATE_LIMIT_ARGS, "--drain-timeout", "60"
    )
    try:
        yield remote
    finally:
        remote.stop()


def keyed_client(remote: RemoteOpenAIServer, **kwargs) -> openai.OpenAI:
    kwargs.setdefault("timeout", 300)
    return openai.OpenAI(base_url=remote.url_for("v1"), api_key=KEY, max_retries=0, **kwargs)


def scrape(remote: RemoteOpenAIServer) -> MetricsSnapshot:
    return MetricsSnapshot(httpx.get(remote.url_for("metrics"), timeout=30).text)


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def engine_idle(remote: RemoteOpenAIServer) -> bool:
    snapshot = scrape(remote)
    return (
        snapshot.sum("vllm:num_requests_running") == 0
        and snapshot.sum("vllm:num_requests_waiting") == 0
        and snapshot.get("ponder_admitted_cost_tokens") == 0
    )


# ---------------------------------------------------------------------------------------------- API keys
ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/strategies"),
    ("GET", "/v1/traces/tr-000000000000000000000000"),
]


def test_every_route_but_health_and_metrics_needs_the_key(guarded):
    with httpx.Client(base_url=guarded.url_root, timeout=30) as http:
        for method, path in ROUTES:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
                response = http.request(method, path, json={}, headers=headers)
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url_for("v1"), api_key="sk-wrong", max_retries=0).models.list()
    with keyed_client(guarded) as client:
        model = client.models.list().data[0].id
        assert client.chat.completions.create(model=model, messages=HELLO, max_tokens=4).choices
    assert KEY not in guarded.log_path.read_text(errors="replace")  # the key is never logged


def test_responses_carry_the_keys_rate_limit(guarded):
    with keyed_client(guarded) as client:
        model = client.models.list().data[0].id
        remaining = []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=1)
            assert raw.headers["x-ratelimit-limit-requests"] == "120"
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining[0] < 120 and remaining[1] < remaining[0]  # each request takes one; refill is 2 a second


# ---------------------------------------------------------------------------------------------- overload
def test_a_burst_is_shed_with_429_and_retry_after_and_the_admitted_finish(guarded):
    async def burst():
        async with openai.AsyncOpenAI(
            base_url=guarded.url_for("v1"), api_key=KEY, max_retries=0, timeout=300
        ) as client:
            model = (await client.models.list()).data[0].id

            async def one():
                started = time.monotonic()
                try:
                    await client.chat.completions.create(
                        model=model,
                        messages=HELLO,
                        max_tokens=256,
                        extra_body={"strategy": {"name": "best_of_n", "n": 8}},
                    )
                    return 200, time.monotonic() - started, None
                except openai.APIStatusError as exc:
                    return exc.status_code, time.monotonic() - started, exc.response.headers

            return await asyncio.gather(*(one() for _ in range(10)))

    results = asyncio.run(burst())
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(429) >= 5 and statuses.count(200) >= 2 and set(statuses) <= {200, 429}, statuses
    for status, seconds, headers in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and headers["x-should-retry"] == "true"
            assert seconds < 2  # refused at once, not after queueing
    snapshot = scrape(guarded)
    assert snapshot.get("ponder_shed_requests_total", reason="queue_full") == statuses.count(429)
    assert wait_for(lambda: engine_idle(guarded), 10)


def test_a_cancellation_storm_leaves_the_engine_idle(guarded):
    """16 requests (streamed and not, single and best_of_n) abandoned mid-generation: every engine sequence is
    aborted, the admission budget is returned, and a fresh request is answered at once."""

    async def storm():
        async with openai.AsyncOpenAI(
            base_url=guarded.url_for("v1"), api_key=KEY, max_retries=0, timeout=300
        ) as client:
            model = (await client.models.list()).data[0].id

            async def abandoned(i: int):
                body = {"model": model, "messages": STORY, "max_tokens": 200, "extra_body": {"logit_bias": NO_EOS}}
                if i % 4 == 3:
                    body["extra_body"]["strategy"] = {"name": "best_of_n", "n": 2}
                    body["max_tokens"] = 100
                if i % 2:
                    stream = await client.chat.completions.create(stream=True, **body)
                    async for _ in stream:
                        pass
                else:
                    await client.chat.completions.create(**body)

            tasks = [asyncio.create_task(abandoned(i)) for i in range(16)]
            await asyncio.sleep(3)
            assert scrape(guarded).sum("vllm:num_requests_running") > 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(storm())
    cancelled_at = time.monotonic()
    assert wait_for(lambda: engine_idle(guarded), 10), scrape(guarded).text
    idle_after = time.monotonic() - cancelled_at
    with keyed_client(guarded) as client:
        started = time.monotonic()
        model = client.models.list().data[0].id
        assert client.chat.completions.create(model=model, messages=HELLO, max_tokens=8).choices
        fresh = time.monotonic() - started
    print(f"\ncancellation storm: engine idle {idle_after:.2f} s after the clients left, fresh request {fresh:.2f} s")
    assert fresh < 10


# ---------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_then_exits_with_no_process_left(guarded):
    """SIGTERM to the server process (as a container runtime sends it): readiness and new requests turn 503,
    the request in flight finishes, the journal holds its trace, and nothing of the server's group survives."""
    with keyed_client(guarded) as client:
        model = client.models.list().data[0].id
    answers: list = []

    def long_request():
        with keyed_client(guarded) as own:
            answers.append(
                own.chat.completions.with_raw_response.create(
                    model=model,
                    messages=STORY,
                    max_tokens=300,
                    logit_bias=NO_EOS,
                    extra_headers={"X-Request-Id": "drained"},
                )
            )

    sender = threading.Thread(target=long_request)
    sender.start()
    assert wait_for(lambda: scrape(guarded).sum("vllm:num_requests_running") > 0, 30)
    engine_pids = set(guarded.group_processes()) - {guarded.proc.pid}
    assert engine_pids, "vLLM's engine process should be a child of the server"
    guarded.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: httpx.get(guarded.url_for("health"), timeout=10).status_code == 503, 5)
    health = httpx.get(guarded.url_for("health"), timeout=10)
    assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
    refused = httpx.post(
        guarded.url_for("v1/chat/completions"),
        json={"model": model, "messages": HELLO, "max_tokens": 4},
        headers=AUTH,
        timeout=30,
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"] == "1"
    sender.join(timeout=120)
    assert answers and answers[0].http_response.status_code == 200  # drained, not cut off
    assert answers[0].parse().usage.completion_tokens == 300
    assert guarded.proc.wait(timeout=60) == 0
    assert wait_for(lambda: not guarded.group_processes(), 15), guarded.group_processes()
    records = list(read_records(guarded.trace_dir))
    drained = [r for r in records if r.get("request_id") == "drained"]
    assert drained and drained[0]["status"] == "ok"
    assert not list(guarded.trace_dir.glob("*.active.jsonl"))  # the journal sealed its segment on the way out
    assert "drain complete" in guarded.log_tail(200)


# ---------------------------------------------------------------------------------------------- kill -9
def test_kill_9_loses_at_most_the_last_flush_and_the_journal_reads_clean(tmp_path):
    remote = start_server(tmp_path)
    try:
        with keyed_client(remote) as client:
            model = client.models.list().data[0].id
            trace_ids = [
                client.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=8).headers[
                    "x-trace-id"
                ]
                for _ in range(3)
            ]
        time.sleep(1.5)  # past the journal's flush interval (0.5 s)
        server_pid = remote.proc.pid
        children = set(remote.group_processes()) - {server_pid}
        os.kill(server_pid, signal.SIGKILL)
        remote.proc.wait(timeout=10)
        # The engine notices its parent is gone and exits by itself.
        leftovers = wait_for(lambda: not (set(remote.group_processes()) & children), 30)
        assert leftovers, f"engine processes outlived a kill -9 of the server: {remote.group_processes()}"
    finally:
        remote.stop()
    records = list(read_records(remote.trace_dir))
    assert {r["trace_id"] for r in records if r["type"] == "request"} >= set(trace_ids)
    journal = TraceJournal(remote.trace_dir)
    journal.start()  # seals the dead writer's active segment
    journal.close_sync()
    assert not list(remote.trace_dir.glob("*.active.jsonl"))
    assert len(list(read_records(remote.trace_dir, sealed_only=True))) == len(records)


# ---------------------------------------------------------------------------------------------- engine death
def test_a_dead_engine_is_a_quick_503_on_health_and_requests(tmp_path):
    remote = start_server(tmp_path)
    try:
        engine_pids = sorted(set(remote.group_processes()) - {remote.proc.pid})
        assert engine_pids
        for pid in engine_pids:
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: httpx.get(remote.url_for("health"), timeout=15).status_code == 503, 30)
        with keyed_client(remote, timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(model="smollm2-135m-instruct", messages=HELLO, max_tokens=4)
            assert failed.value.status_code == 503 and time.monotonic() - started < 10
            assert failed.value.response.headers["x-should-retry"] == "false"
    finally:
        remote.stop()
