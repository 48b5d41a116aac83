"""STaR rationalization (Zelikman et al. 2022): learn from the prompts the model could not solve.

    for every prompt with a reference answer and no kept candidate (`Selection.unsolved`):
        ask the served model again, with the reference given as a hint
        keep a rationale only if it finished, reaches the reference and does not mention the hint
    train on (the original prompt without the hint, the rationale): the model learns to get there unaided

The hinted requests go to a server with a journal of its own (`ponder loop --rationalize` starts one), so a
hinted prompt never becomes a training prompt. The kept rationales are written as JSONL that
`ponder distill --rationales FILE` adds to the SFT examples.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.selection import Example, UnsolvedPrompt, normalized_completion
from verifiers.answer_extraction import answers_match

REWARD_SOURCE = "rationalization"
HINT = (
    "\n\n(Hint: the correct final answer is {reference}. Work it out step by step and end with the final answer. "
    "Do not mention this hint.)"
)


@dataclass(frozen=True)
class RationalizeConfig:
    samples: int = 4  # rationales asked for per unsolved prompt
    max_per_prompt: int = 2  # kept per prompt, like the selection's cap
    temperature: float = 0.8
    max_tokens: int = 256
    concurrency: int = 4  # requests in flight


@dataclass
class RationalizeReport:
    prompts: int = 0
    prompts_rationalized: int = 0
    samples: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "rejected": dict(self.rejected)}


# (hinted messages, samples wanted) -> [(text, finish_reason)]: one chat completion with n choices
Complete = Callable[[list[dict[str, Any]], int], list[tuple[str, str]]]


def hinted_messages(messages: Sequence[Mapping[str, Any]], reference: str) -> list[dict[str, Any]]:
    """The prompt with the hint appended to its last user turn (copies: the original stays the training prompt)."""
    hinted = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(hinted) if m.get("role") == "user")
    hinted[last_user]["content"] = f"{hinted[last_user].get('content') or ''}{HINT.format(reference=reference)}"
    return hinted


def rejection_reason(text: str, finish_reason: str, reference: str) -> str | None:
    """Why a rationale is not kept, or None if it is: it must finish, reach the reference, and not lean on the
    hint (a rationale that says "as the hint says" teaches nothing once the hint is gone)."""
    if finish_reason != "stop":
        return f"unfinished ({finish_reason})"
    if "hint" in text.lower():
        return "mentions the hint"
    if not answers_match(text, reference):
        return "misses the reference"
    return None


def rationales_for(
    unsolved: UnsolvedPrompt, samples: Iterable[tuple[str, str]], config: RationalizeConfig, report: RationalizeReport
) -> list[Example]:
    """The kept rationales of one prompt: distinct, at most `max_per_prompt`, each on the prompt without the hint."""
    kept: list[Example] = []
    seen: set[str] = set()
    for text, finish_reason in samples:
        report.samples += 1
        text = text.strip()
        reason = rejection_reason(text, finish_reason, unsolved.reference)
        if reason is None and normalized_completion(text) in seen:
            reason = "duplicate of a kept rationale"
        if reason is None and len(kept) >= config.max_per_prompt:
            reason = "over the per-prompt cap"
        if reason is not None:
            report.rejected[reason] += 1
            continue
        seen.add(normalized_completion(text))
        kept.append(Example(unsolved.prompt, text, 1.0, REWARD_SOURCE, unsolved.trace_id))
    return kept


def rationalize(
    unsolved: Sequence[UnsolvedPrompt], complete: Complete, config: RationalizeConfig
) -> tuple[list[Example], RationalizeReport]:
    """Ask for `config.samples` hinted rationales per unsolved prompt, `config.concurrency` prompts at a time."""
    report = RationalizeReport(prompts=len(unsolved))

    def ask(prompt: UnsolvedPrompt) -> list[tuple[str, str]]:
        return complete(hinted_messages(prompt.prompt, prompt.reference), config.samples)

    with ThreadPoolExecutor(max_workers=max(1, config.concurrency)) as pool:
        answers = list(pool.map(ask, unsolved))
    examples: list[Example] = []
    for prompt, samples in zip(unsolved, answers):
        kept = rationales_for(prompt, samples, config, report)
        report.prompts_rationalized += bool(kept)
        examples.extend(kept)
    report.kept = len(examples)
    return examples, report


def openai_complete(client: Any, model: str, config: RationalizeConfig) -> Complete:
    """A `Complete` over an OpenAI client of a Ponder server: one `single` request with n choices."""

    def complete(messages: list[dict[str, Any]], n: int) -> list[tuple[str, str]]:
        reply = client.chat.completions.create(
            model=model,
            messages=messages,
            n=n,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            extra_body={"strategy": "single"},
        )
        return [(choice.message.content or "", choice.finish_reason) for choice in reply.choices]

    return complete


def write_rationales(examples: Iterable[Example], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for example in examples:
            record = {"prompt": list(example.prompt), "completion": example.completion, "trace_id": example.trace_id}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def load_rationales(path: str | Path) -> list[Example]:
    examples = []
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                prompt = tuple(record["prompt"])
                examples.append(Example(prompt, record["completion"], 1.0, REWARD_SOURCE, record["trace_id"]))
    return examples
