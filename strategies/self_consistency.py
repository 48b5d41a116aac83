"""Self-consistency (Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning").

1. draw N reasoning paths
2. extract each one's final answer
3. return a path whose answer is the most frequent; ties between answers, and the path within the
   winning answer, go to the highest tie-break verifier score
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import ValidationInfo, field_validator

from strategies.base import Candidate, Prompt, Result, Strategy, StrategyContext, argmax, register_strategy
from strategies.options import SampledOptions, check_verifier_name, search_temperature
from verifiers.answer_extraction import extract_answer, normalize_answer


class SelfConsistencyOptions(SampledOptions):
    tie_break: str = "logprob"

    @field_validator("tie_break")
    @classmethod
    def known_verifier(cls, name: str, info: ValidationInfo) -> str:
        return check_verifier_name(name, info)


def majority_choice(answers: list[str | None], tie_scores: list[float]) -> tuple[int, dict[str, int]]:
    """The index of the path to return and the vote count per answer.

    Votes go to normalized answers; paths without an answer do not vote. The winning answer is the most
    frequent, then the one with the best single tie-break score; within it, the best-scoring path wins.
    With no answers at all the best-scoring path wins.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, answer in enumerate(answers):
        if answer is not None:
            groups[answer].append(i)
    votes = {answer: len(members) for answer, members in groups.items()}
    if not groups:
        return argmax(tie_scores), votes
    winner = max(groups, key=lambda a: (len(groups[a]), max(tie_scores[i] for i in groups[a])))
    members = groups[winner]
    return members[argmax([tie_scores[i] for i in members])], votes


@register_strategy
class SelfConsistency(Strategy):
    name = "self_consistency"
    description = "n samples; the answer most of them reach wins (majority vote)"
    Options = SelfConsistencyOptions

    async def run(self, ctx: StrategyContext, prompt: Prompt, options: SelfConsistencyOptions) -> Result:
        sampling = ctx.sampling.replace(temperature=search_temperature(options.temperature, ctx.sampling.temperature))
        generations = await ctx.sample(prompt.token_ids, options.n, sampling, answers=True)
        raw_answers = [extract_answer(g.text) for g in generations]
        answers = [normalize_answer(a) if a is not None else None for a in raw_answers]
        tie_scores = await ctx.score(options.tie_break, prompt, generations)
        chosen, votes = majority_choice(answers, tie_scores)
        candidates = tuple(
            Candidate(i, g, scores={options.tie_break: s}, answer=a)
            for i, (g, s, a) in enumerate(zip(generations, tie_scores, answers))
        )
        return Result(candidates, chosen=(chosen,), details={"votes": votes})
