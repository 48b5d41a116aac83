"""The remote engine against fake upstreams that speak the OpenAI completions protocol (vLLM's dialect) over an
in-memory transport: request bodies, routing (least-loaded, sticky per request, failover and backoff), error
mapping through the HTTP app, cancellation closing the upstream stream, and the refusals of a plain upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine import EngineDeadError, SamplingOptions, UpstreamError
from server.remote_engine import (
    RemoteEngine,
    Upstream,
    UpstreamRouter,
    backoff_seconds,
    completion_body,
    least_loaded,
    read_model_card,
    sticky_key,
)
from server.settings import ServerSettings
from tests.fakes import CharRenderer

RENDERER = CharRenderer()
MODEL = "toy"
OPTIONS = SamplingOptions(max_tokens=32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SSEStream(httpx2.AsyncByteStream):
    """An SSE body, one event per chunk, optionally slow; remembers whether the client closed it."""

    def __init__(self, events: list[dict[str, Any]], delay_s: float = 0.0, break_after: int | None = None) -> None:
        self.events = events
        self.delay_s = delay_s
        self.break_after = break_after
        self.closed = False
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            if self.break_after is not None and self.sent >= self.break_after:
                raise httpx2.ReadError("connection reset by peer")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.sent += 1
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.closed = True


class FakeUpstream:
    """A vLLM-style /v1 server: every sample is `text`, streamed one character (token) per chunk."""

    def __init__(self, url: str, text: str = "42!", *, vllm: bool = True) -> None:
        self.url = url
        self.text = text
        self.vllm = vllm
        self.down = False
        self.status: int | None = None  # answer every completion with this error status
        self.delay_s = 0.0
        self.break_after: int | None = None
        self.bodies: list[dict[str, Any]] = []
        self.streams: list[SSEStream] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        if self.down:
            raise httpx2.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/models"):
            card = {"id": MODEL, "object": "model"} | ({"max_model_len": 2048} if self.vllm else {})
            return httpx2.Response(200, json={"object": "list", "data": [card]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.status is not None:
            error = {"message": "no such thing", "type": "BadRequestError", "code": self.status}
            return httpx2.Response(self.status, json={"error": error})
        stream = SSEStream(self.events(body), self.delay_s, self.break_after)
        self.streams.append(stream)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)

    def events(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        tracked = body.get("logprob_token_ids") or []
        events = []
        for index in range(body.get("n", 1)):
            for position, char in enumerate(self.text):
                last = position == len(self.text) - 1
                token = ord(char)
                top = {f"token_id:{t}": -1.0 for t in tracked} | {f"token_id:{token}": -0.5}
                choice: dict[str, Any] = {
                    "index": index,
                    "text": char,
                    "finish_reason": "stop" if last else None,
                    "logprobs": {"tokens": [char], "token_logprobs": [-0.5], "top_logprobs": [top], "text_offset": [0]},
                }
                if self.vllm:
                    choice["token_ids"] = [token]
                events.append(
                    {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL, "choices": [choice]}
                )
        return events


def upstream_for(fake: FakeUpstream) -> Upstream:
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle))
    client = openai.AsyncOpenAI(base_url=fake.url, api_key="x", max_retries=0, http_client=http)
    return Upstream(fake.url, client)


def remote_engine(fakes: list[FakeUpstream], clock: FakeClock | None = None, kind: str = "vllm") -> RemoteEngine:
    router = UpstreamRouter([upstream_for(f) for f in fakes], clock=clock or FakeClock())
    return RemoteEngine(
        router,
        model_name=MODEL,
        upstream_model=MODEL,
        max_model_len=2048,
        kind=kind,  # type: ignore[arg-type]
        decode=RENDERER.decode,
        encode=RENDERER.encode,
    )


# ---------------------------------------------------------------------------------------------- pure parts
def test_calls_of_one_request_share_a_sticky_key():
    assert sticky_key("tr-0123abcd-sample-1") == sticky_key("tr-0123abcd-judge-17") == "tr-0123abcd"
    assert sticky_key("tr-0123abcd-continue-3") == "tr-0123abcd"
    assert sticky_key("plain") == "plain"


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_seconds(k, 1.0, 10.0) for k in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_least_loaded_prefers_live_upstreams_then_rotates_ties():
    a, b, c = (Upstream(url, client=None) for url in "abc")  # type: ignore[arg-type]
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 1
    b.picks = 5
    assert least_loaded([a, b, c], now=0.0) is c  # equal load: the less-picked one
    c.down, c.retry_at = True, 10.0
    assert least_loaded([a, b, c], now=0.0) is b
    a.down = b.down = True
    a.retry_at, b.retry_at = 5.0, 20.0
    assert least_loaded([a, b, c], now=0.0) is None
    assert least_loaded([a, b, c], now=6.0) is a  # its backoff ran out: a trial call


def test_a_vllm_body_carries_token_ids_and_vllms_fields_but_never_a_seed():
    options = SamplingOptions(
        max_tokens=8,
        temperature=0.5,
        stop=("\n\n",),
        stop_token_ids=(7,),
        include_stop_str_in_output=True,
        logit_bias=((5, -3.0),),
        logprob_token_ids=(250, 252),
    )
    body = completion_body([1, 2, 3], options, 4, model=MODEL, kind="vllm", masked_ids=(300,))
    assert body["prompt"] == [1, 2, 3] and body["n"] == 4 and body["logprobs"] == 2
    assert body["logit_bias"] == {"5": -3.0, "300": -100.0}
    extra = body["extra_body"]
    assert extra["logprob_token_ids"] == [250, 252] and extra["stop_token_ids"] == [7]
    assert extra["include_stop_str_in_output"] and extra["return_token_ids"] and extra["return_tokens_as_token_ids"]
    assert "seed" not in json.dumps(body)


def test_a_plain_body_sends_text_and_only_the_changed_extras():
    body = completion_body([104, 105], OPTIONS, 1, model=MODEL, kind="openai", decode=RENDERER.decode)
    assert body["prompt"] == "hi" and "extra_body" not in body


@pytest.mark.parametrize("kind", ["vllm", "openai"])
def test_log_probs_nobody_reads_are_not_asked_for(kind):
    unread = OPTIONS.replace(logprobs=False)
    body = completion_body([104, 105], unread, 1, model=MODEL, kind=kind, decode=RENDERER.decode)
    assert "logprobs" not in body
    assert "logprobs" in completion_body([104, 105], OPTIONS, 1, model=MODEL, kind=kind, decode=RENDERER.decode)


def test_the_model_card_tells_vllm_from_a_plain_upstream():
    assert read_model_card({"data": [{"id": "m", "max_model_len": 1024}]}).kind == "vllm"
    info = read_model_card({"data": [{"id": "a"}, {"id": "b"}]}, wanted="b")
    assert (info.model, info.max_model_len, info.kind) == ("b", None, "openai")


# ---------------------------------------------------------------------------------------------- the engine
async def test_generate_assembles_samples_from_the_stream():
    fake = FakeUpstream("http://a/v1", "42!")
    engine = remote_engine([fake])
    heard: list[int] = []
    options = OPTIONS.replace(logprob_token_ids=(250,))
    generations = await engine.generate([1, 2], options, 2, "tr-x-sample-1", on_tokens=heard.append)
    assert [g.text for g in generations] == ["42!", "42!"]
    assert generations[0].token_ids == (52, 50, 33) and generations[0].finish_reason == "stop"
    assert generations[0].cumulative_logprob == pytest.approx(-1.5)
    assert generations[0].tracked_logprobs == ({250: -1.0},) * 3
    assert sum(heard) == 6
    assert fake.bodies[0]["prompt"] == [1, 2] and "seed" not in fake.bodies[0]
    await engine.shutdown()


async def test_stream_yields_deltas_and_finishes():
    engine = remote_engine([FakeUpstream("http://a/v1", "ok")])
    deltas = [d async for batch in engine.stream([1], OPTIONS, 1, "tr-x-stream-1") for d in batch]
    assert "".join(d.text for d in deltas) == "ok" and deltas[-1].finish_reason == "stop"
    await engine.shutdown()


async def test_a_new_request_goes_to_the_least_loaded_upstream_and_its_calls_stay_there():
    a, b = FakeUpstream("http://a/v1"), FakeUpstream("http://b/v1")
    a.delay_s = 0.05
    engine = remote_engine([a, b])
    slow = asyncio.create_task(engine.generate([1], OPTIONS, 1, "tr-first-sample-1"))
    await asyncio.sleep(0.02)  # the first request is in flight on a
    assert [u.in_flight for u in engine.router.upstreams] == [1, 0]
    await engine.generate([1], OPTIONS, 1, "tr-second-sample-1")
    assert (len(a.bodies), len(b.bodies)) == (1, 1)
    # The first request's later calls stay on a, although a is busier.
    await engine.generate([1], OPTIONS, 1, "tr-first-judge-2")
    await slow
    assert (len(a.bodies), len(b.bodies)) == (2, 1)
    assert [u.in_flight for u in engine.router.upstreams] == [0, 0]
    await engine.shutdown()


async def test_best_of_n_is_one_upstream_call_with_n():
    a, b = FakeUpstream("http://a/v1"), FakeUpstream("http://b/v1")
    engine = remote_engine([a, b])
    await engine.generate([1], OPTIONS, 8, "tr-bon-sample-1")
    assert [len(a.bodies), len(b.bodies)] == [1, 0] and a.bodies[0]["n"] == 8
    await engine.shutdown()


async def test_a_dead_upstream_is_taken_out_the_call_fails_over_and_it_comes_back_after_backoff():
    clock = FakeClock()
    a, b = FakeUpstream("http://a/v1"), FakeUpstream("http://b/v1")
    a.down = True
    engine = remote_engine([a, b], clock)
    (generation,) = await engine.generate([1], OPTIONS, 1, "tr-r-sample-1")
    assert generation.text == "42!" and len(b.bodies) == 1
    first = engine.router.upstreams[0]
    assert first.down and first.failures == 1 and first.retry_at == clock.now + 1.0
    await engine.generate([1], OPTIONS, 1, "tr-s-sample-1")  # new requests avoid it meanwhile
    assert len(b.bodies) == 2
    clock.now += 1.0
    await engine.check_health()  # probe due, still down: the backoff doubles
    assert first.down and first.failures == 2 and first.retry_at == clock.now + 2.0
    a.down = False
    clock.now += 2.0
    await engine.check_health()
    assert not first.down and first.failures == 0
    assert engine.health_details()["upstreams"][0]["state"] == "up"
    await engine.shutdown()


async def test_a_background_probe_brings_a_taken_out_upstream_back_without_health_checks():
    clock = FakeClock()
    a, b = FakeUpstream("http://a/v1"), FakeUpstream("http://b/v1")
    a.down = True
    engine = remote_engine([a, b], clock)
    await engine.generate([1], OPTIONS, 1, "tr-q-sample-1")
    first = engine.router.upstreams[0]
    assert first.down
    a.down = False
    clock.now += 1.0  # its backoff ran out
    for _ in range(60):
        if not first.down:
            break
        await asyncio.sleep(0.05)
    assert not first.down
    await engine.shutdown()


async def test_all_upstreams_down_is_engine_dead():
    a = FakeUpstream("http://a/v1")
    a.down = True
    engine = remote_engine([a])
    with pytest.raises(EngineDeadError, match="no upstream"):
        await engine.generate([1], OPTIONS, 1, "tr-d-sample-1")
    with pytest.raises(EngineDeadError, match="http://a/v1 down"):
        await engine.check_health()
    await engine.shutdown()


async def test_an_upstream_that_breaks_off_mid_stream_is_an_upstream_error():
    a = FakeUpstream("http://a/v1", "long answer")
    a.break_after = 3
    engine = remote_engine([a])
    with pytest.raises(UpstreamError, match="broke off"):
        await engine.generate([1], OPTIONS, 1, "tr-b-sample-1")
    assert engine.router.upstreams[0].down  # a reset connection takes it out
    await engine.shutdown()


async def test_cancelling_a_call_closes_the_upstream_stream():
    a = FakeUpstream("http://a/v1", "x" * 50)
    a.delay_s = 0.02
    engine = remote_engine([a])
    task = asyncio.create_task(engine.generate([1], OPTIONS, 1, "tr-c-sample-1"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (stream,) = a.streams
    assert stream.closed and stream.sent < 50
    assert engine.router.upstreams[0].in_flight == 0
    await engine.shutdown()


async def test_closing_a_stream_early_closes_the_upstream_stream():
    a = FakeUpstream("http://a/v1", "x" * 50)
    engine = remote_engine([a])
    stream = engine.stream([1], OPTIONS, 1, "tr-c-stream-1")
    await anext(stream)
    await stream.aclose()
    assert a.streams[0].closed and a.streams[0].sent < 50
    await engine.shutdown()


async def test_abort_closes_the_named_calls_stream():
    a = FakeUpstream("http://a/v1", "x" * 50)
    a.delay_s = 0.02
    engine = remote_engine([a])
    task = asyncio.create_task(engine.generate([1], OPTIONS, 1, "tr-ab-sample-1"))
    await asyncio.sleep(0.1)
    await engine.abort(["tr-ab-sample-1"])
    (generation,) = await asyncio.wait_for(task, 2)
    assert generation.finish_reason == "abort" and generation.num_tokens < 50
    assert a.streams[0].closed and not engine.router.upstreams[0].down
    await engine.shutdown()


async def test_a_plain_upstream_takes_text_and_tokens_are_counted_locally():
    a = FakeUpstream("http://a/v1", "42", vllm=False)
    engine = remote_engine([a], kind="openai")
    (generation,) = await engine.generate(RENDERER.encode("hi"), OPTIONS, 1, "tr-p-sample-1")
    assert a.bodies[0]["prompt"] == "hi" and generation.token_ids == (52, 50)
    assert engine.introspection is None and "token_ids" not in engine.capabilities
    await engine.shutdown()


# ---------------------------------------------------------------------------------------------- through the app
@contextmanager
def serve(tmp_path: Path, fakes: list[FakeUpstream], kind: str = "vllm") -> Iterator[TestClient]:
    settings = ServerSettings(
        model_path="unused", served_model_name=MODEL, trace_dir=tmp_path / "traces", trace_flush_interval_s=0.01
    )
    with TestClient(create_app(settings, lambda: remote_engine(fakes, kind=kind), CharRenderer)) as client:
        yield client


def chat(client: TestClient, strategy: dict[str, Any] | None = None):
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "6*7?"}], "max_tokens": 16}
    if strategy is not None:
        body["strategy"] = strategy
    return client.post("/v1/chat/completions", json=body)


def test_usage_of_best_of_n_matches_the_upstream_tokens(tmp_path):
    a = FakeUpstream("http://a/v1", "42!")
    with serve(tmp_path, [a]) as client:
        response = chat(client, {"name": "best_of_n", "n": 4})
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["completion_tokens"] == 12 and usage["completion_tokens_details"]["reasoning_tokens"] == 9
        assert len(a.bodies) == 1 and a.bodies[0]["n"] == 4
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["upstreams"][0]["state"] == "up"


def test_a_refused_upstream_call_is_a_502_and_no_upstream_a_503(tmp_path):
    a = FakeUpstream("http://a/v1")
    with serve(tmp_path, [a]) as client:
        a.status = 400
        response = chat(client)
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "upstream_error" and error["type"] == "server_error" and "400" in error["message"]
        a.status, a.down = None, True
        response = chat(client)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
        health = client.get("/health")
        assert health.status_code == 503 and "http://a/v1 down" in health.json()["error"]["message"]


def test_a_plain_upstream_refuses_token_id_and_logprob_features_and_serves_the_rest(tmp_path):
    a = FakeUpstream("http://a/v1", "42", vllm=False)
    with serve(tmp_path, [a], kind="openai") as client:
        response = chat(client, {"name": "tree_search"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "unsupported_by_upstream"
        assert "token_ids" in response.json()["error"]["message"]
        response = chat(client, {"name": "best_of_n", "n": 2, "verifier": "self_judge"})
        assert response.status_code == 400 and "tracked_logprobs" in response.json()["error"]["message"]
        for strategy in ({"name": "single"}, {"name": "best_of_n", "n": 2}, {"name": "self_consistency", "n": 2}):
            response = chat(client, strategy)
            assert response.status_code == 200, (strategy, response.text)
            assert response.json()["choices"][0]["message"]["content"] == "42"
        assert all("seed" not in body for body in a.bodies)
