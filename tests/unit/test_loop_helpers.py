"""The distillation loop's pure helpers: the task files every round reads, and the held-out overlap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.loop import LoopConfig, overlap, task_files
from training.tasks import Task, generate_tasks, load_tasks, write_tasks


def questions(path: Path) -> list[str]:
    return [t.question for t in load_tasks(path)]


def test_generated_task_files_are_the_held_out_set_and_one_seeded_set_per_round(tmp_path: Path) -> None:
    config = LoopConfig(rounds=3, task_kind="addition", train_count=20, train_seed=5, eval_count=10, eval_seed=0)
    eval_path, train_paths = task_files(config, tmp_path)

    assert eval_path == tmp_path / "eval-tasks.jsonl"
    assert train_paths == [tmp_path / f"train-tasks-round{r}.jsonl" for r in (1, 2, 3)]
    assert load_tasks(eval_path) == generate_tasks("addition", 10, 0)
    for r, path in enumerate(train_paths):
        assert load_tasks(path) == generate_tasks("addition", 20, 5 + r)  # round r+1 uses train_seed + r
    round_questions = [questions(path) for path in train_paths]
    assert len({tuple(q) for q in round_questions}) == 3  # different seeds, different sets


def test_generated_task_files_are_deterministic(tmp_path: Path) -> None:
    config = LoopConfig(rounds=2, train_count=15, eval_count=8)
    first = task_files(config, tmp_path / "a")
    second = task_files(config, tmp_path / "b")
    for one, other in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert one.read_bytes() == other.read_bytes()
    assert first[0].read_bytes() != first[1][0].read_bytes()


def write_data(path: Path, count: int) -> list[Task]:
    path.write_text(
        "".join(json.dumps({"question": f"Question {i}?", "answer": f"Work.\n#### {i}"}) + "\n" for i in range(count))
    )
    return load_tasks(path)


def test_data_holds_out_the_first_eval_count_tasks_and_splits_the_rest_by_round(tmp_path: Path) -> None:
    tasks = write_data(tmp_path / "tasks.jsonl", 25)
    config = LoopConfig(rounds=3, data=str(tmp_path / "tasks.jsonl"), eval_count=5, train_count=7)
    work = tmp_path / "work"
    eval_path, train_paths = task_files(config, work)

    assert load_tasks(eval_path) == tasks[:5]
    assert [load_tasks(p) for p in train_paths] == [tasks[5:12], tasks[12:19], tasks[19:25]]
    held_out = set(questions(eval_path))
    seen: set[str] = set()
    for path in train_paths:
        round_questions = set(questions(path))
        assert not round_questions & held_out
        assert not round_questions & seen  # each round gets fresh tasks
        seen |= round_questions
        assert overlap(path, eval_path) == 0.0
    assert load_tasks(eval_path)[0].answer == "0"  # GSM8K-style answers keep only the final answer


def test_data_task_files_are_deterministic(tmp_path: Path) -> None:
    write_data(tmp_path / "tasks.jsonl", 12)
    config = LoopConfig(rounds=2, data=str(tmp_path / "tasks.jsonl"), eval_count=4, train_count=4)
    first_eval, first_train = task_files(config, tmp_path / "a")
    second_eval, second_train = task_files(config, tmp_path / "b")
    assert first_eval.read_bytes() == second_eval.read_bytes()
    assert [p.read_bytes() for p in first_train] == [p.read_bytes() for p in second_train]


def make_tasks(path: Path, qs: list[str]) -> Path:
    write_tasks([Task(question=q, answer="1", id=f"t{i}") for i, q in enumerate(qs)], path)
    return path


@pytest.mark.parametrize(
    ("train", "held_out", "share"),
    [
        (["a", "b", "c"], ["a", "d", "e", "b"], 0.5),
        (["a", "b"], ["c", "d", "e"], 0.0),
        (["b", "a", "a"], ["a", "b"], 1.0),
        (["a"], ["a", "a", "x", "y", "z"], 0.4),  # every held-out occurrence counts
        (["What is 2 * 3?"], ["What is 2 * 3 ?", "what is 2 * 3?", "What is 2 * 3?"], 1 / 3),  # exact text only
    ],
)
def test_overlap_is_the_share_of_held_out_questions_seen_in_training(
    tmp_path: Path, train: list[str], held_out: list[str], share: float
) -> None:
    assert overlap(make_tasks(tmp_path / "train.jsonl", train), make_tasks(tmp_path / "eval.jsonl", held_out)) == share


def test_overlap_ignores_answers_and_ids(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    write_tasks([Task("What is 2 * 3?", "6", "x"), Task("What is 4 * 4?", "16", "y")], train)
    held_out = tmp_path / "eval.jsonl"
    write_tasks([Task("What is 2 * 3?", "7", "other"), Task("What is 5 * 5?", "25", "z")], held_out)
    assert overlap(train, held_out) == 0.5


def eval_trace(question: str, strategy: str, right: bool) -> dict:
    from server.trace_journal import request_record

    candidate = {"index": 0, "text": "x", "scores": {"reference": 1.0 if right else 0.0}}
    return request_record(
        trace_id=f"tr-{question}-{strategy}",
        input={"messages": [{"role": "user", "content": question}]},
        strategy={"name": strategy},
        candidates=[candidate],
        chosen_index=0,
        status="ok",
    )


def test_exposure_split_separates_questions_the_round_trained_on(tmp_path: Path) -> None:
    from server.trace_journal import TraceJournal
    from training.loop import exposure_split

    write_tasks([Task("A", "1", "a"), Task("B", "2", "b")], tmp_path / "train-tasks-round1.jsonl")
    outcomes = {0: {"A": False, "B": False, "C": True, "D": False}, 1: {"A": True, "B": True, "C": True, "D": True}}
    for r, right in outcomes.items():
        journal = TraceJournal(tmp_path / f"round{r}" / "eval-traces")
        journal.start()
        for question, ok in right.items():
            journal.append(eval_trace(question, "single", ok))
        journal.close_sync()
    (row,) = exposure_split(tmp_path, rounds=1)
    assert row == {
        "round": 1,
        "strategy": "single",
        "seen_n": 2,
        "seen_accuracy": 1.0,
        "unseen_n": 2,
        "unseen_accuracy": 1.0,
        "base_unseen_accuracy": 0.5,
    }


@pytest.mark.parametrize(("last", "better"), [(0.57, True), (0.40, False), (0.30, False)])
def test_the_loop_says_whether_the_last_model_beats_the_base(last: float, better: bool) -> None:
    from training.loop import improvement

    rows = [
        {"round": 0, "strategy": "single", "accuracy": 0.40},
        {"round": 0, "strategy": "self_consistency", "accuracy": 0.55},
        {"round": 1, "strategy": "single", "accuracy": last},
    ]
    verdict = improvement(rows, "single")
    assert verdict.better is better
    assert verdict.message.endswith(f"{last:.2f} against 0.40")


@pytest.mark.parametrize(
    ("method", "learning_rate", "config_name", "expected_rate"),
    [
        ("sft", None, "DistillConfig", 1e-5),
        ("dpo", None, "PreferenceDistillConfig", 5e-6),
        ("sft+dpo", 2e-6, "PreferenceDistillConfig", 2e-6),
    ],
)
def test_each_round_distills_with_the_loops_method(tmp_path, method, learning_rate, config_name, expected_rate) -> None:
    pytest.importorskip("trl")
    from transformers import HfArgumentParser

    from training import distill
    from training.loop import distill_command

    config = LoopConfig(method=method, learning_rate=learning_rate, threshold=0.5, max_per_prompt=3, use_lora=True)
    argv = distill_command(config, tmp_path / "traces", tmp_path / "model", tmp_path / "rationales.jsonl")
    config_cls = distill.config_class(argv)
    assert config_cls.__name__ == config_name
    (parsed,) = HfArgumentParser(config_cls).parse_args_into_dataclasses(args=argv)
    assert (parsed.method, parsed.learning_rate, parsed.threshold, parsed.max_per_prompt) == (
        method,
        expected_rate,
        0.5,
        3,
    )
    assert (parsed.traces, parsed.rationales, parsed.use_lora) == (
        str(tmp_path / "traces"),
        str(tmp_path / "rationales.jsonl"),
        True,
    )
