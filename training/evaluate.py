"""Measure accuracy against generated tokens for each test-time strategy.

Runs a task set through a running Ponder server once per strategy (chosen per
request with the ``X-Strategy`` / ``X-Strategy-Options`` headers), grades every
completion with the same answer extraction the server's verifiers use, and
writes a JSON report plus an accuracy-vs-compute plot. The point is the
trade-off: how much accuracy each extra generated token buys. A code task
(HumanEval) sends its tests as the request's ``tests`` and counts as correct
when the returned code passes all of them in the ``code_tests`` sandbox.

    python -m training.evaluate --strategies single best_of_n:n=8,verifier=logprob \\
        self_consistency:n=8 --task_kind multiplication --count 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from training.config_cli import parser_from_dataclass
from training.tasks import TASK_KINDS, TASK_LOADERS, Task, load_tasks, named_tasks
from verifiers.answer_extraction import answers_match, extract_answer
from verifiers.code_tests import Limits, extract_code, judge_run, run_tests

GREEDY_STRATEGY = "single"
MAX_ERROR_CHARS = 500


class NoServedModelError(Exception):
    """The server answered but lists no model to evaluate."""


@dataclass
class StrategySpec:
    """A strategy to evaluate: the server-side name, its options and a label.

    Parsed from ``name[:key=value,...]``; the reserved option ``label=...``
    renames the strategy in reports (the default label is the spec text), and
    ``deadline=S`` gives each request S seconds, after which the server answers
    with the best answer so far (``X-Deadline``, ``X-On-Deadline: best_so_far``).
    """

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    deadline_s: float | None = None


@dataclass
class EvalConfig:
    """Options of one evaluation run; each field is also a command-line flag."""

    base_url: str = field(
        default="http://127.0.0.1:8000/v1",
        metadata={"help": "OpenAI-compatible base URL of the Ponder server."},
    )
    api_key: str = field(default="EMPTY", metadata={"help": "API key sent to the server."})
    model: str | None = field(
        default=None,
        metadata={"help": "Model name to request; default: the first model the server lists."},
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "JSONL task file ({question, answer[, id]}, GSM8K '####' answers allowed). "
            "Default: a generated set (see --task_kind, --count, --seed)."
        },
    )
    task_kind: str = field(
        default="multiplication",
        metadata={
            "help": "Task set when --data is not given: a generated family, or a fixed benchmark "
            f"({', '.join(TASK_LOADERS)}: all its problems; --count and --seed do not apply).",
            "choices": TASK_KINDS,
        },
    )
    count: int = field(default=100, metadata={"help": "Number of generated tasks."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated tasks."})
    strategies: list[str] = field(
        default_factory=lambda: [GREEDY_STRATEGY],
        metadata={
            "help": "Strategies to compare, each 'name[:key=value,...]', e.g. 'single' "
            "'best_of_n:n=8,verifier=logprob' 'self_consistency:n=8,label=sc8'."
        },
    )
    max_tokens: int = field(default=256, metadata={"help": "max_tokens of every request."})
    temperature: float = field(
        default=0.8,
        metadata={"help": "Sampling temperature of every strategy except 'single'."},
    )
    single_temperature: float = field(
        default=0.0,
        metadata={
            "help": "Temperature of the 'single' strategy. Greedy by default so the baseline is the "
            "model's deterministic best guess rather than one noisy draw; set it to --temperature "
            "to compare against a single sample instead."
        },
    )
    concurrency: int = field(default=4, metadata={"help": "Requests in flight at once."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N tasks."})
    output_dir: str = field(
        default="eval-results",
        metadata={"help": "Directory of the JSON report and plot."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message for every request."})
    timeout_s: float = field(default=600.0, metadata={"help": "Per-request timeout in seconds."})


@dataclass
class ItemResult:
    """Outcome of one (task, strategy) request; a failed request has ``error`` set."""

    task_id: str
    strategy: str
    correct: bool
    predicted: str | None
    reference: str
    generated_tokens: int
    latency_s: float
    trace_id: str | None
    error: str | None
    samples: int | None = None
    served_strategy: str | None = None
    started_s: float = 0.0
    completion: str | None = None
    deadline_exceeded: bool = False  # answered with the best so far when its deadline passed


def parse_strategy_spec(text: str) -> StrategySpec:
    """Parse ``"best_of_n:n=8,verifier=logprob"`` into a :class:`StrategySpec`."""
    spec_text = text.strip()
    name, _, options_text = spec_text.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
        raise ValueError(f"strategy spec {text!r} must start with a strategy name")
    label = spec_text
    deadline_s: float | None = None
    options: dict[str, Any] = {}
    for item in (part.strip() for part in options_text.split(",")):
        if not item:
            continue
        key, separator, value = (piece.strip() for piece in item.partition("="))
        if not separator or not key:
            raise ValueError(f"option {item!r} of strategy spec {text!r} is not key=value")
        if key in options:
            raise ValueError(f"option {key!r} repeated in strategy spec {text!r}")
        if key == "label":
            label = value
        elif key == "deadline":
            deadline_s = float(value)
            if not deadline_s > 0:
                raise ValueError(f"deadline of strategy spec {text!r} must be a positive number of seconds")
        else:
            options[key] = parse_option_value(value)
    return StrategySpec(label=label, name=name, options=options, deadline_s=deadline_s)


def parse_strategy_specs(texts: Sequence[str]) -> list[StrategySpec]:
    """Parse every spec; labels must be unique because results are grouped by label."""
    specs = [parse_strategy_spec(text) for text in texts]
    if not specs:
        raise ValueError("at least one strategy is required")
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"duplicate strategy labels {duplicates}; add label=... to tell them apart")
    return specs


def parse_option_value(value: str) -> bool | int | float | str:
    """Read an option value as bool, int or float when it looks like one."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if re.fullmatch(r"[-+]?\d+", value):
        return int(value)
    if re.fullmatch(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?", value):
        return float(value)
    return value


def strategy_headers(spec: StrategySpec) -> dict[str, str]:
    """Request headers selecting the strategy on the Ponder server."""
    headers = {"X-Strategy": spec.name}
    if spec.options:
        headers["X-Strategy-Options"] = json.dumps(spec.options, separators=(",", ":"))
    if spec.deadline_s is not None:
        headers |= {"X-Deadline": str(spec.deadline_s), "X-On-Deadline": "best_so_far"}
    return headers


def temperature_for(spec: StrategySpec, config: EvalConfig) -> float:
    """Greedy for the single-sample baseline, sampling for multi-sample strategies."""
    return config.single_temperature if spec.name == GREEDY_STRATEGY else config.temperature


def build_messages(task: Task, system_prompt: str | None) -> list[dict[str, str]]:
    """Chat messages asking the task's question, after the optional system prompt."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": task.question}]


def select_tasks(config: EvalConfig) -> list[Task]:
    """The configured task set: the JSONL file if given, else a generated set."""
    tasks = load_tasks(config.data) if config.data else named_tasks(config.task_kind, config.count, config.seed)
    return tasks if config.limit is None else tasks[: config.limit]


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lower = int(rank)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)


def summarize(results: list[ItemResult]) -> list[dict[str, Any]]:
    """Per-strategy accuracy, compute and latency, in order of first appearance.

    Accuracy counts failed requests as wrong (the strategy did not deliver an
    answer); token and latency statistics cover successful requests only,
    since a failure's token count is unknown and its latency is not the
    strategy's. Wall-clock spans the first start to the last finish.
    """
    by_strategy: dict[str, list[ItemResult]] = {}
    for result in results:
        by_strategy.setdefault(result.strategy, []).append(result)
    return [_summarize_strategy(label, items) for label, items in by_strategy.items()]


def _summarize_strategy(label: str, items: list[ItemResult]) -> dict[str, Any]:
    """Statistics of one strategy's items (see :func:`summarize`)."""
    succeeded = [item for item in items if item.error is None]
    latencies = [item.latency_s for item in succeeded]
    tokens = [item.generated_tokens for item in succeeded]
    return {
        "strategy": label,
        "n": len(items),
        "accuracy": sum(item.correct for item in items) / len(items),
        "mean_generated_tokens": sum(tokens) / len(tokens) if tokens else None,
        "p50_latency_s": percentile(latencies, 50),
        "p95_latency_s": percentile(latencies, 95),
        "errors": len(items) - len(succeeded),
        "deadline_exceeded": sum(item.deadline_exceeded for item in items),
        "wall_clock_s": max(item.started_s + item.latency_s for item in items) - min(item.started_s for item in items),
    }


async def run_eval(config: EvalConfig) -> list[ItemResult]:
    """Evaluate every task under every strategy against the running server.

    Strategies run one after another (tasks within a strategy concurrently, at
    most ``concurrency`` in flight) so that each strategy's latency and
    wall-clock are measured without another strategy competing for the GPU.
    A failed request becomes an error result and the run goes on.
    """
    specs = parse_strategy_specs(config.strategies)
    if config.concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {config.concurrency}")
    tasks = select_tasks(config)
    async with AsyncOpenAI(
        base_url=config.base_url,
        api_key=config.api_key,
        max_retries=0,
        timeout=config.timeout_s,
    ) as client:
        model = config.model or await first_served_model(client)
        semaphore = asyncio.Semaphore(config.concurrency)
        run_start = time.perf_counter()
        results: list[ItemResult] = []
        with tqdm(total=len(tasks) * len(specs), desc="eval", unit="req") as progress:

            async def evaluate_bounded(task: Task, spec: StrategySpec) -> ItemResult:
                async with semaphore:
                    result = await evaluate_item(client, model, config, task, spec, run_start)
                progress.update(1)
                return result

            for spec in specs:
                progress.set_postfix_str(spec.label)
                results += await asyncio.gather(*(evaluate_bounded(task, spec) for task in tasks))
    return results


async def first_served_model(client: AsyncOpenAI) -> str:
    """The first model the server lists, Ponder serving a single model."""
    page = await client.models.list()
    if not page.data:
        raise NoServedModelError("the server lists no models; pass --model")
    return page.data[0].id


async def evaluate_item(
    client: AsyncOpenAI,
    model: str,
    config: EvalConfig,
    task: Task,
    spec: StrategySpec,
    run_start: float,
) -> ItemResult:
    """Send one task under one strategy and grade the answer.

    Any exception except cancellation is recorded rather than raised: one bad
    request (HTTP 400, timeout, malformed body) must not cost a long run.
    The reference (a code task's tests) travels in the body so the server's
    verifiers and trace can use it.
    """
    started = time.perf_counter()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=build_messages(task, config.system_prompt),
            max_tokens=config.max_tokens,
            temperature=temperature_for(spec, config),
            extra_headers=strategy_headers(spec),
            extra_body=request_extension(task),
        )
        completion = raw.parse()
    except Exception as error:
        return ItemResult(
            task_id=task.id,
            strategy=spec.label,
            correct=False,
            predicted=None,
            reference=task.answer,
            generated_tokens=0,
            latency_s=time.perf_counter() - started,
            trace_id=None,
            error=f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS],
            started_s=started - run_start,
        )
    latency = time.perf_counter() - started
    text = (completion.choices[0].message.content or "") if completion.choices else ""
    usage_tokens = completion.usage.completion_tokens if completion.usage else None
    correct, predicted = await grade(task, text)
    return ItemResult(
        task_id=task.id,
        strategy=spec.label,
        correct=correct,
        predicted=predicted,
        reference=task.answer,
        generated_tokens=generated_tokens(raw.headers, usage_tokens),
        latency_s=latency,
        trace_id=raw.headers.get("X-Trace-Id"),
        error=None,
        samples=_int_header(raw.headers, "X-Samples"),
        served_strategy=raw.headers.get("X-Strategy"),
        started_s=started - run_start,
        completion=text,
        deadline_exceeded="X-Deadline-Exceeded" in raw.headers,
    )


def request_extension(task: Task) -> dict[str, Any]:
    """Ponder's body fields for the task: a code task's tests (for ``code_tests``), else the reference answer."""
    return {"tests": list(task.tests)} if task.tests else {"reference": task.answer}


async def grade(task: Task, text: str) -> tuple[bool, str | None]:
    """Whether the completion answers the task, and what it answered.

    A code task runs the completion's code against its tests in the sandbox the ``code_tests`` verifier uses,
    so the harness and the server judge code the same way; correct means every test passed.
    """
    if not task.tests:
        return answers_match(text, task.answer), extract_answer(text)
    limits = Limits()
    verdict = judge_run(await run_tests(extract_code(text), task.tests, limits), task.tests, limits)
    passed = round(verdict.score * len(task.tests))
    return passed == len(task.tests), f"{passed}/{len(task.tests)} tests passed"


def generated_tokens(headers: Mapping[str, str], usage_completion_tokens: int | None) -> int:
    """Tokens generated for the request, all samples included.

    ``X-Generated-Tokens`` is the server's own count of every sampled token;
    ``usage.completion_tokens`` should equal it and is the fallback when the
    header is absent (e.g. a plain vLLM server).
    """
    from_header = _int_header(headers, "X-Generated-Tokens")
    if from_header is not None:
        return from_header
    return usage_completion_tokens or 0


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    """Integer value of a response header, None when missing or malformed."""
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def write_report(config: EvalConfig, results: list[ItemResult], summary: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write the JSON report (config, summary, every item) and the trade-off plot."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = _unused_stem(output_dir, f"eval-{_task_set_name(config)}-{datetime.now():%Y%m%d-%H%M%S}")
    json_path, plot_path = output_dir / f"{stem}.json", output_dir / f"{stem}.png"
    report = {
        "created_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": asdict(config),
        "summary": summary,
        "items": [asdict(result) for result in results],
    }
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_accuracy_vs_compute(summary, plot_path, title=_task_set_name(config))
    return json_path, plot_path


def plot_accuracy_vs_compute(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against mean generated tokens per request (left) and against p50 latency, with a line out to
    p95 (right): one labelled point per strategy. Tokens are what a strategy costs the engine; latency is what
    a client waits, and what a deadline (``deadline=S`` in a spec) bounds.

    Uses the Agg canvas directly (no pyplot) so it works headless and leaves
    global matplotlib state alone. An x axis turns logarithmic when it spans
    more than a factor of ten, as compute does from single to best-of-16.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), dpi=120)
    FigureCanvasAgg(figure)
    by_tokens, by_latency = figure.subplots(1, 2, sharey=True)
    points = [row for row in summary if row["mean_generated_tokens"] is not None]
    _labelled_scatter(by_tokens, points, "mean_generated_tokens")
    by_tokens.set_xlabel("mean generated tokens per request (all samples)")
    by_tokens.set_ylabel("accuracy")
    by_tokens.set_title(f"Accuracy vs test-time compute — {title}")
    timed = [row for row in points if row["p50_latency_s"] is not None]
    colours = _labelled_scatter(by_latency, timed, "p50_latency_s")
    for row, colour in zip(timed, colours):
        by_latency.plot([row["p50_latency_s"], row["p95_latency_s"]], [row["accuracy"]] * 2, color=colour, alpha=0.5)
    by_latency.set_xlabel("latency per request, p50 (dot) to p95 (line end), s")
    by_latency.set_title("Accuracy vs latency")
    for axes in (by_tokens, by_latency):
        axes.set_ylim(-0.02, 1.05)
        axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _labelled_scatter(axes: Any, points: list[dict[str, Any]], x_key: str) -> list[Any]:
    """One labelled dot per row; returns each dot's colour."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    colours = []
    for row in points:
        dot = axes.scatter(row[x_key], row["accuracy"], s=50)
        colours.append(dot.get_facecolor()[0])
        axes.annotate(
            row["strategy"], (row[x_key], row["accuracy"]), textcoords="offset points", xytext=(6, 6), fontsize=9
        )
    xs = [row[x_key] for row in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        axes.set_xscale("log")
        # Plain numbers at 1-2-5 steps: matplotlib's default 2x10^2-style minor labels collide on a short axis.
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
    return colours


def _task_set_name(config: EvalConfig) -> str:
    """Short name of the evaluated task set for file names and titles."""
    if config.data:
        name = Path(config.data).stem
    else:
        name = config.task_kind if config.task_kind in TASK_LOADERS else f"{config.task_kind}-s{config.seed}"
    return name if config.limit is None else f"{name}-first{config.limit}"


def _unused_stem(directory: Path, stem: str) -> str:
    """stem, or stem-2, stem-3... so that runs in the same second never overwrite."""
    candidate, suffix = stem, 1
    while (directory / f"{candidate}.json").exists() or (directory / f"{candidate}.png").exists():
        suffix += 1
        candidate = f"{stem}-{suffix}"
    return candidate


def summary_table(summary: list[dict[str, Any]]) -> Table:
    """Rich table of :func:`summarize` rows for the terminal."""
    table = Table(
        title="Ponder evaluation",
        caption="gen tokens: mean generated per request, all samples; "
        "latencies over successful requests; cut: answered with the best so far at the deadline; "
        "wall: first start to last finish",
    )
    # Numbers never wrap; a long strategy label folds instead.
    table.add_column("strategy", overflow="fold")
    for column in (
        "n",
        "accuracy",
        "gen tokens",
        "p50 lat",
        "p95 lat",
        "errors",
        "cut",
        "wall",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    for row in summary:
        table.add_row(
            row["strategy"],
            str(row["n"]),
            f"{row['accuracy']:.1%}",
            _format_optional(row["mean_generated_tokens"], "{:.1f}"),
            _format_optional(row["p50_latency_s"], "{:.2f}s"),
            _format_optional(row["p95_latency_s"], "{:.2f}s"),
            str(row["errors"]),
            str(row.get("deadline_exceeded", 0)),
            f"{row['wall_clock_s']:.1f}s",
        )
    return table


def _format_optional(value: float | None, template: str) -> str:
    """Formatted value, or a dash when there is nothing to report."""
    return "-" if value is None else template.format(value)


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`EvalConfig` field (``--max_tokens`` and ``--max-tokens`` both work)."""
    return parser_from_dataclass(EvalConfig, "python -m training.evaluate", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation, print the summary table and where the report went.

    Exit status: 0 when the run completed, 1 when every request failed,
    2 when the server could not be queried at all (or the arguments are bad).
    """
    parser = build_parser()
    config = EvalConfig(**vars(parser.parse_args(argv)))
    try:
        parse_strategy_specs(config.strategies)
    except ValueError as error:
        parser.error(str(error))
    console = Console()
    try:
        results = asyncio.run(run_eval(config))
    except (openai.OpenAIError, NoServedModelError) as error:
        console.print(f"[red]cannot evaluate against {config.base_url}: {error}[/red]")
        return 2
    summary = summarize(results)
    json_path, plot_path = write_report(config, results, summary)
    console.print(summary_table(summary))
    console.print(f"report: {json_path}\nplot:   {plot_path}", soft_wrap=True)
    return 1 if results and all(result.error is not None for result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
