"""Adaptive budget steered by the model's own introspection (after ZIP-RC: "Zero-overhead Introspective
Prediction of Reward and Cost").

At every token the model's heads predict the joint of (final reward, tokens left) for its sample. So:

    1. start k0 samples
    2. every K tokens read each sample's joint; for a set S of samples the utility is
           U(S) = E[max reward over S] - beta * (alpha * tokens_norm + (1 - alpha) * latency_norm)
       with E[max] from order statistics of the predicted reward marginals, tokens = the expected tokens still to
       generate and latency = the expected longest remaining sample, both in units of max_tokens (one full-length
       sample), so beta is the expected reward a full sample's worth of compute must buy
    3. compare the sets the meta-actions lead to: stop (answer from the finished samples), continue all, prune
       one sample, branch a promising prefix into more samples (prefix cache), start a new sample; take the best
       until none beats continuing or stopping
    4. answer with the finished sample of highest expected reward (or a vote weighted by it)

Costs count only what is still to come: what is spent is spent whatever the action. Every decision goes into the
trace with the numbers behind it. Needs a model with heads (`ponder heads train`); on one without, a 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from server.engine import TOKEN_IDS, TRACKED_LOGPROBS, Generation, SamplingOptions
from server.introspection import IntrospectionHeads
from strategies.base import (
    Candidate,
    Prompt,
    Result,
    Strategy,
    StrategyContext,
    StrategyOptions,
    argmax,
    register_strategy,
)
from strategies.options import max_samples_within_cap, search_temperature
from strategies.tree_search import value_weighted_vote
from verifiers.answer_extraction import extract_answer, normalize_answer
from verifiers.introspection import NO_HEADS

MAX_CHANGES_PER_DECISION = 4  # prune/branch/new actions taken at one decision point before generating again


class AdaptiveOptions(StrategyOptions):
    beta: float = Field(0.3, ge=0.0, description="price of compute in reward units: higher spends less")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="share of the price on tokens; the rest on latency")
    k0: int = Field(2, ge=1, description="samples started at once")
    chunk_tokens: int = Field(16, ge=1, le=4096, description="K: tokens generated between decisions")
    max_samples: int | None = Field(
        None, ge=1, validate_default=True, description="samples (and branches) in all; default min(8, server cap)"
    )
    max_total_tokens: int | None = Field(
        None, ge=1, description="tokens in all before it must stop; default max_samples x max_tokens"
    )
    branch_width: int = Field(2, ge=1, description="new samples forked from a prefix when branching")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default as in best_of_n")
    answer: Literal["best", "vote"] = Field("best", description="highest expected reward, or a vote weighted by it")

    @field_validator("max_samples")
    @classmethod
    def within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        return max_samples_within_cap(value, info, default=8)

    @model_validator(mode="after")
    def needs_heads(self, info: ValidationInfo) -> AdaptiveOptions:
        if (info.context or {}).get("has_introspection") is False:
            raise ValueError(f"strategy 'adaptive' needs introspection heads; {NO_HEADS}")
        if self.max_samples is not None and self.k0 > self.max_samples:
            raise ValueError(f"k0={self.k0} is more than max_samples={self.max_samples}")
        return self


# ----------------------------------------------------------------------------------------------- the math
def expected_max(values: Sequence[np.ndarray], probs: Sequence[np.ndarray]) -> float:
    """E[max_i X_i] of independent discrete X_i, X_i = values[i][k] with probability probs[i][k]; 0 for none.

    P(max <= v) is the product of every P(X_i <= v), evaluated on the union of their supports."""
    if not values:
        return 0.0
    grid = np.unique(np.concatenate(values))
    cdf_of_max = np.ones_like(grid, dtype=np.float64)
    for v, p in zip(values, probs):
        cdf_of_max *= np.array([p[v <= g].sum() for g in grid])
    return float(grid @ np.diff(cdf_of_max, prepend=0.0))


@dataclass(frozen=True)
class Outlook:
    """What the heads predict for one sample: its final reward and (if it is still going) its remaining length."""

    reward: np.ndarray  # (R,) marginal
    remaining: np.ndarray  # (L,) marginal
    remaining_values: np.ndarray  # (L,) tokens each length bin stands for, capped at what the sample may still write
    finished: bool

    @classmethod
    def of(cls, heads: IntrospectionHeads, joint: np.ndarray, tokens_left: int, finished: bool) -> Outlook:
        values = np.minimum(heads.length_values, max(tokens_left, 0))
        return cls(joint.sum(axis=1), joint.sum(axis=0), values, finished)

    @property
    def expected_remaining(self) -> float:
        return 0.0 if self.finished else float(self.remaining @ self.remaining_values)


@dataclass(frozen=True)
class Utility:
    value: float
    expected_best: float
    tokens: float
    latency: float


def utility(
    outlooks: Sequence[Outlook],
    reward_values: np.ndarray,
    *,
    beta: float,
    alpha: float,
    token_scale: float,
    latency_scale: float,
) -> Utility:
    """U(S) for the set of samples S: expected best reward minus the priced expected future cost."""
    best = expected_max([reward_values] * len(outlooks), [o.reward for o in outlooks])
    going = [o for o in outlooks if not o.finished]
    tokens = sum(o.expected_remaining for o in going)
    latency = expected_max([o.remaining_values for o in going], [o.remaining for o in going])
    cost = alpha * tokens / token_scale + (1 - alpha) * latency / latency_scale
    return Utility(best - beta * cost, best, tokens, latency)


# ----------------------------------------------------------------------------------------------- the decisions
Action = tuple[str, int | None]  # ("stop" | "continue" | "prune" | "branch" | "new", sample index or None)
ACTION_ORDER = ("stop", "continue", "prune", "branch", "new")  # on equal utility, the cheaper, simpler action


def candidate_sets(
    outlooks: Sequence[Outlook], prior: Outlook, samples_left: int, branch_width: int
) -> dict[Action, list[Outlook]]:
    """The set of samples each available meta-action leads to, keyed by the action."""
    finished = [o for o in outlooks if o.finished]
    going = [i for i, o in enumerate(outlooks) if not o.finished]
    sets: dict[Action, list[Outlook]] = {}
    if finished:
        sets[("stop", None)] = finished
    if going:
        sets[("continue", None)] = list(outlooks)
    for i in going:
        rest = [o for j, o in enumerate(outlooks) if j != i]
        if any(not o.finished for o in rest) or finished:
            sets[("prune", i)] = rest
        if samples_left >= branch_width:
            sets[("branch", i)] = [*outlooks, *[outlooks[i]] * branch_width]
    if samples_left >= 1:
        sets[("new", None)] = [*outlooks, prior]
    return sets


def choose_action(
    outlooks: Sequence[Outlook],
    prior: Outlook,
    heads: IntrospectionHeads,
    options: AdaptiveOptions,
    samples_left: int,
    token_scale: float,
    latency_scale: float,
) -> tuple[Action, dict[Action, Utility]]:
    """The action whose resulting set has the highest utility, and every action's utility (for the trace)."""
    sets = candidate_sets(outlooks, prior, samples_left, options.branch_width)
    utilities = {
        action: utility(
            chosen,
            heads.reward_values,
            beta=options.beta,
            alpha=options.alpha,
            token_scale=token_scale,
            latency_scale=latency_scale,
        )
        for action, chosen in sets.items()
    }
    best = max(utilities, key=lambda a: (round(utilities[a].value, 12), -ACTION_ORDER.index(a[0])))
    return best, utilities


# ----------------------------------------------------------------------------------------------- the samples
@dataclass
class Path:
    """One sample as it grows chunk by chunk; a branch starts as a copy of its parent's prefix."""

    index: int
    parent: int | None
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprob: float = 0.0
    tracked: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # None while it goes on; "pruned" when the strategy dropped it
    born_at: int = 0  # tokens of the prefix it inherited

    @property
    def going(self) -> bool:
        return self.finish_reason is None

    @property
    def answerable(self) -> bool:
        return self.finish_reason in ("stop", "length")

    def extend(self, chunk: Generation, tokens_cap: int) -> None:
        self.token_ids += chunk.token_ids
        self.text += chunk.text
        self.logprob += chunk.cumulative_logprob
        self.tracked.extend(chunk.tracked_logprobs)
        if chunk.finish_reason != "length":
            self.finish_reason = chunk.finish_reason
        elif len(self.token_ids) >= tokens_cap:
            self.finish_reason = "length"

    def fork(self, index: int) -> Path:
        parent = self.index if self.index >= 0 else None
        born_at = len(self.token_ids)
        return Path(index, parent, self.token_ids, self.text, self.logprob, list(self.tracked), None, born_at)

    def generation(self) -> Generation:
        reason = self.finish_reason if self.finish_reason in ("stop", "length") else "abort"
        return Generation(self.text, self.token_ids, reason, self.logprob, tracked_logprobs=tuple(self.tracked))


class AdaptiveRun:
    """One request's samples, the engine calls that grow them, and the log of decisions."""

    def __init__(self, ctx: StrategyContext, prompt: Prompt, options: AdaptiveOptions) -> None:
        heads = ctx.engine.introspection
        if heads is None:
            raise RuntimeError(NO_HEADS)  # validation refuses such a request first
        self.ctx, self.prompt, self.options, self.heads = ctx, prompt, options, heads
        self.max_tokens = min(ctx.sampling.max_tokens, ctx.budget.max_tokens)
        self.token_cap = options.max_total_tokens or ctx.budget.max_samples * self.max_tokens
        self.sampling = ctx.sampling.replace(
            temperature=search_temperature(options.temperature, ctx.sampling.temperature),
            logprob_token_ids=heads.token_ids,
        )
        self.paths: list[Path] = []
        self.prompt_joint: np.ndarray | None = None
        self.decisions: list[dict[str, Any]] = []

    # -- engine calls
    def chunk_options(self, path: Path) -> SamplingOptions:
        room = self.max_tokens - len(path.token_ids)
        return self.sampling.replace(max_tokens=max(1, min(self.options.chunk_tokens, room)))

    async def grow(self, path: Path, n: int, kind: str) -> list[Path]:
        """n chunks after `path`'s tokens: the path itself grows (kind "continue"), or n new paths fork from it."""
        chunks = await self.ctx.sample(self.prompt.token_ids + path.token_ids, n, self.chunk_options(path), kind=kind)
        grown = [path] if kind == "continue" else [self.add(path.fork(0)) for _ in chunks]
        for p, chunk in zip(grown, chunks):
            p.extend(chunk, self.max_tokens)
            if self.prompt_joint is None and not path.token_ids and chunk.tracked_logprobs:
                self.prompt_joint = self.heads.joint(chunk.tracked_logprobs[0])
        return grown

    def add(self, path: Path) -> Path:
        path.index = len(self.paths)
        self.paths.append(path)
        return path

    def samples_left(self) -> int:
        return self.ctx.budget.max_samples - self.ctx.samples_drawn

    # -- what the heads say
    def outlook(self, path: Path) -> Outlook:
        joint = self.heads.joint(path.tracked[-1]) if path.tracked else self.prior_joint()
        return Outlook.of(self.heads, joint, self.max_tokens - len(path.token_ids), not path.going)

    def prior_joint(self) -> np.ndarray:
        if self.prompt_joint is not None:
            return self.prompt_joint
        return np.full((self.heads.reward_bins, self.heads.length_bins), 1.0 / self.heads.size)

    def expected_reward(self, path: Path) -> float:
        return float(self.outlook(path).reward @ self.heads.reward_values)

    # -- the loop
    async def run(self) -> str:
        root = Path(-1, None)
        await self.grow(root, self.options.k0, kind="sample")
        while True:
            stopped = await self.decide()
            if stopped:
                return stopped
            going = [p for p in self.paths if p.going]
            await asyncio.gather(*(self.grow(p, 1, kind="continue") for p in going))

    async def decide(self) -> str | None:
        """Take meta-actions until the best is to continue (None) or to stop (the reason)."""
        for _ in range(MAX_CHANGES_PER_DECISION + 1):
            live = [p for p in self.paths if p.going or p.answerable]
            if not any(p.going for p in live) and not self.samples_left():
                return "all samples finished"
            if self.ctx.generated_tokens >= self.token_cap:
                return self.out_of_tokens(live)
            outlooks = [self.outlook(p) for p in live]
            prior = Outlook.of(self.heads, self.prior_joint(), self.max_tokens, finished=False)
            action, utilities = choose_action(
                outlooks, prior, self.heads, self.options, self.samples_left(), self.max_tokens, self.max_tokens
            )
            self.log_decision(live, outlooks, utilities, action)
            kind, i = action
            if kind == "stop":
                for p in live:
                    if p.going:
                        p.finish_reason = "pruned"
                return "no action beats stopping"
            if kind == "continue":
                return None
            if kind == "prune":
                live[i].finish_reason = "pruned"
            elif kind == "branch":
                await self.grow(live[i], self.options.branch_width, kind="branch")
            elif kind == "new":
                await self.grow(Path(-1, None), 1, kind="sample")
        return None

    def out_of_tokens(self, live: list[Path]) -> str | None:
        """Past max_total_tokens: stop if there is an answer, else finish only the most promising sample."""
        going = [p for p in live if p.going]
        if any(p.answerable for p in live) or not going:
            for p in going:
                p.finish_reason = "pruned"
            return "token budget spent"
        keep = going[argmax([self.expected_reward(p) for p in going])]
        for p in going:
            if p is not keep:
                p.finish_reason = "pruned"
        return None

    def log_decision(
        self, live: list[Path], outlooks: list[Outlook], utilities: dict[Any, Utility], action: Action
    ) -> None:
        def label(a: Action) -> str:
            return a[0] if a[1] is None else f"{a[0]} {live[a[1]].index}"

        self.decisions.append(
            {
                "tokens": self.ctx.generated_tokens,
                "samples": [
                    {
                        "index": p.index,
                        "tokens": len(p.token_ids),
                        "finished": not p.going,
                        "expected_reward": round(float(o.reward @ self.heads.reward_values), 4),
                        "expected_remaining": round(o.expected_remaining, 1),
                    }
                    for p, o in zip(live, outlooks)
                ],
                "utilities": {
                    label(a): {
                        "utility": round(u.value, 4),
                        "expected_best": round(u.expected_best, 4),
                        "tokens": round(u.tokens, 1),
                        "latency": round(u.latency, 1),
                    }
                    for a, u in utilities.items()
                },
                "action": label(action),
            }
        )

    # -- the answer
    def result(self, stopped: str) -> Result:
        candidates, values, answers = [], [], []
        for p in self.paths:
            value = self.expected_reward(p)
            answer = extract_answer(p.text) if p.answerable else None
            candidates.append(Candidate(p.index, p.generation(), scores={"introspection": value}, answer=answer))
            values.append(value if p.answerable else -1.0)
            answers.append(normalize_answer(answer) if answer is not None else None)
        chosen = value_weighted_vote(answers, values) if self.options.answer == "vote" else argmax(values)
        details = {
            "stopped": stopped,
            "paths": [
                {
                    "index": p.index,
                    "parent": p.parent,
                    "born_at": p.born_at,
                    "tokens": len(p.token_ids),
                    "finish_reason": p.finish_reason,
                }
                for p in self.paths
            ],
            "decisions": self.decisions,
        }
        return Result(tuple(candidates), chosen=(chosen,), details=details)


@register_strategy
class Adaptive(Strategy):
    name = "adaptive"
    description = "samples started, pruned, branched and stopped by the model's own predicted reward and cost"
    requires = frozenset({TOKEN_IDS, TRACKED_LOGPROBS})  # forks samples by ids; reads the heads' log-probs
    Options = AdaptiveOptions

    async def run(self, ctx: StrategyContext, prompt: Prompt, options: AdaptiveOptions) -> Result:
        run = AdaptiveRun(ctx, prompt, options)
        ctx.snapshot = lambda: run.result("deadline")  # the paths as they stand, if time runs out
        stopped = await run.run()
        return run.result(stopped)

    def planned_samples(self, options: AdaptiveOptions, request_n: int) -> int:
        return int(options.max_samples or 8)
