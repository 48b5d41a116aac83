"""Introspection: the model's own predicted final reward, read from its reward/cost heads (after ZIP-RC).

Score = the expected reward of the joint at the candidate's last token. A sample drawn on a model with heads
already carries that joint (vLLM returned it in the same forward pass), so scoring costs nothing. A candidate
without it (a streamed sample, say) is continued for one token with the heads tracked: the first position's
joint is the candidate's, and the prefix cache makes that a cheap prefill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from server.engine import TRACKED_LOGPROBS, Engine, Generation
from server.introspection import IntrospectionHeads
from strategies.base import Prompt, StrategyContext
from verifiers.base import Verifier, register_verifier

NO_HEADS = "the served model has no introspection heads: train them with `ponder heads train` and serve that checkpoint"


def heads_of(ctx: StrategyContext) -> IntrospectionHeads:
    heads = getattr(ctx.engine, "introspection", None)
    if heads is None:
        raise RuntimeError(NO_HEADS)  # option validation refuses such a request first; this is a bug guard
    return heads


async def final_joint_logprobs(ctx: StrategyContext, prompt: Prompt, generation: Generation) -> dict[int, float]:
    """The heads' log-probs at the generation's last token: free if it was sampled with them, else one probe."""
    heads = heads_of(ctx)
    if generation.tracked_logprobs and any(t in generation.tracked_logprobs[-1] for t in heads.token_ids):
        return generation.tracked_logprobs[-1]
    probe = ctx.sampling.replace(max_tokens=1, temperature=0.0, stop=(), logprob_token_ids=heads.token_ids)
    (step,) = await ctx.sample(prompt.token_ids + generation.token_ids, 1, probe, kind="probe")
    return step.tracked_logprobs[0]


@register_verifier
class Introspection(Verifier):
    name = "introspection"
    description = "the model's own expected final reward, from its introspection heads (no extra engine pass)"
    requires = frozenset({TRACKED_LOGPROBS})

    def unavailable_reason(self, engine: Engine) -> str | None:
        return None if getattr(engine, "introspection", None) is not None else NO_HEADS

    async def score(self, ctx: StrategyContext, prompt: Prompt, generations: Sequence[Generation]) -> list[float]:
        heads = heads_of(ctx)
        positions = await asyncio.gather(*(final_joint_logprobs(ctx, prompt, g) for g in generations))
        return [heads.expected_reward(heads.joint(p)) for p in positions]
