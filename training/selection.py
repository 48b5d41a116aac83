"""From served traces to training examples, ReST-EM style (Singh et al. 2023; STaR, Zelikman et al. 2022).

    1. read every request record and the feedback posted for it (torn lines skipped)
    2. give each candidate a reward: posted feedback, else a reference match, else a chosen verifier's score
    3. keep candidates whose reward clears the threshold, deduplicated, at most k per prompt;
       pair kept with rejected candidates of the same prompt for preference training (DPO);
       list the prompts with a reference that no candidate solved (for STaR rationalization)

Pure functions over plain dicts (the journal's records), so every rule is unit-testable without a model.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from server.trace_journal import ReadStats, read_records
from verifiers.answer_extraction import answers_match

RewardSource = Literal["auto", "feedback", "reference", "verifier"]


@dataclass(frozen=True)
class SelectionConfig:
    reward_source: RewardSource = "auto"  # auto: feedback, else reference, else the verifier's score
    verifier: str = "answer_agreement"  # the score used when the reward comes from a verifier
    threshold: float = 1.0  # keep candidates whose reward is at least this (1.0: verified correct only)
    max_per_prompt: int = 4  # ReST-EM caps examples per prompt so easy prompts do not dominate
    include_unfinished: bool = False  # candidates cut off by max_tokens are rarely worth imitating


@dataclass(frozen=True)
class Example:
    """One training example in TRL's conversational prompt-completion format."""

    prompt: tuple[Mapping[str, Any], ...]  # the chat messages the client sent
    completion: str
    reward: float
    reward_source: str
    trace_id: str


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Mapping[str, Any], ...]
    chosen: str
    rejected: str
    trace_id: str


@dataclass(frozen=True)
class UnsolvedPrompt:
    """A prompt with a reference answer none of whose candidates cleared the threshold: STaR rationalizes it."""

    prompt: tuple[Mapping[str, Any], ...]
    reference: str
    trace_id: str


@dataclass
class SelectionReport:
    requests: int = 0
    feedback_records: int = 0
    candidates: int = 0
    skipped_lines: int = 0
    prompts: int = 0
    prompts_with_an_example: int = 0
    kept: int = 0
    pairs: int = 0
    prompts_with_a_pair: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    reward_sources: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "rejected": dict(self.rejected), "reward_sources": dict(self.reward_sources)}


@dataclass(frozen=True)
class Selection:
    examples: list[Example]
    pairs: list[PreferencePair]
    report: SelectionReport
    unsolved: list[UnsolvedPrompt] = field(default_factory=list)


def load_journal(
    location: str, sealed_only: bool = False
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], ReadStats]:
    """Request records (status ok, with candidates) and feedback records grouped by trace id."""
    stats = ReadStats(segments=0, records=0, skipped_lines=0)
    requests, feedback = [], defaultdict(list)
    for record in read_records(location, sealed_only=sealed_only, stats=stats):
        if record.get("type") == "feedback":
            feedback[record["trace_id"]].append(record)
        elif record.get("type") == "request" and record.get("status") == "ok" and record.get("candidates"):
            requests.append(record)
    return requests, dict(feedback), stats


def candidate_reward(
    record: Mapping[str, Any],
    candidate: Mapping[str, Any],
    feedback: Sequence[Mapping[str, Any]],
    config: SelectionConfig,
) -> tuple[float, str] | None:
    """The reward of one candidate and where it came from, or None if the chosen source has nothing to say.

    Feedback rates the answer the client received, so its reward applies to the chosen candidate only; a
    reference posted with feedback grades every candidate, like a reference sent with the request.
    """
    chosen = candidate.get("index") in record.get("chosen_indices", [record.get("chosen_index")])
    reference = reference_of(record, feedback)
    rewards: dict[str, float] = {}
    if feedback and chosen:
        rewards["feedback"] = float(feedback[-1]["reward"])
    if reference:
        rewards["reference"] = 1.0 if answers_match(candidate["text"], reference) else 0.0
    verifier_score = candidate.get("scores", {}).get(config.verifier)
    if verifier_score is not None:  # the journal writes a non-finite score as null
        rewards["verifier"] = float(verifier_score)
    order = ("feedback", "reference", "verifier") if config.reward_source == "auto" else (config.reward_source,)
    for source in order:
        if source in rewards:
            return rewards[source], source
    return None


def reference_of(record: Mapping[str, Any], feedback: Sequence[Mapping[str, Any]]) -> str | None:
    """The reference answer of a request: the latest one posted with feedback, else the one sent with it."""
    posted = next((f["reference"] for f in reversed(feedback) if f.get("reference")), None)
    return posted or record.get("reference") or None


def prompt_key(messages: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([[m.get("role"), m.get("content")] for m in messages], ensure_ascii=False)


def normalized_completion(text: str) -> str:
    return " ".join(text.split())


def select_examples(
    requests: Iterable[Mapping[str, Any]],
    feedback: Mapping[str, Sequence[Mapping[str, Any]]],
    config: SelectionConfig,
) -> Selection:
    """Keep the good candidates of every prompt (deduplicated, capped) and pair them with the bad ones."""
    report = SelectionReport()
    by_prompt: dict[str, list[tuple[float, str, dict[str, Any], Mapping[str, Any]]]] = defaultdict(list)
    messages_of: dict[str, tuple[Mapping[str, Any], ...]] = {}
    reference_by_prompt: dict[str, tuple[str, str]] = {}  # prompt -> (reference, trace id), the last one seen
    for record in requests:
        report.requests += 1
        report.candidates += len(record["candidates"])
        messages = record.get("input", {}).get("messages")
        if not messages:
            report.rejected["not a chat request"] += len(record["candidates"])
            continue
        key = prompt_key(messages)
        messages_of[key] = tuple(messages)
        reference = reference_of(record, feedback.get(record["trace_id"], ()))
        if reference:
            reference_by_prompt[key] = (reference, record["trace_id"])
        for candidate in record["candidates"]:
            finish = candidate.get("finish_reason")
            if finish != "stop" and not config.include_unfinished:
                report.rejected[f"unfinished ({finish})"] += 1
                continue
            reward = candidate_reward(record, candidate, feedback.get(record["trace_id"], ()), config)
            if reward is None:
                report.rejected["no reward from the chosen source"] += 1
                continue
            by_prompt[key].append((reward[0], reward[1], dict(candidate), record))
    report.prompts = len(messages_of)
    examples: list[Example] = []
    pairs: list[PreferencePair] = []
    for key, scored in by_prompt.items():
        kept, rejected_texts, seen = [], [], set()
        for reward, source, candidate, record in sorted(scored, key=lambda item: -item[0]):
            text = candidate["text"].strip()
            if reward < config.threshold:
                report.rejected["reward below threshold"] += 1
                rejected_texts.append(text)
                continue
            if normalized_completion(text) in seen:
                report.rejected["duplicate of a kept completion"] += 1
                continue
            if len(kept) >= config.max_per_prompt:
                report.rejected["over the per-prompt cap"] += 1
                continue
            seen.add(normalized_completion(text))
            kept.append(Example(messages_of[key], text, reward, source, record["trace_id"]))
            report.reward_sources[source] += 1
        examples.extend(kept)
        prompt_pairs = preference_pairs(messages_of[key], kept, rejected_texts, config.max_per_prompt)
        pairs.extend(prompt_pairs)
        report.prompts_with_an_example += bool(kept)
        report.prompts_with_a_pair += bool(prompt_pairs)
    report.kept, report.pairs = len(examples), len(pairs)
    solved = {prompt_key(e.prompt) for e in examples}
    unsolved = [
        UnsolvedPrompt(messages_of[key], reference, trace_id)
        for key, (reference, trace_id) in reference_by_prompt.items()
        if key not in solved
    ]
    return Selection(examples, pairs, report, unsolved)


def preference_pairs(
    prompt: tuple[Mapping[str, Any], ...], kept: Sequence[Example], rejected: Sequence[str], max_pairs: int
) -> list[PreferencePair]:
    """Pair the kept completions of one prompt with its distinct rejected ones (best-rewarded rejects first).

    The shorter list is cycled, so a prompt the model mostly gets wrong (one right answer, seven wrong ones)
    gives several pairs (Pang et al. 2024, iterative RPO, pairs each correct answer with several wrong ones);
    at most `max_pairs`, and never a completion against itself.
    """
    kept_texts = {normalized_completion(e.completion) for e in kept}
    distinct: dict[str, str] = {}
    for text in rejected:
        distinct.setdefault(normalized_completion(text), text)
    losers = [text for norm, text in distinct.items() if norm not in kept_texts]
    if not kept or not losers:
        return []
    count = min(max_pairs, max(len(kept), len(losers)))
    return [
        PreferencePair(prompt, kept[i % len(kept)].completion, losers[i % len(losers)], kept[i % len(kept)].trace_id)
        for i in range(count)
    ]


def select_from_journal(location: str, config: SelectionConfig, sealed_only: bool = False) -> Selection:
    requests, feedback, stats = load_journal(location, sealed_only)
    selection = select_examples(requests, feedback, config)
    selection.report.feedback_records = sum(len(v) for v in feedback.values())
    selection.report.skipped_lines = stats.skipped_lines
    return selection


def to_sft_rows(examples: Iterable[Example]) -> list[dict[str, Any]]:
    """TRL's conversational prompt-completion rows: the loss falls on the completion only."""
    return [
        {"prompt": [dict(m) for m in e.prompt], "completion": [{"role": "assistant", "content": e.completion}]}
        for e in examples
    ]


def to_preference_rows(pairs: Iterable[PreferencePair]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": [dict(m) for m in p.prompt],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in pairs
    ]
