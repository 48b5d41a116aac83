"""Admission control: decisions of the controller, and what clients see over HTTP (429/503, Retry-After)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.admission import AdmissionController, AdmissionRefused, request_cost
from server.app import create_app, drain
from server.settings import ServerSettings
from tests.fakes import CharRenderer, ScriptedEngine

MODEL = "toy"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 10}


async def settle() -> None:
    """Let woken waiters run (shield and wait_for each take a turn of the loop)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_cost_is_samples_times_max_tokens():
    assert request_cost(8, 256) == 2048 and request_cost(1, 16) == 16 and request_cost(0, 0) == 1


async def test_admits_while_the_budget_lasts_then_queues_in_order():
    admission = AdmissionController(max_inflight_cost=100, max_queued_requests=4, max_queue_wait_s=5)
    first = await admission.admit(60)
    second = asyncio.ensure_future(admission.admit(60))  # does not fit beside the first
    third = asyncio.ensure_future(admission.admit(10))  # would fit, but waits its turn (FIFO)
    await settle()
    assert not second.done() and not third.done() and len(admission.queue) == 2
    first.release()
    await settle()
    assert second.done() and third.done()  # 60 + 10 fit together
    assert admission.inflight_cost == 70 and admission.running == 2
    (await second).release()
    (await third).release()
    assert admission.inflight_cost == 0 and admission.running == 0


async def test_a_request_costlier_than_the_budget_runs_alone():
    admission = AdmissionController(max_inflight_cost=100, max_queued_requests=4, max_queue_wait_s=5)
    big = await admission.admit(1000)
    small = asyncio.ensure_future(admission.admit(1))
    await settle()
    assert not small.done()
    big.release()
    big.release()  # idempotent
    (await small).release()
    assert admission.inflight_cost == 0 and admission.running == 0


async def test_a_full_queue_is_a_429_with_retry_after():
    admission = AdmissionController(max_inflight_cost=10, max_queued_requests=1, max_queue_wait_s=5)
    running = await admission.admit(10)
    waiting = asyncio.ensure_future(admission.admit(10))
    await settle()
    with pytest.raises(AdmissionRefused) as refused:
        await admission.admit(10)
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert refused.value.headers["x-should-retry"] == "true" and int(refused.value.headers["Retry-After"]) >= 1
    running.release()
    (await waiting).release()


async def test_a_long_wait_is_a_503_and_frees_the_queue():
    admission = AdmissionController(max_inflight_cost=10, max_queued_requests=4, max_queue_wait_s=0.05)
    running = await admission.admit(10)
    with pytest.raises(AdmissionRefused) as refused:
        await admission.admit(5)
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert not admission.queue
    running.release()
    assert admission.inflight_cost == 0


async def test_a_cancelled_waiter_leaves_no_trace():
    admission = AdmissionController(max_inflight_cost=10, max_queued_requests=4, max_queue_wait_s=5)
    running = await admission.admit(10)
    waiting = asyncio.ensure_future(admission.admit(10))
    await settle()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not admission.queue
    running.release()
    assert admission.inflight_cost == 0 and admission.running == 0


async def test_a_waiter_cancelled_just_after_admission_gives_its_budget_back():
    admission = AdmissionController(max_inflight_cost=10, max_queued_requests=4, max_queue_wait_s=5)
    running = await admission.admit(10)
    waiting = asyncio.ensure_future(admission.admit(10))
    await settle()
    running.release()  # admits the waiter (its future is set) ...
    waiting.cancel()  # ... but its task is cancelled before it resumes
    await asyncio.gather(waiting, return_exceptions=True)
    assert admission.inflight_cost == 0 and admission.running == 0


async def test_draining_refuses_with_503():
    admission = AdmissionController(max_inflight_cost=10, max_queued_requests=4, max_queue_wait_s=5)
    admission.draining = True
    with pytest.raises(AdmissionRefused) as refused:
        await admission.admit(1)
    assert refused.value.status == 503 and refused.value.code == "shutting_down"


# ---------------------------------------------------------------------------------------------- over HTTP
@contextmanager
def serve(tmp_path: Path, engine: ScriptedEngine, **settings: Any) -> Iterator[TestClient]:
    config = ServerSettings(
        model_path="unused",
        served_model_name=MODEL,
        trace_dir=tmp_path / "traces",
        trace_flush_interval_s=0.01,
        **settings,
    )
    with TestClient(create_app(config, lambda: engine, CharRenderer)) as client:
        yield client


def metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def burst(client: TestClient, count: int, body: dict[str, Any]) -> list[Any]:
    responses: list[Any] = [None] * count

    def send(i: int) -> None:
        responses[i] = client.post("/v1/chat/completions", json=body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses


@pytest.mark.parametrize("stream", [False, True])
def test_a_burst_over_capacity_is_shed_with_429_and_the_rest_served(tmp_path, stream):
    # Budget for one request at a time, one waiting: of 6 at once, 2 are served, 4 refused. Each takes 1 s, so
    # the burst has all arrived before the first ends, even on a loaded machine.
    engine = ScriptedEngine(["The answer is 42."], delay_s=1.0)
    with serve(tmp_path, engine, max_inflight_cost=10, max_queued_requests=1, max_queue_wait_s=10) as client:
        responses = burst(client, 6, CHAT | {"stream": stream})
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429, 429], [r.text for r in responses]
        for refused in (r for r in responses if r.status_code == 429):
            assert refused.json()["error"]["code"] == "queue_full"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-should-retry"] == "true"
        assert metric(client, "ponder_shed_requests_total", reason="queue_full") == 4
        assert metric(client, "ponder_admitted_requests_total", how="immediately") == 1
        assert metric(client, "ponder_admitted_requests_total", how="after_queue") == 1
        assert metric(client, "ponder_admitted_cost_tokens") == 0 and metric(client, "ponder_queued_requests") == 0


def test_waiting_past_the_queue_timeout_is_a_503(tmp_path):
    engine = ScriptedEngine(["The answer is 42."], delay_s=0.5)
    with serve(tmp_path, engine, max_inflight_cost=10, max_queued_requests=4, max_queue_wait_s=0.1) as client:
        statuses = sorted(r.status_code for r in burst(client, 2, CHAT))
        assert statuses == [200, 503]
        assert metric(client, "ponder_shed_requests_total", reason="queue_timeout") == 1


def test_engine_death_is_a_503_that_says_do_not_retry(tmp_path):
    with serve(tmp_path, ScriptedEngine(dead=True)) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"


def test_drain_turns_readiness_off_and_waits_for_requests(tmp_path):
    engine = ScriptedEngine(["The answer is 42."], delay_s=0.5)
    with serve(tmp_path, engine) as client:
        service = client.app.state.service
        slow: list[Any] = []
        sender = threading.Thread(target=lambda: slow.append(client.post("/v1/chat/completions", json=CHAT)))
        sender.start()
        while not service.admission.running:
            time.sleep(0.01)
        drained = client.portal.start_task_soon(drain, service, 5.0)
        while not service.admission.draining:
            time.sleep(0.01)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
        refused = client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
        assert drained.result(timeout=5) is True
        sender.join()
        assert slow[0].status_code == 200  # the in-flight request finished


def test_drain_gives_up_at_its_timeout(tmp_path):
    engine = ScriptedEngine(["The answer is 42."], delay_s=2)
    with serve(tmp_path, engine) as client:
        service = client.app.state.service
        sender = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=CHAT))
        sender.start()
        while not service.admission.running:
            time.sleep(0.01)
        started = time.monotonic()
        assert client.portal.call(drain, service, 0.2) is False
        assert time.monotonic() - started < 1
        sender.join()
