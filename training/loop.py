"""The whole distillation loop, N rounds end to end: `ponder loop --rounds 3`.

    round 0: serve the base model, evaluate it on the held-out set
    round r: serve model r-1 on the training set with a search strategy and the reference (bootstrap traces),
             optionally ask it to rationalize the prompts it never solved, with the answer as a hint (STaR),
             distill those traces into the base model (ReST-EM: from the base each round) -> model r,
             serve model r and evaluate it on the held-out set

Bootstrap and evaluation run on separate server processes with separate trace journals, so held-out answers
can never leak into training data. Prints the table per round and writes a JSON and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.config_cli import parser_from_dataclass
from training.distill import METHODS
from training.evaluate import EvalConfig, run_eval, summarize
from training.rationalize import RationalizeConfig, openai_complete, rationalize, write_rationales
from training.selection import SelectionConfig, select_from_journal
from training.server_process import ServerProcess
from training.tasks import generate_tasks, load_tasks, write_tasks


@dataclass
class LoopConfig:
    rounds: int = field(default=3, metadata={"help": "Distillation rounds after the base evaluation."})
    work_dir: str = field(default="runs/distill-loop", metadata={"help": "Models, traces, logs and reports."})
    base_model: str | None = field(
        default=None, metadata={"help": "Embedded name or local directory (default: embedded)."}
    )
    task_kind: str = field(default="multiplication", metadata={"help": "Generated task family."})
    data: str | None = field(default=None, metadata={"help": "JSONL tasks instead: the first eval_count are held out."})
    train_count: int = field(default=200, metadata={"help": "Training tasks per round."})
    train_seed: int = field(default=1, metadata={"help": "Seed of the training tasks (round r uses seed + r)."})
    eval_count: int = field(default=100, metadata={"help": "Held-out tasks."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the held-out tasks."})
    bootstrap_strategy: str = field(default="self_consistency:n=8", metadata={"help": "Strategy that makes traces."})
    eval_strategies: list[str] = field(
        default_factory=lambda: ["single", "self_consistency:n=8"], metadata={"help": "Strategies evaluated per round."}
    )
    max_tokens: int = field(default=256, metadata={"help": "max_tokens of every request."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight."})
    threshold: float = field(default=1.0, metadata={"help": "Selection threshold on the reward."})
    max_per_prompt: int = field(default=4, metadata={"help": "Examples per prompt."})
    method: str = field(
        default="sft",
        metadata={"help": "Distillation method (see ponder distill): sft, dpo or sft+dpo.", "choices": list(METHODS)},
    )
    rationalize: bool = field(
        default=False,
        metadata={"help": "STaR: ask the model for rationales of the unsolved training prompts, hinted (sft only)."},
    )
    rationale_samples: int = field(default=4, metadata={"help": "Hinted samples per unsolved prompt."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs per round."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate (default: the method's, 1e-5 for sft, 5e-6 for dpo)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "LoRA instead of full fine-tuning."})
    serve_args: str = field(default="", metadata={"help": 'Extra `ponder serve` flags, e.g. "--max-model-len 2048".'})


def task_files(config: LoopConfig, work: Path) -> tuple[Path, list[Path]]:
    """The held-out set and one training set per round, written once so every round sees the same."""
    eval_path = work / "eval-tasks.jsonl"
    if config.data:
        tasks = load_tasks(config.data)
        held_out, pool = tasks[: config.eval_count], tasks[config.eval_count :]
        write_tasks(held_out, eval_path)
        train_paths = []
        for r in range(config.rounds):
            path = work / f"train-tasks-round{r + 1}.jsonl"
            write_tasks(pool[r * config.train_count : (r + 1) * config.train_count], path)
            train_paths.append(path)
        return eval_path, train_paths
    write_tasks(generate_tasks(config.task_kind, config.eval_count, config.eval_seed), eval_path)
    train_paths = []
    for r in range(config.rounds):
        path = work / f"train-tasks-round{r + 1}.jsonl"
        write_tasks(generate_tasks(config.task_kind, config.train_count, config.train_seed + r), path)
        train_paths.append(path)
    return eval_path, train_paths


def run_tasks(server: ServerProcess, tasks: Path, strategies: list[str], config: LoopConfig, out: Path):
    eval_config = EvalConfig(
        base_url=server.base_url,
        data=str(tasks),
        strategies=strategies,
        max_tokens=config.max_tokens,
        concurrency=config.concurrency,
        output_dir=str(out),
    )
    return summarize(asyncio.run(run_eval(eval_config)))


def distill_command(config: LoopConfig, traces: Path, output_dir: Path, rationales: Path | None = None) -> list[str]:
    """The `ponder distill` flags of one round: the loop's method, selection and training options."""
    command = ["--method", config.method, "--traces", str(traces), "--output_dir", str(output_dir)]
    command += ["--threshold", str(config.threshold), "--max_per_prompt", str(config.max_per_prompt)]
    command += ["--num_train_epochs", str(config.epochs), "--min_examples", "1"]
    if config.learning_rate is not None:
        command += ["--learning_rate", str(config.learning_rate)]
    if rationales is not None:
        command += ["--rationales", str(rationales)]
    if config.base_model:
        command += ["--base_model", config.base_model]
    if config.use_lora:
        command += ["--use_lora", "true"]
    return command


def distill(
    config: LoopConfig, traces: Path, output_dir: Path, log: Path, rationales: Path | None = None
) -> dict[str, Any]:
    """One `python -m training.distill` run (a process of its own: training memory is freed at exit)."""
    command = [sys.executable, "-m", "training.distill", *distill_command(config, traces, output_dir, rationales)]
    with log.open("ab") as sink:
        subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=True)
    return json.loads((output_dir / "ponder-distill.json").read_text())


def rationalize_unsolved(
    config: LoopConfig, model: str | None, round_dir: Path, serve_args: tuple[str, ...]
) -> tuple[Path, dict[str, Any]]:
    """STaR: rationales for the training prompts the bootstrap never solved, from a server whose journal is its own
    (a hinted prompt must never become a training prompt). Returns the JSONL for `--rationales` and the report."""
    import openai

    selection = select_from_journal(
        str(round_dir / "train-traces"),
        SelectionConfig(threshold=config.threshold, max_per_prompt=config.max_per_prompt),
    )
    rationalize_config = RationalizeConfig(
        samples=config.rationale_samples,
        max_per_prompt=config.max_per_prompt,
        max_tokens=config.max_tokens,
        concurrency=config.concurrency,
    )
    path = round_dir / "rationales.jsonl"
    with ServerProcess(model, round_dir / "rationale-traces", round_dir / "serve.log", serve_args) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)
        served = client.models.list().data[0].id
        examples, report = rationalize(
            selection.unsolved, openai_complete(client, served, rationalize_config), rationalize_config
        )
    write_rationales(examples, path)
    (round_dir / "rationales-report.json").write_text(json.dumps(report.as_dict(), indent=2))
    print(f"rationalization: {report.kept} rationales for {report.prompts_rationalized} of {report.prompts} prompts")
    return path, report.as_dict()


def overlap(train: Path, held_out: Path) -> float:
    """Share of held-out questions that also appear among the training questions."""
    seen = {t.question for t in load_tasks(train)}
    questions = [t.question for t in load_tasks(held_out)]
    return sum(q in seen for q in questions) / len(questions)


def exposure_split(work: Path, rounds: int) -> list[dict[str, Any]]:
    """Held-out accuracy per round and strategy, split by whether that round's training set had the question,
    beside the base model's accuracy on the same unseen questions.

    Small task families repeat questions (2-12 multiplication has 121), so "held-out seeds" can still share
    questions with training: this tells memorized facts from generalization. Read from the eval journals.
    """
    from server.trace_journal import read_records

    def eval_records(r: int) -> list[dict[str, Any]]:
        return [x for x in read_records(work / f"round{r}" / "eval-traces") if x.get("type") == "request"]

    def accuracy(records: list[dict[str, Any]], strategy: str, trained_on: set[str], seen: bool):
        rewards = [
            x["candidates"][x["chosen_index"]]["scores"].get("reference", 0.0)
            for x in records
            if x["strategy"]["name"] == strategy
            and x.get("chosen_index") is not None
            and (x["input"]["messages"][-1]["content"] in trained_on) == seen
        ]
        return (sum(rewards) / len(rewards) if rewards else None), len(rewards)

    base, rows = eval_records(0), []
    for r in range(1, rounds + 1):
        trained_on = {t.question for t in load_tasks(work / f"train-tasks-round{r}.jsonl")}
        records = eval_records(r)
        for strategy in dict.fromkeys(x["strategy"]["name"] for x in records):
            seen, seen_n = accuracy(records, strategy, trained_on, seen=True)
            unseen, unseen_n = accuracy(records, strategy, trained_on, seen=False)
            base_unseen, _ = accuracy(base, strategy, trained_on, seen=False)
            rows.append(
                {
                    "round": r,
                    "strategy": strategy,
                    "seen_n": seen_n,
                    "seen_accuracy": seen,
                    "unseen_n": unseen_n,
                    "unseen_accuracy": unseen,
                    "base_unseen_accuracy": base_unseen,
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Ponder distillation loop")
    for column in ("round", "strategy", "accuracy", "mean tokens", "p50 latency", "train examples"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]),
            row["strategy"],
            f"{row['accuracy']:.2f}",
            f"{row['mean_generated_tokens']:.1f}",
            f"{row['p50_latency_s']:.2f}s",
            str(row.get("train_examples", "-")),
        )
    Console().print(table)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        points = [(row["round"], row["accuracy"]) for row in rows if row["strategy"] == strategy]
        axes.plot(*zip(*points), marker="o", label=strategy)
    axes.set_xticks(sorted({row["round"] for row in rows}))
    axes.set_xlabel("distillation round (0 = base model)")
    axes.set_ylabel("held-out accuracy")
    axes.set_ylim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def run_loop(config: LoopConfig) -> list[dict[str, Any]]:
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    eval_tasks, train_tasks = task_files(config, work)
    rows: list[dict[str, Any]] = []
    trained: dict[str, Any] = {}  # what the model of this round was trained on
    model = config.base_model  # the model that serves this round; distill always starts from the base (ReST-EM)
    serve_args = tuple(shlex.split(config.serve_args))
    for r in range(config.rounds + 1):
        round_dir = work / f"round{r}"
        with ServerProcess(model, round_dir / "eval-traces", round_dir / "serve.log", serve_args) as server:
            summary = run_tasks(server, eval_tasks, config.eval_strategies, config, round_dir / "eval")
        rows += [{"round": r, **row, **trained} for row in summary]
        print_table(rows)
        if r == config.rounds:
            break
        next_dir = work / f"round{r + 1}"
        with ServerProcess(model, next_dir / "train-traces", next_dir / "serve.log", serve_args) as server:
            run_tasks(server, train_tasks[r], [config.bootstrap_strategy], config, next_dir / "bootstrap")
        rationales, rationalized = None, {}
        if config.rationalize:
            rationales, rationale_report = rationalize_unsolved(config, model, next_dir, serve_args)
            rationalized = {"rationales": rationale_report["kept"]}
        try:
            report = distill(
                config, next_dir / "train-traces", next_dir / "model", next_dir / "distill.log", rationales
            )
        except subprocess.CalledProcessError:
            print(f"distillation failed in round {r + 1}: see {next_dir / 'distill.log'}; stopping the loop")
            break
        trained = {
            "train_examples": report["train"]["examples"],
            "overlap": overlap(train_tasks[r], eval_tasks),
            **rationalized,
        }
        model = str(next_dir / "model")
    split = exposure_split(work, max(row["round"] for row in rows))
    (work / "loop.json").write_text(json.dumps({"config": asdict(config), "rows": rows, "exposure": split}, indent=2))
    plot(rows, work / "loop.png")
    return rows


def build_parser() -> argparse.ArgumentParser:
    return parser_from_dataclass(LoopConfig, "ponder loop", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--analyze", action="store_true", help="Only report the seen/unseen split of a finished run.")
    args = vars(parser.parse_args(argv))
    if args.pop("analyze"):
        split = exposure_split(Path(args["work_dir"]), args["rounds"])
        print(json.dumps(split, indent=1))
        return 0
    config = LoopConfig(**args)
    started = time.monotonic()
    rows = run_loop(config)
    print(f"{len(rows)} rows in {time.monotonic() - started:.0f} s; report in {config.work_dir}/loop.json")
    verdict = improvement(rows, config.eval_strategies[0])
    print(verdict.message)
    return 0 if verdict.better else 1


@dataclass(frozen=True)
class Verdict:
    better: bool
    message: str


def improvement(rows: list[dict[str, Any]], label: str) -> Verdict:
    """Whether the last round's model beats the base on the first evaluated strategy (greedy by default)."""
    points = [(row["round"], row["accuracy"]) for row in rows if row["strategy"] == label]
    (_, base), (last_round, last) = points[0], points[-1]
    better = last_round > 0 and last > base
    word = "better" if better else "not better"
    return Verdict(better, f"round {last_round} is {word} than the base on {label}: {last:.2f} against {base:.2f}")


if __name__ == "__main__":
    sys.exit(main())
