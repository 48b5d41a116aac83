"""What a request whose deadline passed is answered with, when it asked for the best answer so far.

A request may set `deadline_s` and `on_deadline` (body fields, or the `X-Deadline` and `X-On-Deadline` headers).
When the deadline passes, the strategy's engine calls are cancelled and, with `on_deadline: "best_so_far"`,
the server builds a result from what the strategy has:

1. the strategy's own snapshot, if it keeps one (tree search: its tree; adaptive: its paths), or else
2. the whole answers it drew (`StrategyContext.answers_so_far`: each sample of best_of_n, self_consistency and
   single, reflection's draft and revisions, kept as they finished or as the deadline cut them):
   - a strategy that returns every sample (`single`) returns them all, in index order;
   - otherwise the finished answers vote, as in self-consistency, with ties going to the strategy's score, then
     the mean log-prob; with none finished, the longest cut one is returned.

With nothing drawn yet (no answer has a token), or with `on_deadline: "error"` (the default), the request is a 504
`deadline_exceeded`.
The result says what happened in `details["deadline"]`, which the trace keeps and the server turns into the
`X-Deadline-Exceeded` header. An answer the deadline cut reaches the client with finish_reason "length".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

from strategies.base import AnswerSoFar, Candidate, Result, StrategyContext
from verifiers.answer_extraction import extract_answer, normalize_answer

logger = logging.getLogger(__name__)

OnDeadline = Literal["error", "best_so_far"]
ON_DEADLINE_CHOICES: tuple[OnDeadline, ...] = ("error", "best_so_far")


def best_so_far(ctx: StrategyContext, returns_every_sample: bool) -> Result | None:
    """The result a request cut by its deadline returns, or None when it has nothing to return yet."""
    result = strategy_snapshot(ctx)
    source = "strategy"
    if result is None:
        result, source = result_from_answers(ctx.answers_so_far, returns_every_sample), "answers"
    if result is None:
        return None
    chosen = [result.candidates[i].generation for i in result.chosen]
    details = {
        "exceeded": True,
        "returned": "best_so_far",
        "from": source,
        "complete": all(g.finished for g in chosen),
        "answers_so_far": len(ctx.answers_so_far),
    }
    return dataclasses.replace(result, details={**result.details, "deadline": details})


def strategy_snapshot(ctx: StrategyContext) -> Result | None:
    if ctx.snapshot is None:
        return None
    try:
        return ctx.snapshot()
    except Exception:  # e.g. a tree with no node yet: fall back to the answers, if any
        logger.debug("no snapshot for %s", ctx.request_id, exc_info=True)
        return None


def result_from_answers(answers: Sequence[AnswerSoFar], returns_every_sample: bool) -> Result | None:
    if not any(a.generation.num_tokens for a in answers):  # cut before their first token: nothing to return
        return None
    if returns_every_sample:
        by_index = {a.index: a for a in answers}  # one call: one answer per index
        ordered = [by_index[i] for i in sorted(by_index)]
        candidates = tuple(Candidate(k, a.generation) for k, a in enumerate(ordered))
        streamed = all(a.streamed for a in ordered)
        return Result(candidates, chosen=tuple(range(len(candidates))), streamed=streamed)
    candidates = tuple(
        Candidate(k, a.generation, scores={} if a.score is None else {"strategy": a.score}, answer=normalized(a))
        for k, a in enumerate(answers)
    )
    return Result(candidates, chosen=(pick_answer(answers),), details={"votes": vote_counts(answers)})


def normalized(answer: AnswerSoFar) -> str | None:
    extracted = extract_answer(answer.generation.text) if answer.complete else None
    return normalize_answer(extracted) if extracted is not None else None


def tie_score(answer: AnswerSoFar) -> tuple[float, float]:
    return (answer.score if answer.score is not None else float("-inf"), answer.generation.mean_logprob)


def pick_answer(answers: Sequence[AnswerSoFar]) -> int:
    """Majority vote over the finished answers (ties: score, then mean log-prob); with none finished, the
    longest cut one."""
    complete = [i for i, a in enumerate(answers) if a.complete]
    if not complete:
        return max(range(len(answers)), key=lambda i: (answers[i].generation.num_tokens, -i))
    groups: dict[str | None, list[int]] = {}
    for i in complete:
        groups.setdefault(normalized(answers[i]), []).append(i)
    voting = {k: v for k, v in groups.items() if k is not None} or groups  # no extracted answer: all tie

    def strength(members: list[int]) -> tuple[int, tuple[float, float]]:
        return len(members), max(tie_score(answers[i]) for i in members)

    members = max(voting.values(), key=strength)
    return max(members, key=lambda i: (tie_score(answers[i]), -i))


def vote_counts(answers: Sequence[AnswerSoFar]) -> dict[str, Any]:
    votes: dict[str, int] = {}
    for a in answers:
        if (key := normalized(a)) is not None:
            votes[key] = votes.get(key, 0) + 1
    return votes
