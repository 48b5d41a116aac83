"""Reflection: draft, critique, revise (Self-Refine, Madaan et al. 2023; RISE, Qu et al. 2024).

1. draft an answer to the request as it came
2. get feedback on it: a verifier's own (failing tests, unmet checklist items) if it gives any, else the model's
   review of its answer; stop if the review says CORRECT
3. revise with that feedback; stop when the verifier's score passes `threshold` or stops improving, or at
   `max_rounds` answers. Answer with the last round (with a verifier, the best-scoring), or the majority (RISE m1@t)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from server.engine import Generation, SamplingOptions
from strategies.base import (
    Candidate,
    Prompt,
    Result,
    Strategy,
    StrategyContext,
    StrategyOptions,
    argmax,
    cap_from_context,
    register_strategy,
)
from strategies.options import check_verifier_name
from strategies.self_consistency import majority_choice
from verifiers.answer_extraction import extract_answer, normalize_answer
from verifiers.base import Verdict

REVIEW_REQUEST = "Review this answer. If it is correct, say CORRECT; otherwise explain the mistake."
REVISE_REQUEST = "Write an improved answer."
REVIEW_MAX_TOKENS = 256  # a review is a few sentences; small models ramble on past that
MAX_FEEDBACK_CHARS = 1000  # of the feedback kept in the trace
_NEGATED = re.compile(r"incorrect|not\s+(?:\w+\s+)?correct|n't\s+(?:\w+\s+)?correct", re.IGNORECASE)
_SHOUTED = re.compile(r"\bCORRECT\b")


class ReflectionOptions(StrategyOptions):
    max_rounds: int = Field(3, ge=1, le=16, description="answers at most: the draft and up to max_rounds-1 revisions")
    verifier: str | None = Field(None, description="scores each round's answer; its feedback drives the revision")
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="a verifier score that ends the rounds")
    patience: int = Field(1, ge=1, description="rounds without a better verifier score before stopping")
    vote: bool = Field(False, description="answer with the majority final answer over the rounds (RISE m1@t)")

    @field_validator("verifier")
    @classmethod
    def known_verifier(cls, name: str | None, info: ValidationInfo) -> str | None:
        return None if name is None else check_verifier_name(name, info)

    @model_validator(mode="after")
    def within_cap(self, info: ValidationInfo) -> ReflectionOptions:
        cap = cap_from_context(info, "max_samples")
        if cap is not None and planned_samples(self.max_rounds) > cap:
            raise ValueError(
                f"max_rounds={self.max_rounds} needs up to {planned_samples(self.max_rounds)} samples (a draft, then "
                f"a review and a revision per round), over this server's cap of {cap} samples per request"
            )
        return self


def planned_samples(max_rounds: int) -> int:
    return 1 + 2 * (max_rounds - 1)


def says_correct(feedback: str) -> bool:
    """Whether a review accepts the answer: CORRECT (or a review that opens with "Correct"), never negated."""
    if _NEGATED.search(feedback):
        return False
    return bool(_SHOUTED.search(feedback)) or feedback.lstrip(" *#>\"'`").lower().startswith("correct")


def stalled(scores: Sequence[float], patience: int) -> bool:
    """Whether none of the last `patience` scores beat the best one before them."""
    if len(scores) <= patience:
        return False
    best_before = max(scores[:-patience])
    return all(score <= best_before for score in scores[-patience:])


def stop_reason(scores: Sequence[float | None], options: ReflectionOptions) -> str | None:
    """Why the rounds end after scoring the latest answer, or None to go on."""
    if scores[-1] is not None:
        if scores[-1] >= options.threshold:
            return "threshold"
        if stalled([s for s in scores if s is not None], options.patience):
            return "no_improvement"
    return "max_rounds" if len(scores) >= options.max_rounds else None


def review_messages(conversation: Sequence[Mapping[str, Any]], answer: str) -> list[Mapping[str, Any]]:
    return [*conversation, {"role": "assistant", "content": answer}, {"role": "user", "content": REVIEW_REQUEST}]


def revision_messages(conversation: Sequence[Mapping[str, Any]], answer: str, feedback: str) -> list[Mapping[str, Any]]:
    request = f"Feedback on your answer:\n{feedback.strip()}\n\n{REVISE_REQUEST}"
    return [*conversation, {"role": "assistant", "content": answer}, {"role": "user", "content": request}]


def final_choice(answers: Sequence[str | None], scores: Sequence[float | None], vote: bool) -> tuple[int, dict]:
    """The round to answer with, and the votes: the majority (ties to the better score, then the later round);
    else the best verifier score (the later round on ties); else the last round."""
    n = len(answers)
    rank = list(scores) if all(s is not None for s in scores) else [0.0] * n
    if vote:  # majority_choice prefers the first of equals: hand it the rounds latest first
        latest, votes = majority_choice(list(answers[::-1]), rank[::-1])
        return n - 1 - latest, votes
    return n - 1 - argmax(rank[::-1]), {}


async def verdict_on(ctx: StrategyContext, prompt: Prompt, answer: Generation, verifier: str | None) -> Verdict | None:
    if verifier is None:
        return None
    verdicts = await ctx.verifiers[verifier].verdicts(ctx, prompt, [answer])
    if len(verdicts) != 1:
        raise ValueError(f"verifier {verifier} gave {len(verdicts)} verdicts for 1 candidate")
    return verdicts[0]


async def reply(
    ctx: StrategyContext, messages: Sequence[Mapping[str, Any]], options: SamplingOptions, *, answer: bool = False
) -> Generation | None:
    """The model's next turn in a chat, or None when the chat leaves it no room in the context window.
    With `answer`, the turn is a new answer to the request (a revision), not a review."""
    ids = ctx.render_chat(messages)
    room = min(options.max_tokens, ctx.engine.max_model_len - len(ids))
    if room < 1:
        return None
    (turn,) = await ctx.sample(ids, 1, options.replace(max_tokens=room), answers=answer)
    return turn


async def feedback_on(
    ctx: StrategyContext, conversation: Sequence[Mapping[str, Any]], answer: Generation, verdict: Verdict | None
) -> tuple[str | None, str]:
    """(feedback, where from): the verifier's if it explained its score, else the model's review of the answer."""
    if verdict is not None and verdict.feedback:
        return verdict.feedback, "verifier"
    # the client's stop strings shape its answer, not the review of it
    options = ctx.sampling.replace(stop=(), max_tokens=min(REVIEW_MAX_TOKENS, ctx.sampling.max_tokens))
    review = await reply(ctx, review_messages(conversation, answer.text), options)
    return (review.text if review else None), "model"


def reflection_result(
    answers: Sequence[Generation],
    scores: Sequence[float | None],
    rounds: list[dict[str, Any]],
    options: ReflectionOptions,
) -> Result:
    extracted = [extract_answer(a.text) for a in answers]
    normalized = [normalize_answer(a) if a is not None else None for a in extracted]
    chosen, votes = final_choice(normalized, scores, options.vote)
    candidates = tuple(
        Candidate(i, a, scores={options.verifier: s} if options.verifier and s is not None else {}, answer=x)
        for i, (a, s, x) in enumerate(zip(answers, scores, normalized))
    )
    details: dict[str, Any] = {"rounds": rounds, "stopped_because": rounds[-1]["stopped_because"]}
    if options.vote:
        details["votes"] = votes
    return Result(candidates, chosen=(chosen,), details=details)


@register_strategy
class Reflection(Strategy):
    name = "reflection"
    description = "draft, review, revise: the model critiques and improves its own answer (Self-Refine)"
    Options = ReflectionOptions

    async def run(self, ctx: StrategyContext, prompt: Prompt, options: ReflectionOptions) -> Result:
        conversation = list(prompt.messages or ({"role": "user", "content": prompt.question},))
        (answer,) = await ctx.sample(prompt.token_ids, 1, answers=True)
        answers: list[Generation] = [answer]
        scores: list[float | None] = []
        rounds: list[dict[str, Any]] = []
        while True:
            verdict = await verdict_on(ctx, prompt, answer, options.verifier)
            scores.append(verdict.score if verdict else None)
            rounds.append({"round": len(answers), "score": scores[-1], "feedback": None, "feedback_from": None})
            if stopped := stop_reason(scores, options):
                break
            if ctx.budget.max_samples - ctx.samples_drawn < (1 if verdict and verdict.feedback else 2):
                stopped = "budget"  # feedback and a revision, or none
                break
            feedback, source = await feedback_on(ctx, conversation, answer, verdict)
            if feedback is None:
                stopped = "context_full"
                break
            rounds[-1] |= {"feedback": feedback[:MAX_FEEDBACK_CHARS], "feedback_from": source}
            if source == "model" and says_correct(feedback):
                stopped = "feedback_correct"
                break
            revision = await reply(
                ctx, revision_messages(conversation, answer.text, feedback), ctx.sampling, answer=True
            )
            if revision is None:
                stopped = "context_full"
                break
            answer = revision
            answers.append(answer)
        for record in rounds:
            record["stopped_because"] = None
        rounds[-1]["stopped_because"] = stopped
        return reflection_result(answers, scores, rounds, options)

    def planned_samples(self, options: ReflectionOptions, request_n: int) -> int:
        return planned_samples(options.max_rounds)
