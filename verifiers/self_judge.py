"""Self-judge (LLM-as-a-judge with the serving model itself, e.g. Zheng et al. 2023).

For each candidate, ask the same model whether it answers the question correctly and read P(yes) from the
log-probs of its first token, restricted to the yes/no tokens: one forward pass per candidate, no parsing of
generated text, and the prompt prefix is shared so vLLM's prefix cache does most of the work.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from server.engine import TRACKED_LOGPROBS, Generation
from strategies.base import Prompt, StrategyContext
from verifiers.base import Verifier, register_verifier

JUDGE_TEMPLATE = (
    "Question: {question}\n\nProposed answer: {answer}\n\nIs the proposed answer correct? Reply with Yes or No."
)
MAX_ANSWER_CHARS = 2000  # keep the judge prompt inside small context windows; the end holds the final answer
MAX_QUESTION_CHARS = 2000  # the question's end usually holds the actual ask
YES_WORDS = ("Yes", " Yes", "yes", " yes")
NO_WORDS = ("No", " No", "no", " no")


def single_token_ids(encode, words: Sequence[str]) -> tuple[int, ...]:
    """Ids of the words that are one token in this tokenizer (others cannot be read from one position)."""
    ids = {tuple(encode(w)) for w in words}
    return tuple(sorted({t[0] for t in ids if len(t) == 1}))


def p_yes(logprobs: dict[int, float], yes_ids: Sequence[int], no_ids: Sequence[int]) -> float:
    """P(yes) renormalized over the yes and no tokens only."""
    yes = sum(math.exp(logprobs[t]) for t in yes_ids if t in logprobs)
    no = sum(math.exp(logprobs[t]) for t in no_ids if t in logprobs)
    return yes / (yes + no) if yes + no > 0 else 0.5


@register_verifier
class SelfJudge(Verifier):
    name = "self_judge"
    description = "the serving model's own P(yes) that the candidate answers the question correctly"
    requires = frozenset({TRACKED_LOGPROBS})  # P(yes) read from the judge token's log-probs

    async def score(self, ctx: StrategyContext, prompt: Prompt, generations: Sequence[Generation]) -> list[float]:
        yes_ids = single_token_ids(ctx.encode, YES_WORDS)
        no_ids = single_token_ids(ctx.encode, NO_WORDS)
        options = ctx.sampling.replace(
            max_tokens=1, temperature=0.0, stop=(), logit_bias=(), logprob_token_ids=yes_ids + no_ids
        )

        async def judge(generation: Generation) -> float:
            answer = generation.text.strip()[-MAX_ANSWER_CHARS:]
            question = prompt.question.strip()[-MAX_QUESTION_CHARS:]
            message = {"role": "user", "content": JUDGE_TEMPLATE.format(question=question, answer=answer)}
            (verdict,) = await ctx.sample(ctx.render_chat([message]), 1, options, kind="judge")
            return p_yes(verdict.tracked_logprobs[0], yes_ids, no_ids) if verdict.tracked_logprobs else 0.5

        return list(await asyncio.gather(*(judge(g) for g in generations)))
