"""Train the introspective reward/cost heads (after ZIP-RC) from served traces: `ponder heads train`.

    1. read the journal; every candidate with a verified reward (feedback, reference match or a verifier's score,
       the same rule as distillation) and its generated token ids is one training sequence
    2. run the frozen model once over prompt + completion; at the position that produced generated token j the
       target is (reward bin of the final reward, bin of the n - j tokens still to come)
    3. the heads are R x L new vocabulary rows, so their logits at a position are h . W with h the final hidden
       state: training only the new rows with the body frozen is a softmax regression on those hidden states.
       W starts at the prior (a direction u with h . u ~ 1, scaled by the log of each class's frequency), not at
       random, and is trained by cross-entropy with AdamW
    4. write a model directory the server serves: the base weights, the vocabulary grown by R x L rows set to W,
       the tokenizer with their tokens, and `ponder-introspection.json`; plus a calibration report on held-out
       prompts (AUROC, ECE, length accuracy and error) and a reliability plot

`ponder heads bootstrap` makes the first traces without users: it serves the base model and runs a seeded task set
through it with sampling and the reference answer, so a fresh machine can train heads in minutes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.introspection import IntrospectionHeads, default_length_edges
from training.config_cli import parser_from_dataclass
from training.selection import SelectionConfig, candidate_reward, load_journal, prompt_key

logger = logging.getLogger(__name__)

REPORT_FILE = "ponder-heads.json"
PLOT_FILE = "reliability.png"


@dataclass
class HeadsConfig:
    traces: str = field(default="traces", metadata={"help": "Trace journal: a directory or an fsspec URL."})
    output_dir: str = field(default="runs/heads/model", metadata={"help": "Model directory to write."})
    base_model: str | None = field(
        default=None, metadata={"help": "Model the traces came from: an embedded name or a local directory."}
    )
    reward_source: str = field(
        default="auto", metadata={"help": "auto | feedback | reference | verifier (as in distillation)."}
    )
    verifier: str = field(default="answer_agreement", metadata={"help": "Verifier score used as reward (verifier)."})
    reward_bins: int = field(default=8, metadata={"help": "R: reward bins over [0, 1]."})
    max_tokens: int = field(
        default=256, metadata={"help": "Length edges 0,16,..,1024,inf are scaled so 1024 becomes this."}
    )
    held_out: float = field(default=0.2, metadata={"help": "Share of prompts kept out of training for the report."})
    epochs: int = field(default=40, metadata={"help": "Passes over the training positions."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the head rows."})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay of the head rows."})
    batch_positions: int = field(default=4096, metadata={"help": "Token positions per optimizer step."})
    forward_batch: int = field(default=8, metadata={"help": "Sequences per forward pass of the frozen model."})
    max_sequences: int | None = field(default=None, metadata={"help": "Use at most this many candidates."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the init and the batches."})
    torch_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch (1 is fastest when an engine shares the cores)."}
    )

    def selection(self) -> SelectionConfig:
        return SelectionConfig(reward_source=self.reward_source, verifier=self.verifier)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Sequence_:
    """One candidate to learn from: the prompt it answered, what it generated, and the reward it earned."""

    prompt: str  # prompt_key of the messages, for the split
    messages: tuple[Mapping[str, Any], ...] | None
    prompt_text: str | None  # completions endpoint
    token_ids: tuple[int, ...]
    reward: float


# ----------------------------------------------------------------------------------------------- data
def collect_sequences(
    requests: Iterable[Mapping[str, Any]], feedback: Mapping[str, Sequence[Mapping[str, Any]]], config: HeadsConfig
) -> tuple[list[Sequence_], dict[str, int]]:
    """Candidates with a reward and their token ids, and counts of what was skipped."""
    selection = config.selection()
    sequences, skipped = [], {"no_reward": 0, "no_token_ids": 0, "aborted": 0}
    for record in requests:
        messages = record.get("input", {}).get("messages")
        prompt_text = record.get("input", {}).get("prompt")
        key = prompt_key(messages) if messages else str(prompt_text)
        for candidate in record["candidates"]:
            if candidate.get("finish_reason") not in ("stop", "length"):
                skipped["aborted"] += 1
                continue
            if not candidate.get("token_ids"):
                skipped["no_token_ids"] += 1
                continue
            reward = candidate_reward(record, candidate, feedback.get(record["trace_id"], ()), selection)
            if reward is None:
                skipped["no_reward"] += 1
                continue
            messages_t = tuple(messages) if messages else None
            sequences.append(Sequence_(key, messages_t, prompt_text, tuple(candidate["token_ids"]), reward[0]))
    return sequences, skipped


def is_held_out(prompt: str, share: float, seed: int) -> bool:
    """A stable split by prompt: the same prompt is always on the same side, whatever else is in the journal."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def position_targets(heads: IntrospectionHeads, num_tokens: int, reward: float) -> np.ndarray:
    """Class of each generated position j: (reward bin of the final reward, bin of the num_tokens - j to come)."""
    return np.array([heads.target_class(reward, num_tokens - j) for j in range(num_tokens)], dtype=np.int64)


def hidden_states(model: Any, renderer: Any, sequences: Sequence[Sequence_], batch: int) -> list[np.ndarray]:
    """(num_tokens, d) final hidden states at the positions that produced each generated token, model frozen."""
    import torch
    from tqdm import tqdm

    def prompt_ids(s: Sequence_) -> list[int]:
        return renderer.chat_ids(s.messages) if s.messages is not None else renderer.text_ids(s.prompt_text or "")

    inputs = [(prompt_ids(s), s.token_ids) for s in sequences]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]) + len(inputs[i][1]))
    states: list[np.ndarray | None] = [None] * len(inputs)
    body = model.get_decoder()
    with torch.inference_mode(), tqdm(total=len(order), desc="hidden states", unit="seq") as bar:
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            rows = [list(inputs[i][0]) + list(inputs[i][1])[:-1] for i in chunk]  # the last token produces nothing
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            for row, i in enumerate(chunk):
                p, n = len(inputs[i][0]), len(inputs[i][1])
                states[i] = hidden[row, p - 1 : p - 1 + n].numpy()
            bar.update(len(chunk))
    return [s for s in states if s is not None]


# ----------------------------------------------------------------------------------------------- the fit
def prior_init(hidden: np.ndarray, targets: np.ndarray, classes: int) -> np.ndarray:
    """W such that every position predicts the class frequencies: u with h . u ~ 1, row c = log p(c) * u."""
    # least squares by its normal equations (a d x d solve; LAPACK's lstsq on a tall matrix takes minutes),
    # with a whisker of ridge so an unused hidden dimension cannot make it singular
    gram = hidden.T.astype(np.float64) @ hidden.astype(np.float64)
    ridge = 1e-6 * np.trace(gram) / len(gram)
    u = np.linalg.solve(gram + ridge * np.eye(len(gram)), hidden.sum(axis=0, dtype=np.float64))
    counts = np.bincount(targets, minlength=classes) + 1.0  # add-one: no class is impossible
    log_prior = np.log(counts / counts.sum())
    return (log_prior[:, None] * u[None, :]).astype(np.float32)


def fit_heads(
    hidden: np.ndarray, targets: np.ndarray, init: np.ndarray, config: HeadsConfig
) -> tuple[np.ndarray, list]:
    """Softmax regression of the classes on the frozen hidden states (no bias: the rows are vocabulary rows)."""
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    h, y = torch.from_numpy(hidden).float(), torch.from_numpy(targets)
    w = torch.nn.Parameter(torch.from_numpy(init).clone())
    optimizer = torch.optim.AdamW([w], lr=config.learning_rate, weight_decay=config.weight_decay)
    losses = []
    with tqdm(range(config.epochs), desc="head rows", unit="epoch") as bar:
        for _ in bar:
            order = torch.randperm(len(y), generator=generator)
            total = 0.0
            for start in range(0, len(y), config.batch_positions):
                idx = order[start : start + config.batch_positions]
                loss = torch.nn.functional.cross_entropy(h[idx] @ w.T, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            losses.append(total / len(y))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return w.detach().numpy(), losses


# ----------------------------------------------------------------------------------------------- the report
def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def expected_calibration_error(predicted: Sequence[float], outcome: Sequence[float], bins: int = 10) -> float:
    predicted, outcome = np.asarray(predicted), np.asarray(outcome)
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(predicted[which == b].mean() - outcome[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )


def calibration_report(
    heads: IntrospectionHeads, weights: np.ndarray, hidden: Sequence[np.ndarray], rewards: Sequence[float]
) -> dict[str, Any]:
    """How well the heads predict, on sequences they did not train on."""
    stages: dict[str, tuple[list[float], list[float]]] = {"start": ([], []), "middle": ([], []), "end": ([], [])}
    every_pred, every_outcome, length_hits, length_errors, prior_errors = [], [], [], [], []
    lengths = [len(h) for h in hidden]
    median_length = float(np.median(lengths)) if lengths else 0.0
    for h, reward in zip(hidden, rewards):
        logits = h @ weights.T
        joint = np.exp(logits - logits.max(axis=1, keepdims=True))
        joint = (joint / joint.sum(axis=1, keepdims=True)).reshape(len(h), heads.reward_bins, heads.length_bins)
        expected = joint.sum(axis=2) @ heads.reward_values
        length_marginal = joint.sum(axis=1)
        n = len(h)
        for stage, j in (("start", 0), ("middle", n // 2), ("end", n - 1)):
            stages[stage][0].append(float(expected[j]))
            stages[stage][1].append(reward)
        every_pred += expected.tolist()
        every_outcome += [reward] * n
        remaining = n - np.arange(n)
        true_bins = np.array([heads.length_bin(r) for r in remaining])
        length_hits += (length_marginal.argmax(axis=1) == true_bins).tolist()
        length_errors += np.abs(length_marginal @ heads.length_values - remaining).tolist()
        prior_errors += np.abs(np.maximum(median_length - np.arange(n), 1) - remaining).tolist()
    correct = [r >= 0.5 for r in every_outcome]
    return {
        "sequences": len(hidden),
        "positions": len(every_pred),
        "correct_share": float(np.mean([r >= 0.5 for r in rewards])) if rewards else None,
        "auroc": {s: auroc(p, [r >= 0.5 for r in o]) for s, (p, o) in stages.items()},
        "auroc_all_positions": auroc(every_pred, correct),
        "ece": {s: expected_calibration_error(p, o) if p else None for s, (p, o) in stages.items()},
        "ece_all_positions": expected_calibration_error(every_pred, every_outcome) if every_pred else None,
        "length_bin_accuracy": float(np.mean(length_hits)) if length_hits else None,
        "remaining_mae_tokens": float(np.mean(length_errors)) if length_errors else None,
        "remaining_mae_tokens_median_baseline": float(np.mean(prior_errors)) if prior_errors else None,
        "reliability": {s: reliability_curve(p, o) for s, (p, o) in stages.items()},
    }


def reliability_curve(predicted: Sequence[float], outcome: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    predicted, outcome = np.asarray(predicted), np.asarray(outcome)
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    return [
        {
            "predicted": float(predicted[which == b].mean()),
            "observed": float(outcome[which == b].mean()),
            "count": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def plot_reliability(report: Mapping[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for stage, curve in report["reliability"].items():
        auc = report["auroc"][stage]
        label = f"{stage} of answer (AUROC {auc:.2f})" if auc is not None else stage
        ax.plot([c["predicted"] for c in curve], [c["observed"] for c in curve], marker="o", label=label)
    ax.set(xlabel="predicted expected reward", ylabel="observed reward", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- the checkpoint
def write_checkpoint(
    model: Any,
    tokenizer: Any,
    heads_in_base: IntrospectionHeads | None,
    weights: np.ndarray,
    heads: IntrospectionHeads,
    out: Path,
) -> IntrospectionHeads:
    """The base model with R x L vocabulary rows set to the trained weights (grown if the base has none)."""
    import torch

    if heads_in_base is None:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": heads.token_strings()}, replace_extra_special_tokens=False
        )
        first = tokenizer.convert_tokens_to_ids(heads.token_strings()[0])
        heads = IntrospectionHeads(first, heads.reward_bins, heads.length_edges)
        if list(heads.token_ids) != tokenizer.convert_tokens_to_ids(heads.token_strings()):
            raise RuntimeError("the head tokens did not get consecutive ids")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = torch.tensor(weights, dtype=torch.float32)  # cast to the model's dtype below
    with torch.no_grad():
        output = model.get_output_embeddings().weight
        output[list(heads.token_ids)] = rows.to(output.dtype)
        inputs = model.get_input_embeddings().weight
        if inputs.data_ptr() != output.data_ptr():  # untied: these ids are never inputs; keep them unremarkable
            inputs[list(heads.token_ids)] = inputs[: heads.first_token_id].mean(dim=0).to(inputs.dtype)
    model.config.vocab_size = len(tokenizer)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    heads.save(out)
    return heads


def train(config: HeadsConfig) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model_registry import resolve_model
    from server.prompt_rendering import HFPromptRenderer

    torch.manual_seed(config.seed)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    requests, feedback, stats = load_journal(config.traces)
    sequences, skipped = collect_sequences(requests, feedback, config)
    if config.max_sequences is not None:
        sequences = sequences[: config.max_sequences]
    train_set = [s for s in sequences if not is_held_out(s.prompt, config.held_out, config.seed)]
    held_set = [s for s in sequences if is_held_out(s.prompt, config.held_out, config.seed)]
    print(
        f"read {stats.records} records ({stats.skipped_lines} torn lines skipped): {len(requests)} requests, "
        f"{len(sequences)} candidates with a reward ({len(train_set)} train, {len(held_set)} held out); "
        f"skipped {skipped}"
    )
    if len(train_set) < 4:
        raise SystemExit(f"only {len(train_set)} training sequences: run `ponder heads bootstrap` first")

    base_path = resolve_model(config.base_model).path
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    # bf16, as the server runs it: the hidden states the rows are fit on are the ones they will see (and on a CPU
    # with bf16 instructions the frozen forward pass is several times faster than fp32)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16).eval()
    renderer = HFPromptRenderer(tokenizer)
    heads_in_base = IntrospectionHeads.load(base_path)
    heads = heads_in_base or IntrospectionHeads(
        first_token_id=len(tokenizer),
        reward_bins=config.reward_bins,
        length_edges=default_length_edges(config.max_tokens),
    )

    started = time.monotonic()
    train_hidden = hidden_states(model, renderer, train_set, config.forward_batch)
    held_hidden = hidden_states(model, renderer, held_set, config.forward_batch)
    hidden = np.concatenate(train_hidden)
    targets = np.concatenate([position_targets(heads, len(s.token_ids), s.reward) for s in train_set])
    init = prior_init(hidden, targets, heads.size)
    weights, losses = fit_heads(hidden, targets, init, config)
    weights = torch.tensor(weights).to(torch.bfloat16).float().numpy()  # what the served bf16 model computes

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = write_checkpoint(model, tokenizer, heads_in_base, weights, heads, out)
    held_rewards = [s.reward for s in held_set]
    report = {
        "base_model": str(base_path),
        "traces": config.traces,
        "config": asdict(config),
        "heads": {
            "first_token_id": heads.first_token_id,
            "reward_bins": heads.reward_bins,
            "length_edges": [e if math.isfinite(e) else None for e in heads.length_edges],
        },
        "train": {
            "sequences": len(train_set),
            "positions": len(targets),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "prior_loss": prior_loss(init, hidden, targets),
            "seconds": round(time.monotonic() - started, 1),
        },
        "held_out": calibration_report(heads, weights, held_hidden, held_rewards),
        "held_out_prior": calibration_report(heads, init, held_hidden, held_rewards),
        "created": time.time(),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    plot_reliability(report["held_out"], out / PLOT_FILE, "introspection heads, held-out prompts")
    print_summary(report)
    return report


def prior_loss(weights: np.ndarray, hidden: np.ndarray, targets: np.ndarray) -> float:
    logits = hidden @ weights.T
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].mean())


def print_summary(report: Mapping[str, Any]) -> None:
    held, prior = report["held_out"], report["held_out_prior"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"train loss {report['train']['prior_loss']:.3f} (prior) -> {report['train']['last_loss']:.3f}")
    print(
        f"held out: {held['sequences']} sequences, {held['positions']} positions, correct {fmt(held['correct_share'])}"
    )
    for stage in ("start", "middle", "end"):
        print(f"  AUROC {stage:>6}: {fmt(held['auroc'][stage])}   ECE {fmt(held['ece'][stage])}")
    print(f"  length bin accuracy {fmt(held['length_bin_accuracy'])} (prior {fmt(prior['length_bin_accuracy'])})")
    print(
        f"  remaining-length MAE {fmt(held['remaining_mae_tokens'])} tokens"
        f" (prior {fmt(prior['remaining_mae_tokens'])},"
        f" median-length guess {fmt(held['remaining_mae_tokens_median_baseline'])})"
    )


# ----------------------------------------------------------------------------------------------- bootstrap
@dataclass
class BootstrapConfig:
    work_dir: str = field(default="runs/heads", metadata={"help": "Traces and logs go under this directory."})
    base_model: str | None = field(default=None, metadata={"help": "Embedded name or local directory."})
    task_kind: str = field(default="multiplication", metadata={"help": "Generated task family."})
    count: int = field(default=200, metadata={"help": "Generated tasks."})
    seed: int = field(default=1, metadata={"help": "Seed of the tasks (keep it apart from the evaluation seeds)."})
    data: str | None = field(default=None, metadata={"help": "JSONL tasks instead of generated ones."})
    skip: int = field(default=0, metadata={"help": "Skip the first N tasks of --data (they are held out)."})
    limit: int | None = field(default=None, metadata={"help": "Use at most N tasks of --data."})
    strategy: str = field(default="self_consistency:n=8", metadata={"help": "Strategy that samples the traces."})
    max_tokens: int = field(default=256, metadata={"help": "max_tokens of every request."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight."})
    serve_args: str = field(default="", metadata={"help": "Extra `ponder serve` flags."})


def bootstrap(config: BootstrapConfig) -> Path:
    """Serve the base model with its own journal and run the task set through it with the reference attached."""
    import shlex

    from training.evaluate import EvalConfig, run_eval, summarize
    from training.server_process import ServerProcess
    from training.tasks import generate_tasks, load_tasks, write_tasks

    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks(config.data) if config.data else generate_tasks(config.task_kind, config.count, config.seed)
    tasks = tasks[config.skip :][: config.limit] if config.data else tasks
    task_file = work / "bootstrap-tasks.jsonl"
    write_tasks(tasks, task_file)
    traces = work / "traces"
    with ServerProcess(
        config.base_model, traces, work / "bootstrap-server.log", tuple(shlex.split(config.serve_args))
    ) as server:
        eval_config = EvalConfig(
            base_url=server.base_url,
            data=str(task_file),
            strategies=[config.strategy],
            max_tokens=config.max_tokens,
            concurrency=config.concurrency,
            output_dir=str(work / "bootstrap"),
        )
        summary = summarize(asyncio.run(run_eval(eval_config)))
    print(json.dumps(summary, indent=2))
    print(f"traces in {traces}: next, `ponder heads train --traces {traces}`")
    return traces


USAGE = """usage: ponder heads {bootstrap,train} [flags]

  bootstrap  serve the base model and run a seeded task set through it, with the reference, to make traces
  train      train the introspection heads from a trace journal and write a servable model directory
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("bootstrap", "train"):
        print(USAGE, file=sys.stderr if argv else sys.stdout)
        return 2 if argv else 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv[0] == "bootstrap":
        parser = parser_from_dataclass(BootstrapConfig, "ponder heads bootstrap", "Make head-training traces.")
        bootstrap(BootstrapConfig(**vars(parser.parse_args(argv[1:]))))
        return 0
    parser = parser_from_dataclass(HeadsConfig, "ponder heads train", "Train the introspection heads.")
    train(HeadsConfig(**vars(parser.parse_args(argv[1:]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
