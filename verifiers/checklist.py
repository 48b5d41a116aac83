"""Checklist (TICK: Cook et al. 2024, "TICKing All the Boxes: Generated Checklists Improve LLM Evaluation").

1. the serving model turns the instruction into a few YES/NO questions (one greedy judge call per score() call)
2. for every candidate and question, the same model answers; P(yes) is read from the log-probs of its first
   token, restricted to the yes/no tokens, as the self-judge does (no parsing of generated text)
3. score = mean P(yes) over the questions; feedback = the questions with P(yes) < 0.5

The judge prompts put the candidate before the question, so one candidate's questions share a prefix that vLLM's
prefix cache computes once. Every engine call here counts as kind "judge": tokens, not samples.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from server.engine import TRACKED_LOGPROBS, Generation, SamplingOptions
from strategies.base import Prompt, StrategyContext
from verifiers.base import Verdict, Verifier, register_verifier
from verifiers.self_judge import NO_WORDS, YES_WORDS, p_yes, single_token_ids

MAX_ITEMS = 5  # TICK's checklists average 5-8 items; every item is one more judge call per candidate
CHECKLIST_MAX_TOKENS = 256  # room for MAX_ITEMS one-line questions
MAX_INSTRUCTION_CHARS = 2000  # the instruction's end usually holds the actual ask
MAX_RESPONSE_CHARS = 2000  # keep judge prompts inside small context windows; the end holds the conclusion
MAX_ITEM_CHARS = 300  # one question, not an essay
FALLBACK_ITEM = "Does the response fully and correctly follow the instruction?"

CHECKLIST_TEMPLATE = (
    "Write a checklist of at most {max_items} YES/NO questions for judging a response to the instruction below. "
    "Each question checks one requirement of the instruction, and a good response gets YES on every question. "
    "Reply with the numbered list only, one question per line.\n\nInstruction:\n{instruction}"
)
ITEM_TEMPLATE = (
    "Instruction:\n{instruction}\n\nResponse:\n{response}\n\nQuestion about the response: {item}\nReply with Yes or No."
)
_NUMBERED = re.compile(r"^\s*(?:\*\*)?(?:Q(?:uestion)?\s*)?\d{1,2}\s*[.):]\s*(?:\*\*)?\s*(.+?)\s*$", re.IGNORECASE)


def parse_checklist(text: str, max_items: int = MAX_ITEMS) -> list[str]:
    """The questions of a numbered list ("1. ...", "2) ...", "Q3: ..."): in order, no repeats, at most max_items."""
    items: list[str] = []
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if not match:
            continue
        item = match.group(1).replace("**", "").strip()[:MAX_ITEM_CHARS]
        if item and item not in items:
            items.append(item)
        if len(items) == max_items:
            break
    return items


@register_verifier
class Checklist(Verifier):
    name = "checklist"
    description = "mean P(yes) of the serving model over a checklist of YES/NO questions it wrote for the prompt"
    requires = frozenset({TRACKED_LOGPROBS})  # P(yes) per question, as the self-judge

    async def score(self, ctx: StrategyContext, prompt: Prompt, generations: Sequence[Generation]) -> list[float]:
        return [verdict.score for verdict in await self.verdicts(ctx, prompt, generations)]

    async def verdicts(self, ctx: StrategyContext, prompt: Prompt, generations: Sequence[Generation]) -> list[Verdict]:
        if not generations:
            return []
        instruction = prompt.question.strip()[-MAX_INSTRUCTION_CHARS:]
        items = await write_checklist(ctx, instruction)  # once per call: every candidate faces the same list
        yes_ids = single_token_ids(ctx.encode, YES_WORDS)
        no_ids = single_token_ids(ctx.encode, NO_WORDS)
        options = judge_options(ctx.sampling, max_tokens=1, logprob_token_ids=yes_ids + no_ids)

        async def answer(generation: Generation, item: str) -> float:
            response = generation.text.strip()[-MAX_RESPONSE_CHARS:]
            content = ITEM_TEMPLATE.format(instruction=instruction, response=response, item=item)
            ids = ctx.render_chat([{"role": "user", "content": content}])
            (verdict,) = await ctx.sample(ids, 1, options, kind="judge")
            return p_yes(verdict.tracked_logprobs[0], yes_ids, no_ids) if verdict.tracked_logprobs else 0.5

        async def judge(generation: Generation) -> Verdict:
            p = await asyncio.gather(*(answer(generation, item) for item in items))
            unmet = [f"- {item} (P(yes) = {q:.2f})" for item, q in zip(items, p) if q < 0.5]
            return Verdict(sum(p) / len(p), "unmet checklist items:\n" + "\n".join(unmet) if unmet else None)

        return list(await asyncio.gather(*(judge(g) for g in generations)))


def judge_options(sampling: SamplingOptions, **changes: object) -> SamplingOptions:
    """The request's sampling settings made greedy and neutral: no stop strings or biases of the caller."""
    return sampling.replace(temperature=0.0, stop=(), logit_bias=(), **changes)


async def write_checklist(ctx: StrategyContext, instruction: str) -> list[str]:
    """The model's YES/NO questions for this instruction; one generic question if it wrote no numbered list."""
    content = CHECKLIST_TEMPLATE.format(max_items=MAX_ITEMS, instruction=instruction)
    ids = ctx.render_chat([{"role": "user", "content": content}])
    room = ctx.engine.max_model_len - len(ids)
    if room < 16:
        raise ValueError(f"the checklist prompt takes {len(ids)} of the model's {ctx.engine.max_model_len} tokens")
    options = judge_options(ctx.sampling, max_tokens=min(CHECKLIST_MAX_TOKENS, room), logprob_token_ids=())
    (written,) = await ctx.sample(ids, 1, options, kind="judge")
    return parse_checklist(written.text) or [FALLBACK_ITEM]
