"""The baseline: one call to the engine, the request's own `n` samples returned as they are.

It is also the only strategy that streams token by token, since nothing has to be chosen first.
"""

from __future__ import annotations

from strategies.base import Candidate, Prompt, Result, Strategy, StrategyContext, StrategyOptions, register_strategy


@register_strategy
class Single(Strategy):
    name = "single"
    description = "one generation per requested choice, streamed token by token"
    returns_every_sample = True
    reads_logprobs = False  # nothing is chosen, so nothing is scored

    async def run(self, ctx: StrategyContext, prompt: Prompt, options: StrategyOptions) -> Result:
        n = ctx.budget.max_samples
        if ctx.streaming:
            generations = await ctx.stream_samples(prompt.token_ids, n)
        else:
            generations = await ctx.sample(prompt.token_ids, n, answers=True)
        candidates = tuple(Candidate(i, g) for i, g in enumerate(generations))
        return Result(candidates, chosen=tuple(range(n)), streamed=ctx.streaming)
