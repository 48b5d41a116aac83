"""STaR rationalization: hinted prompts in, rationales that reach the reference out, trained on without the hint.

The hinted requests go through the real HTTP layer and an OpenAI client, answered by the scripted engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.fakes import CharRenderer, ScriptedEngine
from training.rationalize import (
    HINT,
    RationalizeConfig,
    hinted_messages,
    load_rationales,
    openai_complete,
    rationalize,
    rejection_reason,
    write_rationales,
)
from training.selection import Example, UnsolvedPrompt

RENDERER = CharRenderer()
SYSTEM = {"role": "system", "content": "Answer briefly."}


def unsolved(question: str, reference: str, trace_id: str = "tr-a") -> UnsolvedPrompt:
    return UnsolvedPrompt((SYSTEM, {"role": "user", "content": question}), reference, trace_id)


# One script for every test: the rationale depends on the hint the prompt carries, like a model that copies it.
RATIONALES = {
    "81": ["9 * 9 = 81, so the answer is 81.", "9 * 9 = 81, so the answer is 81.", "The answer is 18.", "81"],
    "56": ["As the hint says, 56.", "7 * 8 = 56", "7 * 8 = 5"],
    "12": ["I do not know."],
}


def scripted(prompt_ids, options, n, request_id) -> list[str]:
    prompt = RENDERER.decode(prompt_ids)
    reference = prompt.split("the correct final answer is ", 1)[1].split(".", 1)[0]
    texts = RATIONALES[reference]
    return [texts[i % len(texts)] for i in range(n)]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    engine = ScriptedEngine(script=scripted)
    settings = ServerSettings(model_path="unused", served_model_name="toy", trace_dir=tmp_path / "traces")
    with TestClient(create_app(settings, lambda: engine, CharRenderer)) as http:
        http.engine = engine  # type: ignore[attr-defined]
        yield http


def complete_over_http(http: TestClient, config: RationalizeConfig):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)
    return openai_complete(client, "toy", config)


def test_the_hint_goes_on_the_last_user_turn_of_a_copy() -> None:
    messages = [
        {"role": "user", "content": "What is 9 * 9?"},
        {"role": "assistant", "content": "18"},
        {"role": "user", "content": "Are you sure?"},
    ]
    hinted = hinted_messages(messages, "81")
    assert hinted[2]["content"] == "Are you sure?" + HINT.format(reference="81")
    assert hinted[:2] == messages[:2] and messages[2]["content"] == "Are you sure?"


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ("9 * 9 = 81", "stop", None),
        ("9 * 9 = 81", "length", "unfinished (length)"),
        ("The hint says 81.", "stop", "mentions the hint"),
        ("9 * 9 = 18", "stop", "misses the reference"),
    ],
)
def test_a_rationale_is_kept_only_if_it_finishes_reaches_the_reference_alone(text, finish, reason) -> None:
    assert rejection_reason(text, finish, "81") == reason


def test_rationales_are_kept_on_the_prompt_without_the_hint(client: TestClient) -> None:
    config = RationalizeConfig(samples=4, max_per_prompt=2, concurrency=1)
    prompts = [unsolved("What is 9 * 9?", "81", "tr-81"), unsolved("What is 7 * 8?", "56", "tr-56")]
    examples, report = rationalize(prompts, complete_over_http(client, config), config)
    assert examples == [
        Example(prompts[0].prompt, "9 * 9 = 81, so the answer is 81.", 1.0, "rationalization", "tr-81"),
        Example(prompts[0].prompt, "81", 1.0, "rationalization", "tr-81"),
        Example(prompts[1].prompt, "7 * 8 = 56", 1.0, "rationalization", "tr-56"),
    ]
    assert report.as_dict() == {
        "prompts": 2,
        "prompts_rationalized": 2,
        "samples": 8,
        "kept": 3,
        "rejected": {"duplicate of a kept rationale": 1, "misses the reference": 2, "mentions the hint": 2},
    }
    # the model was asked with the hint, n samples in one request, at the configured temperature
    calls = client.engine.calls_of("generate")
    assert [call.n for call in calls] == [4, 4]
    assert all("the correct final answer is" in call.prompt_text for call in calls)
    assert {call.options.temperature for call in calls} == {0.8}


def test_the_cap_and_the_misses_are_counted(client: TestClient) -> None:
    config = RationalizeConfig(samples=4, max_per_prompt=1, concurrency=2)
    prompts = [unsolved("What is 9 * 9?", "81"), unsolved("What is 3 * 4?", "12")]
    examples, report = rationalize(prompts, complete_over_http(client, config), config)
    assert [e.completion for e in examples] == ["9 * 9 = 81, so the answer is 81."]
    assert (report.prompts, report.prompts_rationalized, report.samples, report.kept) == (2, 1, 8, 1)
    assert report.rejected == Counter(
        {"duplicate of a kept rationale": 1, "misses the reference": 1 + 4, "over the per-prompt cap": 1}
    )
    assert report.kept + sum(report.rejected.values()) == report.samples


def test_nothing_unsolved_asks_nothing() -> None:
    def complete(messages, n):
        raise AssertionError("no request expected")

    examples, report = rationalize([], complete, RationalizeConfig())
    assert examples == [] and report.prompts == report.samples == 0


def test_rationales_round_trip_through_jsonl(tmp_path: Path) -> None:
    examples = [Example(unsolved("What is 9 * 9?", "81").prompt, "9 * 9 = 81", 1.0, "rationalization", "tr-81")]
    write_rationales(examples, tmp_path / "r" / "rationales.jsonl")
    assert load_rationales(tmp_path / "r" / "rationales.jsonl") == examples
