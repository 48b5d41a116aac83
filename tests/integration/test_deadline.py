"""Per-request deadlines on the real engine: the best answer so far, or a 504, and the engine is idle after."""

from __future__ import annotations

import time

import openai
import pytest

pytestmark = pytest.mark.integration

STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to count."}]
DEADLINE_S = 1.5


@pytest.fixture(scope="module", autouse=True)
def warm_engine(client, model_name) -> None:
    """A first request pays for the engine's warm-up; the deadlines below should cut generation, not start-up."""
    client.chat.completions.create(model=model_name, messages=STORY, max_tokens=8, temperature=0)


def engine_idle(metrics) -> bool:
    for _ in range(50):
        snapshot = metrics.scrape()
        if snapshot.sum("vllm:num_requests_running") == 0 and snapshot.sum("vllm:num_requests_waiting") == 0:
            return True
        time.sleep(0.1)
    return False


def test_best_of_n_past_its_deadline_answers_with_the_best_so_far(client, model_name, trace_of, metrics):
    started = time.monotonic()
    raw = client.with_options(max_retries=0).chat.completions.with_raw_response.create(
        model=model_name,
        messages=STORY,
        max_tokens=500,
        temperature=1.0,
        extra_body={"strategy": {"name": "best_of_n", "n": 4}, "deadline_s": DEADLINE_S, "on_deadline": "best_so_far"},
    )
    elapsed = time.monotonic() - started
    completion = raw.parse()
    assert raw.headers["X-Deadline-Exceeded"] == "best_so_far"
    assert elapsed < DEADLINE_S + 5, f"answered {elapsed:.1f} s after a {DEADLINE_S} s deadline"
    (choice,) = completion.choices
    assert choice.message.content and choice.finish_reason == "length"  # 500 tokens do not fit in 1.5 s
    trace = trace_of(raw.headers["X-Trace-Id"])
    assert trace["status"] == "ok"
    assert trace["details"]["deadline"] | {"answers_so_far": 4} == {
        "exceeded": True,
        "returned": "best_so_far",
        "from": "answers",
        "complete": False,
        "answers_so_far": 4,
    }
    assert trace["candidates"][trace["chosen_index"]]["text"] == choice.message.content
    assert completion.usage.completion_tokens == sum(c["generated_tokens"] for c in trace["engine_calls"])
    assert engine_idle(metrics), "the cut samples still run in the engine"


def test_by_default_a_deadline_is_a_504_and_the_engine_is_freed(client, model_name, metrics):
    with pytest.raises(openai.APIStatusError) as caught:
        client.with_options(max_retries=0).chat.completions.create(
            model=model_name,
            messages=STORY,
            max_tokens=500,
            extra_body={"strategy": {"name": "self_consistency", "n": 4}, "deadline_s": DEADLINE_S},
        )
    assert caught.value.status_code == 504
    assert caught.value.response.json()["error"]["code"] == "deadline_exceeded"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert engine_idle(metrics)
    fresh = client.chat.completions.create(model=model_name, messages=STORY, max_tokens=4, temperature=0)
    assert fresh.choices[0].message.content


def test_a_stream_past_its_deadline_ends_with_length(client, model_name, trace_of, metrics):
    stream = client.chat.completions.create(
        model=model_name,
        messages=STORY,
        max_tokens=500,
        stream=True,
        extra_headers={"X-Deadline": str(DEADLINE_S), "X-On-Deadline": "best_so_far"},
    )
    text, reasons, trace_id = [], [], None
    for chunk in stream:
        trace_id = "tr-" + chunk.id.removeprefix("chatcmpl-")
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["length"]
    streamed = "".join(text)
    assert streamed
    trace = trace_of(trace_id)
    assert trace["details"]["deadline"]["complete"] is False
    assert trace["candidates"][0]["text"] == streamed
    assert engine_idle(metrics)
