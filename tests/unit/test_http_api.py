"""The HTTP layer end to end, with a scripted engine and a toy tokenizer: shapes, headers, errors, streams, metrics
and traces."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.engine import EngineDeadError, SamplingOptions
from server.settings import ServerSettings
from server.strategy_selection import REASONING_EFFORT_PRESETS
from server.trace_journal import read_records
from strategies import STRATEGIES
from tests.fakes import CharRenderer, ScriptedEngine
from verifiers import VERIFIERS

RENDERER = CharRenderer()
MODEL = "toy"
QUESTION = "What is 6 * 7?"
MESSAGES = [{"role": "user", "content": QUESTION}]
CHAT = {"model": MODEL, "messages": MESSAGES}
COMPLETION = {"model": MODEL, "prompt": "Q: What is 6 * 7?\nA:", "max_tokens": 32}
# Sample i of every sampling call is TEXTS[i % 5], so calls are repeatable; a judge's P(yes) for each of them.
TEXTS = ["The answer is 42.", "It is 41", "#### 42", "So 6*7 = 42", "No idea"]
JUDGE_P_YES = dict(zip(TEXTS, [0.3, 0.9, 0.5, 0.6, 0.1]))
PROMPT_TOKENS = len(RENDERER.chat_ids(MESSAGES))
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def scripted(prompt_ids, options, n, request_id):
    return [TEXTS[i % len(TEXTS)] for i in range(n)]


def judge(prompt_text: str) -> float:
    return JUDGE_P_YES[prompt_text.split("Proposed answer: ", 1)[1].split("\n\nIs the proposed", 1)[0]]


def tokens(text: str) -> int:
    return len(RENDERER.encode(text))


@contextmanager
def serve(tmp_path: Path, engine: ScriptedEngine | None = None, **settings: Any) -> Iterator[TestClient]:
    engine = engine if engine is not None else ScriptedEngine(script=scripted, judge=judge)
    settings.setdefault("trace_flush_interval_s", 0.01)
    config = ServerSettings(model_path="unused", served_model_name=MODEL, trace_dir=tmp_path / "traces", **settings)
    with TestClient(create_app(config, lambda: engine, CharRenderer)) as client:
        client.engine = engine  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One server for the tests that need no settings of their own (starting one costs more than a request)."""
    with serve(tmp_path_factory.mktemp("shared")) as client:
        yield client


@pytest.fixture
def client(shared_client: TestClient) -> TestClient:
    shared_client.engine.reset()
    shared_client.engine.script = scripted
    return shared_client


def chat(client: TestClient, headers: dict[str, str] | None = None, **changes: Any):
    return client.post("/v1/chat/completions", json=CHAT | changes, headers=headers)


def trace_of(client: TestClient, response) -> dict[str, Any]:
    reply = client.get(f"/v1/traces/{response.headers['X-Trace-Id']}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def assert_openai_error(response, status: int, *, param: str | None, code: str | None = None, says: str = ""):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    expected_type = {
        400: "invalid_request_error",
        404: "not_found_error",
        405: "invalid_request_error",
        500: "server_error",
        503: "service_unavailable_error",
        504: "server_error",
    }[status]
    assert body["error"]["type"] == expected_type
    assert body["error"]["param"] == param
    assert body["error"]["code"] == code
    assert says in body["error"]["message"]
    return body["error"]


def parse_sse(text: str) -> tuple[list[Any], list[str]]:
    """The data payloads (JSON, or the string "[DONE]") and the comment lines of an SSE body."""
    assert text.endswith("\n\n")
    events, comments = [], []
    for block in text.split("\n\n")[:-1]:
        assert "\n" not in block, f"one line per event: {block!r}"
        if block.startswith(":"):
            comments.append(block)
            continue
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events, comments


def stream_text(events: list[Any], index: int = 0) -> str:
    parts = []
    for event in events:
        if isinstance(event, dict):
            for choice in event.get("choices", []):
                if choice["index"] == index:
                    parts.append(choice["delta"].get("content", "") if "delta" in choice else choice["text"])
    return "".join(parts)


def metric_samples(client: TestClient) -> dict[tuple[str, frozenset], float]:
    text = client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ----------------------------------------------------------------------------------------------- JSON responses
def test_chat_completion_shape_headers_and_usage(client):
    response = chat(client, headers={"X-Request-Id": "client-req-7"})
    assert response.status_code == 200, response.text
    body = response.json()
    trace_id = response.headers["X-Trace-Id"]
    assert trace_id.startswith("tr-") and len(trace_id) == 27
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert body["id"] == "chatcmpl-" + trace_id.removeprefix("tr-")
    assert (body["object"], body["model"]) == ("chat.completion", MODEL)
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": TEXTS[0]}, "finish_reason": "stop", "logprobs": None}
    ]
    n_tokens = tokens(TEXTS[0])
    assert body["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": n_tokens,
        "total_tokens": PROMPT_TOKENS + n_tokens,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert response.headers["X-Strategy"] == "single"
    assert response.headers["X-Samples"] == "1"
    assert response.headers["X-Generated-Tokens"] == str(n_tokens)
    assert response.headers["X-Request-Id"] == "client-req-7"
    (call,) = client.engine.calls
    assert call.prompt_text == f"user: {QUESTION}\nassistant: "
    assert call.request_id.startswith(trace_id)  # engine ids come from the trace id, not the client's
    assert trace_of(client, response)["request_id"] == "client-req-7"


def test_without_a_request_id_the_trace_id_is_echoed(client):
    response = chat(client)
    assert response.headers["X-Request-Id"] == response.headers["X-Trace-Id"]


def test_completion_shape(client):
    response = client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "cmpl-" + response.headers["X-Trace-Id"].removeprefix("tr-")
    assert (body["object"], body["model"]) == ("text_completion", MODEL)
    assert body["choices"] == [{"index": 0, "text": TEXTS[0], "finish_reason": "stop", "logprobs": None}]
    prompt_tokens = tokens(COMPLETION["prompt"])
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == tokens(TEXTS[0])
    (call,) = client.engine.calls
    assert call.prompt_text == COMPLETION["prompt"]
    assert call.options.max_tokens == 32


def test_completion_defaults_to_16_tokens_and_reports_a_cut_sample_as_length(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "Q:"})
    assert response.status_code == 200, response.text
    assert client.engine.calls[0].options.max_tokens == 16
    assert response.json()["choices"][0] == {
        "index": 0,
        "text": TEXTS[0][:16],
        "finish_reason": "length",
        "logprobs": None,
    }


def test_completion_accepts_token_ids(client):
    ids = RENDERER.encode("Q: hi\nA:")
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 8})
    assert response.status_code == 200, response.text
    assert client.engine.calls[0].prompt_ids == tuple(ids)


def test_chat_content_parts_are_joined(client):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "6 * 7?"}]
    response = chat(client, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}])
    assert response.status_code == 200, response.text
    assert client.engine.calls[0].prompt_text == "system: Be brief.\nuser: What is 6 * 7?\nassistant: "


def test_chat_n_returns_n_choices_with_single(client):
    response = chat(client, n=3)
    assert response.status_code == 200, response.text
    assert [c["message"]["content"] for c in response.json()["choices"]] == TEXTS[:3]
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2]
    assert response.headers["X-Samples"] == "3"
    assert response.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.parametrize(
    ("strategy", "options", "expected_text"),
    [
        ("best_of_n", {"n": 4, "verifier": "logprob"}, TEXTS[0]),  # equal confidence: the first
        ("self_consistency", {"n": 5}, TEXTS[0]),  # "42" has 3 votes
        ("best_of_n", {"n": 3, "verifier": "self_judge"}, TEXTS[1]),  # the judge likes "It is 41" best
    ],
)
def test_search_usage_counts_every_generated_token(client, strategy, options, expected_text):
    response = chat(client, strategy={"name": strategy, **options})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == expected_text
    trace = trace_of(client, response)
    n = options["n"]
    judge_tokens = n if options.get("verifier") == "self_judge" else 0
    generated = sum(tokens(t) for t in TEXTS[:n]) + judge_tokens
    assert body["usage"]["completion_tokens"] == generated
    assert int(response.headers["X-Generated-Tokens"]) == generated
    assert sum(c["generated_tokens"] for c in trace["engine_calls"]) == generated
    assert client.engine.generated_tokens == generated
    returned = tokens(expected_text)
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == generated - returned
    assert body["usage"]["total_tokens"] == PROMPT_TOKENS + generated
    assert response.headers["X-Samples"] == str(n)  # judge calls are not samples
    assert trace["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": generated,
        "returned_tokens": returned,
        "reasoning_tokens": generated - returned,
    }


# ----------------------------------------------------------------------------------------------- choosing a strategy
def test_the_judge_sees_the_last_user_message_as_the_question(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": QUESTION},
    ]
    response = chat(client, messages=messages, strategy={"name": "best_of_n", "n": 2, "verifier": "self_judge"})
    assert response.status_code == 200, response.text
    judge_prompts = [c.prompt_text for c in client.engine.calls if c.is_judge]
    assert len(judge_prompts) == 2
    assert all(p.startswith(f"user: Question: {QUESTION}\n\nProposed answer: ") for p in judge_prompts)


def test_the_header_strategy_wins_over_the_body(client):
    response = chat(
        client,
        headers={"X-Strategy": "self_consistency", "X-Strategy-Options": '{"n": 3}'},
        strategy={"name": "best_of_n", "n": 2},
        reasoning_effort="high",
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Strategy"] == "self_consistency"
    assert response.headers["X-Samples"] == "3"
    assert trace_of(client, response)["strategy"] == {
        "name": "self_consistency",
        "options": {"n": 3, "temperature": None, "tie_break": "logprob"},
        "source": "header",
    }


@pytest.mark.parametrize(
    ("strategy", "name", "samples"),
    [("best_of_n", "best_of_n", 4), ({"name": "best_of_n", "n": 2}, "best_of_n", 2), ("single", "single", 1)],
)
def test_the_body_strategy_as_a_name_or_an_object(client, strategy, name, samples):
    response = chat(client, strategy=strategy, reasoning_effort="high")  # the body wins over the effort
    assert response.status_code == 200, response.text
    assert (response.headers["X-Strategy"], response.headers["X-Samples"]) == (name, str(samples))
    trace = trace_of(client, response)
    assert trace["strategy"]["source"] == "body"
    assert trace["strategy"]["name"] == name


@pytest.mark.parametrize("effort", sorted(REASONING_EFFORT_PRESETS))
def test_reasoning_effort_maps_to_its_preset(client, effort):
    name, options = REASONING_EFFORT_PRESETS[effort]
    response = chat(client, reasoning_effort=effort)
    assert response.status_code == 200, response.text
    assert response.headers["X-Strategy"] == name
    assert response.headers["X-Samples"] == str(options.get("n", 1))
    trace = trace_of(client, response)
    assert trace["strategy"]["source"] == "reasoning_effort"
    assert {k: trace["strategy"]["options"][k] for k in options} == options


def test_reasoning_effort_presets_are_as_documented():
    assert REASONING_EFFORT_PRESETS == {
        "minimal": ("single", {}),
        "low": ("single", {}),
        "medium": ("self_consistency", {"n": 4}),
        "high": ("self_consistency", {"n": 8}),
    }


def test_a_reasoning_effort_preset_is_cut_to_the_servers_cap(tmp_path):
    with serve(tmp_path, max_samples_per_request=3) as client:
        response = chat(client, reasoning_effort="high")
        assert response.status_code == 200, response.text
        assert (response.headers["X-Strategy"], response.headers["X-Samples"]) == ("self_consistency", "3")


def test_the_default_strategy_is_the_settings_one(tmp_path):
    with serve(tmp_path, default_strategy="best_of_n") as client:
        response = chat(client)
        assert response.status_code == 200, response.text
        assert (response.headers["X-Strategy"], response.headers["X-Samples"]) == ("best_of_n", "4")
        assert trace_of(client, response)["strategy"]["source"] == "default"


def test_the_stock_default_is_single(client):
    response = chat(client)
    assert response.headers["X-Strategy"] == "single"
    assert trace_of(client, response)["strategy"] == {"name": "single", "options": {}, "source": "default"}


def test_the_search_samples_at_0_8_when_the_request_is_greedy(client):
    response = chat(client, temperature=0, strategy="best_of_n")
    assert response.status_code == 200, response.text
    assert [c.options.temperature for c in client.engine.calls] == [0.8]
    assert trace_of(client, response)["sampling"]["temperature"] == 0.0


# ----------------------------------------------------------------------------------------------- errors
# (name, endpoint, body, headers, status, param, code, part of the message)
BAD_REQUESTS = [
    ("unknown model", "chat", CHAT | {"model": "gpt-9"}, {}, 404, "model", "model_not_found", "'gpt-9' does not"),
    (
        "unknown body strategy",
        "chat",
        CHAT | {"strategy": "beam"},
        {},
        400,
        "strategy",
        "unknown_strategy",
        f"unknown strategy 'beam'; valid: {', '.join(sorted(STRATEGIES))}",
    ),
    (
        "unknown header strategy",
        "chat",
        CHAT,
        {"X-Strategy": "beam"},
        400,
        "X-Strategy",
        "unknown_strategy",
        f"valid: {', '.join(sorted(STRATEGIES))}",
    ),
    (
        "unknown option",
        "chat",
        CHAT | {"strategy": {"name": "best_of_n", "nn": 3}},
        {},
        400,
        "strategy.nn",
        None,
        "bad option for strategy 'best_of_n': nn:",
    ),
    (
        "unknown header option",
        "chat",
        CHAT,
        {"X-Strategy": "self_consistency", "X-Strategy-Options": '{"tie_breaker": "logprob"}'},
        400,
        "X-Strategy-Options.tie_breaker",
        None,
        "its options: n, temperature, tie_break",
    ),
    (
        "option n over the cap",
        "chat",
        CHAT | {"strategy": {"name": "self_consistency", "n": 9}},
        {},
        400,
        "strategy.n",
        None,
        "n=9 is over this server's cap of 8 samples per request",
    ),
    (
        "option of the wrong type",
        "chat",
        CHAT | {"strategy": {"name": "best_of_n", "n": "many"}},
        {},
        400,
        "strategy.n",
        None,
        "bad option",
    ),
    (
        "unknown verifier",
        "chat",
        CHAT | {"strategy": {"name": "best_of_n", "verifier": "oracle"}},
        {},
        400,
        "strategy.verifier",
        None,
        f"unknown verifier 'oracle'; valid: {', '.join(sorted(VERIFIERS))}",
    ),
    (
        "reference verifier without a reference",
        "chat",
        CHAT | {"strategy": {"name": "best_of_n", "verifier": "reference"}},
        {},
        400,
        "strategy.verifier",
        None,
        "needs a reference answer",
    ),
    (
        "strategy object without a name",
        "chat",
        CHAT | {"strategy": {"n": 3}},
        {},
        400,
        "strategy",
        None,
        'a name or an object with a "name"',
    ),
    (
        "bad X-Strategy-Options JSON",
        "chat",
        CHAT,
        {"X-Strategy": "best_of_n", "X-Strategy-Options": "{n: 3}"},
        400,
        "X-Strategy-Options",
        None,
        "X-Strategy-Options is not valid JSON",
    ),
    (
        "X-Strategy-Options not an object",
        "chat",
        CHAT,
        {"X-Strategy": "best_of_n", "X-Strategy-Options": "[3]"},
        400,
        "X-Strategy-Options",
        None,
        "must be a JSON object",
    ),
    (
        "X-Strategy-Options without X-Strategy",
        "chat",
        CHAT,
        {"X-Strategy-Options": '{"n": 3}'},
        400,
        "X-Strategy-Options",
        None,
        "needs an X-Strategy header",
    ),
    ("body is a list", "chat", [], {}, 400, None, "invalid_body", "the request body must be a JSON object"),
    ("body is a string", "chat", "x", {}, 400, None, "invalid_body", "the request body must be a JSON object"),
    ("body is a number", "completions", 7, {}, 400, None, "invalid_body", "the request body must be a JSON object"),
    ("missing messages", "chat", {"model": MODEL}, {}, 400, "messages", None, "messages: Field required"),
    ("empty messages", "chat", CHAT | {"messages": []}, {}, 400, "messages", None, "messages:"),
    (
        "bad role",
        "chat",
        CHAT | {"messages": [{"role": "robot", "content": "hi"}]},
        {},
        400,
        "messages.0.role",
        None,
        "",
    ),
    ("missing model", "chat", {"messages": MESSAGES}, {}, 400, "model", None, "model: Field required"),
    (
        "n>1 with best_of_n",
        "chat",
        CHAT | {"n": 2},
        {"X-Strategy": "best_of_n"},
        400,
        "n",
        None,
        "strategy 'best_of_n' returns one answer: ask with n=1",
    ),
    ("n over the cap", "chat", CHAT | {"n": 9}, {}, 400, "n", None, "n=9 is over this server's cap of 8"),
    ("n of 0", "chat", CHAT | {"n": 0}, {}, 400, "n", None, ""),
    (
        "max_tokens over the cap",
        "chat",
        CHAT | {"max_tokens": 100},
        {},
        400,
        "max_tokens",
        None,
        "max_tokens=100 is over this server's cap of 64",
    ),
    (
        "max_completion_tokens over the cap",
        "chat",
        CHAT | {"max_completion_tokens": 65},
        {},
        400,
        "max_tokens",
        None,
        "max_tokens=65 is over this server's cap of 64",
    ),
    (
        "max_tokens past the context",
        "chat",
        CHAT | {"messages": [{"role": "user", "content": "x" * 150}], "max_tokens": 64},
        {},
        400,
        "max_tokens",
        "context_length_exceeded",
        "this model's context is 200 tokens: 168 prompt tokens leave room for 32, but max_tokens=64",
    ),
    (
        "chat prompt longer than the context",
        "chat",
        CHAT | {"messages": [{"role": "user", "content": "x" * 300}]},
        {},
        400,
        "messages",
        "context_length_exceeded",
        "the prompt is 318 tokens, and this model's context is 200 tokens",
    ),
    (
        "completion prompt longer than the context",
        "completions",
        COMPLETION | {"prompt": "x" * 300},
        {},
        400,
        "prompt",
        "context_length_exceeded",
        "the prompt is 300 tokens, and this model's context is 200 tokens",
    ),
    ("logprobs", "chat", CHAT | {"logprobs": True}, {}, 400, "logprobs", None, "logprobs are not supported"),
    ("top_logprobs", "chat", CHAT | {"top_logprobs": 2}, {}, 400, "logprobs", None, "logprobs are not supported"),
    (
        "tools",
        "chat",
        CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {},
        400,
        "tools",
        None,
        "tool calling is not supported",
    ),
    (
        "json response_format",
        "chat",
        CHAT | {"response_format": {"type": "json_object"}},
        {},
        400,
        "response_format",
        None,
        "only response_format type 'text'",
    ),
    ("completions echo", "completions", COMPLETION | {"echo": True}, {}, 400, "echo", None, "echo is not supported"),
    ("completions logprobs", "completions", COMPLETION | {"logprobs": 1}, {}, 400, "logprobs", None, "logprobs"),
    ("completions suffix", "completions", COMPLETION | {"suffix": "!"}, {}, 400, "suffix", None, "suffix"),
    ("completions best_of", "completions", COMPLETION | {"best_of": 3}, {}, 400, "best_of", None, "X-Strategy"),
    (
        "batched prompts",
        "completions",
        COMPLETION | {"prompt": ["a", "b"]},
        {},
        400,
        "prompt",
        None,
        "send one prompt per request",
    ),
    ("empty prompt", "completions", COMPLETION | {"prompt": ""}, {}, 400, "prompt", None, "the prompt is empty"),
    (
        "token ids outside the vocabulary",
        "completions",
        COMPLETION | {"prompt": [65, 256]},
        {},
        400,
        "prompt",
        None,
        "inside the vocabulary",
    ),
    (
        "logit_bias key not an id",
        "chat",
        CHAT | {"logit_bias": {"abc": 1}},
        {},
        400,
        "logit_bias",
        None,
        "logit_bias keys must be token ids, got 'abc'",
    ),
    (
        "logit_bias id outside the vocabulary",
        "chat",
        CHAT | {"logit_bias": {"256": 1}},
        {},
        400,
        "logit_bias",
        None,
        "token id 256 is outside the vocabulary",
    ),
    (
        "logit_bias value out of range",
        "chat",
        CHAT | {"logit_bias": {"65": 101}},
        {},
        400,
        "logit_bias",
        None,
        "[-100, 100]",
    ),
    (
        "a stream that cannot start",
        "chat",
        CHAT | {"stream": True, "strategy": "beam"},
        {},
        400,
        "strategy",
        "unknown_strategy",
        "unknown strategy 'beam'",
    ),
    ("temperature out of range", "chat", CHAT | {"temperature": 2.5}, {}, 400, "temperature", None, "temperature:"),
    ("unknown effort", "chat", CHAT | {"reasoning_effort": "max"}, {}, 400, "reasoning_effort", None, ""),
]

XFAIL_BAD_REQUESTS: dict[str, str] = {}  # id -> reason, for bad requests the server still gets wrong


def bad_request_params() -> list:
    params = []
    for case in BAD_REQUESTS:
        marks = []
        if case[0] in XFAIL_BAD_REQUESTS:
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL_BAD_REQUESTS[case[0]])]
        params.append(pytest.param(*case[1:], id=case[0], marks=marks))
    return params


@pytest.fixture(scope="module")
def shared_small_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A server with a 200-token context, 8 samples and 64 tokens per request at most."""
    engine = ScriptedEngine(script=scripted, max_model_len=200)
    with serve(tmp_path_factory.mktemp("small"), engine, max_samples_per_request=8, max_tokens_cap=64) as client:
        yield client


@pytest.fixture
def small_client(shared_small_client: TestClient) -> TestClient:
    shared_small_client.engine.reset()
    return shared_small_client


@pytest.mark.parametrize(("endpoint", "body", "headers", "status", "param", "code", "says"), bad_request_params())
def test_a_bad_request_is_an_openai_error_and_the_next_request_still_works(
    small_client, endpoint, body, headers, status, param, code, says
):
    response = small_client.post(PATHS[endpoint], json=body, headers=headers)
    assert_openai_error(response, status, param=param, code=code, says=says)
    assert small_client.engine.calls == []  # refused before any engine work

    good = (
        chat(small_client, max_tokens=16)
        if endpoint == "chat"
        else small_client.post("/v1/completions", json=COMPLETION)
    )
    assert good.status_code == 200, good.text
    assert len(small_client.engine.calls) == 1


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("{not json", id="invalid JSON"),
        pytest.param("null", id="null"),
        pytest.param("", id="empty"),
        pytest.param("[]", id="list"),
        pytest.param('"x"', id="string"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400_not_a_422(client, raw):
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, param=None, code="invalid_body", says="the request body must be a JSON object")
    assert chat(client).status_code == 200


def test_a_bad_header_option_blames_the_options_header(client):
    response = chat(client, headers={"X-Strategy": "best_of_n", "X-Strategy-Options": '{"n": 99}'})
    assert_openai_error(response, 400, param="X-Strategy-Options.n", says="n=99 is over this server's cap of 16")


def test_a_strategy_failure_is_a_500_in_openai_shape(tmp_path):
    def boom(prompt_ids, options, n, request_id):
        raise RuntimeError("boom")

    with serve(tmp_path, ScriptedEngine(script=boom)) as client:
        response = chat(client, strategy="best_of_n")
        assert_openai_error(
            response, 500, param=None, code="strategy_failed", says="the strategy failed: RuntimeError: boom"
        )
        client.engine.script = scripted
        assert chat(client).status_code == 200
    records = list(read_records(tmp_path / "traces"))
    assert [(r["status"], r["chosen_index"], r["error"]) for r in records] == [
        ("error", None, "the strategy failed: RuntimeError: boom"),
        ("ok", 0, None),
    ]


def test_a_dead_engine_is_a_503_and_so_is_health(tmp_path):
    engine = ScriptedEngine(script=scripted)
    with serve(tmp_path, engine) as client:
        assert client.get("/health").json() == {"status": "ok"}
        engine.dead = True
        assert_openai_error(chat(client), 503, param=None, code="engine_dead", says="the scripted engine is dead")
        assert_openai_error(client.get("/health"), 503, param=None, code="engine_unavailable", says="engine")
    assert engine.is_shut_down


def test_a_request_past_its_deadline_is_a_504(tmp_path):
    with serve(tmp_path, ScriptedEngine(script=scripted, delay_s=2.0), request_timeout_s=0.05) as client:
        response = chat(client, strategy="best_of_n")
        assert_openai_error(
            response, 504, param=None, code="deadline_exceeded", says="the request's deadline passed while sampling"
        )
    (record,) = read_records(tmp_path / "traces")
    assert (record["status"], record["chosen_index"]) == ("error", None)


def test_unknown_routes_and_methods_are_openai_errors(client):
    assert_openai_error(client.get("/v1/nothing"), 404, param=None)
    assert_openai_error(client.get("/v1/chat/completions"), 405, param=None)


def test_an_engine_that_dies_mid_search_is_a_503(tmp_path):
    def dies(prompt_ids, options, n, request_id):
        raise EngineDeadError("core died")

    with serve(tmp_path, ScriptedEngine(script=dies)) as client:
        assert_openai_error(chat(client, strategy="self_consistency"), 503, param=None, code="engine_dead")


# ----------------------------------------------------------------------------------------------- streaming
def stream(client: TestClient, endpoint: str = "chat", headers: dict[str, str] | None = None, **changes: Any):
    body = (CHAT if endpoint == "chat" else COMPLETION) | {"stream": True} | changes
    response = client.post(PATHS[endpoint], json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response, *parse_sse(response.text)


def finish_reasons(events: list[Any]) -> list[tuple[int, str]]:
    return [
        (c["index"], c["finish_reason"])
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices", [])
        if c["finish_reason"] is not None
    ]


@pytest.mark.parametrize("strategy", ["single", "best_of_n", "self_consistency"])
def test_a_chat_stream_parses_and_matches_the_json_answer(client, strategy):
    response, events, comments = stream(client, strategy=strategy, headers={"X-Request-Id": "stream-req-1"})
    assert response.headers["X-Request-Id"] == "stream-req-1"
    assert comments == []
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    trace_hex = response.headers["X-Trace-Id"].removeprefix("tr-")
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-" + trace_hex for c in chunks)
    assert all(c["model"] == MODEL and "usage" not in c for c in chunks)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
    ]
    assert all("role" not in c["delta"] for chunk in chunks[1:] for c in chunk["choices"])
    assert finish_reasons(events) == [(0, "stop")]
    assert response.headers["X-Strategy"] == strategy
    assert "X-Samples" not in response.headers

    json_text = chat(client, strategy=strategy).json()["choices"][0]["message"]["content"]
    assert stream_text(events) == json_text == TEXTS[0]


def test_a_single_stream_sends_the_text_in_pieces(client):
    _, events, _ = stream(client)
    content_chunks = [e for e in events[1:-1] if e["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == 3
    assert finish_reasons(events) == [(0, "stop")]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_finish_reason_that_comes_without_text_is_still_sent(tmp_path):
    with serve(tmp_path, ScriptedEngine(script=scripted, finish_alone=True)) as client:
        _, events, _ = stream(client, n=2)
    assert sorted(finish_reasons(events)) == [(0, "stop"), (1, "stop")]
    assert [stream_text(events, i) for i in range(2)] == TEXTS[:2]
    last_of_0 = [e for e in events[:-1] if e["choices"][0]["index"] == 0][-1]
    assert last_of_0["choices"][0]["finish_reason"] == "stop"
    assert last_of_0["choices"][0]["delta"].get("content", "") == ""


def test_a_stream_with_n_choices_sends_each_role_and_finish_once(client):
    _, events, _ = stream(client, n=3)
    assert [c["index"] for c in events[0]["choices"]] == [0, 1, 2]
    assert all(c["delta"] == {"role": "assistant", "content": ""} for c in events[0]["choices"])
    assert sorted(finish_reasons(events)) == [(0, "stop"), (1, "stop"), (2, "stop")]
    assert [stream_text(events, i) for i in range(3)] == TEXTS[:3]


@pytest.mark.parametrize("strategy", ["single", "best_of_n"])
def test_a_completion_stream_has_no_role_chunk(client, strategy):
    _, events, _ = stream(client, "completions", strategy=strategy)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" and "delta" not in e["choices"][0] for e in events[:-1])
    assert finish_reasons(events) == [(0, "stop")]
    json_text = client.post("/v1/completions", json=COMPLETION | {"strategy": strategy}).json()["choices"][0]["text"]
    assert stream_text(events) == json_text == TEXTS[0]


@pytest.mark.parametrize(("strategy", "samples"), [("single", 1), ("self_consistency", 4)])
def test_the_usage_chunk_comes_only_with_include_usage(client, strategy, samples):
    _, events, _ = stream(client, strategy=strategy, stream_options={"include_usage": False})
    assert all("usage" not in e for e in events[:-1])

    response, events, _ = stream(client, strategy=strategy, stream_options={"include_usage": True})
    usage_chunks = [e for e in events[:-1] if "usage" in e]
    assert usage_chunks == [events[-2]]
    assert events[-2]["choices"] == []
    generated = sum(tokens(t) for t in TEXTS[:samples])
    assert events[-2]["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": generated,
        "total_tokens": PROMPT_TOKENS + generated,
        "completion_tokens_details": {"reasoning_tokens": generated - tokens(TEXTS[0])},
    }
    trace = trace_of(client, response)
    assert trace["usage"]["completion_tokens"] == generated
    assert sum(c["generated_tokens"] for c in trace["engine_calls"]) == generated
    assert [c["kind"] for c in trace["engine_calls"]] == ["stream" if strategy == "single" else "sample"]


def test_a_slow_search_stream_sends_heartbeats(tmp_path):
    engine = ScriptedEngine(script=scripted, delay_s=0.15)
    with serve(tmp_path, engine, heartbeat_interval_s=0.02) as client:
        response = client.post("/v1/chat/completions", json=CHAT | {"stream": True, "strategy": "best_of_n"})
    assert response.status_code == 200
    events, comments = parse_sse(response.text)
    assert len(comments) >= 2
    assert set(comments) == {": heartbeat"}
    # the heartbeats come while the search runs: after the role chunk, before the answer
    blocks = response.text.split("\n\n")
    assert blocks[1] == ": heartbeat"
    assert stream_text(events) == TEXTS[0]
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (
            RuntimeError("boom"),
            {
                "message": "the strategy failed: RuntimeError: boom",
                "type": "server_error",
                "param": None,
                "code": "strategy_failed",
            },
        ),
        (
            EngineDeadError("core died"),
            {"message": "core died", "type": "service_unavailable_error", "param": None, "code": "engine_dead"},
        ),
    ],
    ids=["strategy failure", "dead engine"],
)
@pytest.mark.parametrize("strategy", ["single", "self_consistency"])
def test_a_failure_in_a_stream_is_an_error_event(tmp_path, strategy, failure, error):
    def fail(prompt_ids, options, n, request_id):
        raise failure

    with serve(tmp_path, ScriptedEngine(script=fail)) as client:
        _, events, _ = stream(client, strategy=strategy)
        assert events[-1] == "[DONE]"
        assert events[-2] == {"error": error}
        assert finish_reasons(events) == []
        assert [e for e in events[:-1] if "error" in e] == [events[-2]]
        client.engine.script = scripted
        assert stream(client)[1][-1] == "[DONE]"
    records = list(read_records(tmp_path / "traces"))
    assert [(r["status"], r["error"]) for r in records] == [("error", error["message"]), ("ok", None)]


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_are_exposed(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "ponder_requests_total",
        "ponder_request_duration_seconds",
        "ponder_samples_per_request",
        "ponder_generated_tokens_total",
        "ponder_verifier_score",
        "ponder_requests_in_flight",
        "ponder_trace_write_errors_total",
        "ponder_feedback_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in response.text or f"# TYPE {name}" in response.text, name


class MetricsDelta:
    """How much each sample of /metrics moved since this object was made."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.before = metric_samples(client)
        self.after: dict[tuple[str, frozenset], float] = {}

    def __call__(self, name: str, **labels: str) -> float:
        self.after = metric_samples(self.client)
        return metric(self.after, name, **labels) - metric(self.before, name, **labels)


def test_metrics_move_by_exact_amounts(client):
    delta = MetricsDelta(client)
    response = chat(client, strategy={"name": "best_of_n", "n": 3, "verifier": "self_judge"})
    assert response.status_code == 200, response.text

    assert response.json()["choices"][0]["message"]["content"] == TEXTS[1]
    generated = sum(tokens(t) for t in TEXTS[:3]) + 3  # three 1-token judge verdicts
    returned = tokens(TEXTS[1])
    assert delta("ponder_requests_total", strategy="best_of_n", status="ok") == 1
    assert delta("ponder_requests_total", strategy="best_of_n", status="error") == 0
    assert delta("ponder_generated_tokens_total", strategy="best_of_n", kind="returned") == returned
    assert delta("ponder_generated_tokens_total", strategy="best_of_n", kind="hidden") == generated - returned
    assert delta("ponder_samples_per_request_count", strategy="best_of_n") == 1
    assert delta("ponder_samples_per_request_sum", strategy="best_of_n") == 3
    assert delta("ponder_request_duration_seconds_count", strategy="best_of_n") == 1
    assert delta("ponder_verifier_score_count", verifier="self_judge") == 3
    assert delta("ponder_verifier_score_bucket", verifier="self_judge", le="0.5") == 2  # P(yes) 0.3, 0.9, 0.5
    assert delta("ponder_verifier_score_sum", verifier="self_judge") == pytest.approx(1.7)
    assert delta("ponder_trace_write_errors_total") == 0
    assert metric(delta.after, "ponder_requests_in_flight", strategy="best_of_n") == 0


def test_a_refused_request_is_not_counted_and_a_failed_one_counts_as_an_error(client):
    delta = MetricsDelta(client)
    assert chat(client, strategy="nope").status_code == 400
    client.engine.script = lambda *args: (_ for _ in ()).throw(RuntimeError("boom"))
    assert chat(client, strategy="best_of_n").status_code == 500
    assert delta("ponder_requests_total", strategy="best_of_n", status="error") == 1
    assert delta("ponder_requests_total", strategy="best_of_n", status="ok") == 0
    requests = [key for key in delta.after if key[0] == "ponder_requests_total"]
    assert sum(delta.after[key] - delta.before.get(key, 0.0) for key in requests) == 1  # the 400 is not counted
    assert metric(delta.after, "ponder_requests_in_flight", strategy="best_of_n") == 0


def test_stream_requests_are_counted_too(client):
    delta = MetricsDelta(client)
    stream(client, strategy="self_consistency")
    assert delta("ponder_requests_total", strategy="self_consistency", status="ok") == 1
    assert delta("ponder_samples_per_request_sum", strategy="self_consistency") == 4
    assert delta("ponder_verifier_score_count", verifier="logprob") == 4
    assert delta("ponder_generated_tokens_total", strategy="self_consistency", kind="returned") == tokens(TEXTS[0])
    assert metric(delta.after, "ponder_requests_in_flight", strategy="self_consistency") == 0


# ----------------------------------------------------------------------------------------------- traces
def test_the_trace_records_every_candidate_and_the_chosen_one(client):
    response = chat(client, strategy={"name": "self_consistency", "n": 4}, reference="#### 42", temperature=0.5)
    assert response.status_code == 200, response.text
    trace = trace_of(client, response)
    assert (trace["type"], trace["schema"], trace["status"], trace["error"]) == ("request", 1, "ok", None)
    assert trace["trace_id"] == response.headers["X-Trace-Id"]
    assert (trace["endpoint"], trace["model"], trace["reference"]) == ("chat.completions", MODEL, "#### 42")
    assert trace["input"] == {"messages": MESSAGES}
    assert [c["text"] for c in trace["candidates"]] == TEXTS[:4]
    assert [c["index"] for c in trace["candidates"]] == [0, 1, 2, 3]
    assert [c["answer"] for c in trace["candidates"]] == ["42", "41", "42", "42"]
    assert [c["num_tokens"] for c in trace["candidates"]] == [tokens(t) for t in TEXTS[:4]]
    assert [c["scores"]["reference"] for c in trace["candidates"]] == [1.0, 0.0, 1.0, 1.0]
    assert all(set(c["scores"]) == {"logprob", "reference"} for c in trace["candidates"])
    assert (trace["chosen_index"], trace["chosen_indices"]) == (0, [0])
    assert trace["details"] == {"votes": {"42": 3, "41": 1}}
    assert [(c["kind"], c["n"], c["prompt_tokens"]) for c in trace["engine_calls"]] == [("sample", 4, PROMPT_TOKENS)]
    assert trace["sampling"]["temperature"] == 0.5
    assert trace["sampling"]["n"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_log_probs_are_asked_of_the_engine_only_where_read(tmp_path, stream):
    with serve(tmp_path) as client:
        single = client.post("/v1/chat/completions", json=CHAT | {"stream": stream})
        voted = chat(client, strategy={"name": "self_consistency", "n": 2})
        calls = client.engine.calls
        assert [c.options.logprobs for c in calls] == [False, True]  # single reads none; the vote's tie-break does
        assert trace_of(client, single)["candidates"][0]["cumulative_logprob"] is None
        assert all(isinstance(c["cumulative_logprob"], float) for c in trace_of(client, voted)["candidates"])


def test_the_trace_of_a_completion_records_its_prompt(client):
    response = client.post("/v1/completions", json=COMPLETION)
    trace = trace_of(client, response)
    assert trace["input"] == {"prompt": COMPLETION["prompt"]}
    assert trace["endpoint"] == "completions"


def test_feedback_on_a_trace(tmp_path):
    with serve(tmp_path) as client:
        check_feedback(client, tmp_path)


def check_feedback(client: TestClient, tmp_path: Path) -> None:
    response = chat(client)
    trace_id = response.headers["X-Trace-Id"]
    reply = client.post(f"/v1/traces/{trace_id}/feedback", json={"reward": 0.75, "reference": "42", "comment": "ok"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"object": "trace.feedback", "trace_id": trace_id, "accepted": True}
    assert metric(metric_samples(client), "ponder_feedback_total") == 1

    assert_openai_error(
        client.post("/v1/traces/tr-000000000000000000000000/feedback", json={"reward": 1}),
        404,
        param="trace_id",
        code="trace_not_found",
        says="no trace 'tr-000000000000000000000000'",
    )
    assert_openai_error(client.get("/v1/traces/tr-nope"), 404, param="trace_id", code="trace_not_found")
    assert_openai_error(
        client.post(f"/v1/traces/{trace_id}/feedback", json={"reward": 1.5}), 400, param="reward", says="reward:"
    )
    assert_openai_error(client.post(f"/v1/traces/{trace_id}/feedback", json={"reward": -0.1}), 400, param="reward")
    assert_openai_error(
        client.post(f"/v1/traces/{trace_id}/feedback", json={"reward": 1, "stars": 5}), 400, param="stars"
    )
    client.close()  # ... flushes the journal: the accepted feedback is on disk, the refused ones are not
    feedback = [r for r in read_records(tmp_path / "traces") if r["type"] == "feedback"]
    assert [(r["trace_id"], r["reward"], r["reference"], r["comment"]) for r in feedback] == [
        (trace_id, 0.75, "42", "ok")
    ]


def test_the_trace_is_stamped_with_the_arrival_time(tmp_path):
    with serve(tmp_path, ScriptedEngine(script=scripted, delay_s=0.3)) as client:
        sent = time.time()
        response = chat(client)
        trace = trace_of(client, response)
    assert trace["latency_s"] >= 0.3
    assert sent - 0.05 <= trace["created"] <= sent + 0.15


@pytest.mark.parametrize(("seed", "ignored"), [(1234, True), (None, False)])
def test_a_seed_never_reaches_the_engine(client, seed, ignored):
    body = {"seed": seed} if seed is not None else {}
    response = chat(client, strategy="best_of_n", **body)
    assert response.status_code == 200, response.text
    assert "seed" not in {f.name for f in fields(SamplingOptions)}
    assert all(not hasattr(c.options, "seed") for c in client.engine.calls)
    assert trace_of(client, response)["sampling"]["seed_ignored"] is ignored


# ----------------------------------------------------------------------------------------------- other routes
def test_models_and_strategies_routes(client):
    models = client.get("/v1/models").json()
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [(MODEL, "model", 4096)]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_openai_error(client.get("/v1/models/other"), 404, param="model", code="model_not_found")
    listing = client.get("/v1/strategies").json()
    assert listing["default"] == "single"
    assert {s["name"] for s in listing["data"]} == set(STRATEGIES) >= {"single", "best_of_n", "self_consistency"}
    needs_reference = {v["name"]: v["needs_reference"] for v in listing["verifiers"]}
    assert needs_reference == {name: cls.needs_reference for name, cls in VERIFIERS.items()}
    assert needs_reference["reference"] is True and needs_reference["logprob"] is False
