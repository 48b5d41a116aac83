"""Best-of-N (rejection sampling against a verifier; e.g. Cobbe et al. 2021, "Training Verifiers").

1. draw N samples of the answer
2. score each with the chosen verifier
3. return the highest-scoring one (the first on ties)
"""

from __future__ import annotations

from pydantic import ValidationInfo, field_validator

from strategies.base import Candidate, Prompt, Result, Strategy, StrategyContext, argmax, register_strategy
from strategies.options import SampledOptions, check_verifier_name, search_temperature


class BestOfNOptions(SampledOptions):
    verifier: str = "logprob"

    @field_validator("verifier")
    @classmethod
    def known_verifier(cls, name: str, info: ValidationInfo) -> str:
        return check_verifier_name(name, info)


@register_strategy
class BestOfN(Strategy):
    name = "best_of_n"
    description = "n samples, each scored by a verifier; the best one is returned"
    Options = BestOfNOptions

    async def run(self, ctx: StrategyContext, prompt: Prompt, options: BestOfNOptions) -> Result:
        sampling = ctx.sampling.replace(temperature=search_temperature(options.temperature, ctx.sampling.temperature))
        generations = await ctx.sample(prompt.token_ids, options.n, sampling, answers=True)
        scores = await ctx.score(options.verifier, prompt, generations)
        candidates = tuple(
            Candidate(i, g, scores={options.verifier: s}) for i, (g, s) in enumerate(zip(generations, scores))
        )
        return Result(candidates, chosen=(argmax(scores),))
