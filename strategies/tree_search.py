"""Step-level tree search over partial solutions, each valued by a verifier after every step.

beam (Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally"; huggingface/search-and-learn):
  1. sample N next steps (text up to `step_delimiter`), N/M from each of the M partial solutions kept
  2. value every new partial solution with a verifier; keep the best M (finished answers compete too)
  3. repeat until all M are finished, `max_steps` or the budget; that last step runs to the end of the answer
dvts (Beeching et al. 2024, diverse verifier tree search): the same as N/M independent subtrees of width 1.
mcts (Zhang et al. 2024, "ReST-MCTS*"): strategies/mcts.py.
A continuation is the prompt ids plus the partial solution's own token ids, so vLLM's prefix cache serves the fork.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from server.engine import TOKEN_IDS, Generation, SamplingOptions
from strategies import mcts
from strategies.base import (
    BudgetExceeded,
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
from strategies.options import check_verifier_name, max_samples_within_cap, search_temperature
from verifiers.answer_extraction import extract_answer, normalize_answer

MAX_NODE_CHARS = 300  # of a step's text in the trace's tree; the candidates carry every finished answer in full


class TreeSearchOptions(StrategyOptions):
    mode: Literal["beam", "dvts", "mcts"] = "beam"
    value: str = Field("logprob", description="verifier that values a partial solution")
    step_delimiter: str = Field("\n\n", min_length=1, description="a step ends with this string")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="of the steps; default as in best_of_n")
    answer: Literal["best", "vote"] = Field("best", description="best-valued finished answer, or value-weighted vote")
    max_samples: int | None = Field(
        None, ge=1, validate_default=True, description="samples the whole search may draw; default: the server's cap"
    )
    # beam and dvts
    n: int = Field(4, ge=1, description="samples per step, over all beams")
    beam_width: int = Field(2, ge=1, description="beams kept (beam); continuations per subtree and step (dvts)")
    max_steps: int = Field(8, ge=1, le=256)
    # mcts
    branch: int = Field(3, ge=1, description="next steps sampled when a node is expanded")
    rollout_steps: int = Field(2, ge=0, description="greedy steps of a rollout; the last one finishes the answer")
    max_iterations: int = Field(8, ge=1, le=256)
    c: float = Field(0.4, ge=0.0, description="UCT exploration weight")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the rollout's best value in V")
    end_gate: float = Field(0.9, ge=0.0, le=1.0, description="a finished answer valued this high ends the search")

    @field_validator("value")
    @classmethod
    def known_verifier(cls, name: str, info: ValidationInfo) -> str:
        return check_verifier_name(name, info)

    @field_validator("max_samples")
    @classmethod
    def within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        return max_samples_within_cap(value, info)

    @model_validator(mode="after")
    def one_round_fits(self, info: ValidationInfo) -> TreeSearchOptions:
        if self.mode != "mcts" and self.n < self.beam_width:
            raise ValueError(f"n={self.n} samples per step cannot feed beam_width={self.beam_width}: make n >= it")
        first, name = (self.branch, "branch") if self.mode == "mcts" else (self.n, "n")
        cap = cap_from_context(info, "max_samples")
        if cap is not None and first > cap:
            raise ValueError(f"{name}={first} is over this server's cap of {cap} samples per request")
        if self.max_samples is not None and first > self.max_samples:
            raise ValueError(f"{name}={first} is over the search's budget of max_samples={self.max_samples}")
        return self


def planned_samples(options: TreeSearchOptions) -> int:
    """Upper bound of the samples a search draws: every step (iteration) at full width, within `max_samples`."""
    if options.mode == "mcts":
        plan = options.max_iterations * (options.branch + options.rollout_steps)
    else:
        plan = options.max_steps * options.n
    return plan if options.max_samples is None else min(plan, options.max_samples)


@dataclass(eq=False)
class Node:
    """A partial solution: every step from the root to here. Mutable: searches update value and visits in place."""

    text: str  # this node's own step
    solution: str  # every step from the root, concatenated
    solution_ids: tuple[int, ...]
    logprob: float
    finish_reason: str | None  # None while the solution goes on
    id: int = 0
    parent: int | None = None
    depth: int = 0
    value: float = 0.0
    visits: int = 0
    expanded: bool = False
    rollout: bool = False  # an MCTS rollout's finished answer, grafted onto the node it started from
    children: list[int] = field(default_factory=list)
    # Tracked log-probs (introspection heads) at the last token of this node's step: its value at no extra pass.
    last_tracked: tuple[dict[int, float], ...] = ()

    @property
    def terminal(self) -> bool:
        return self.finish_reason is not None

    def generation(self) -> Generation:
        reason = self.finish_reason or "length"
        return Generation(self.solution, self.solution_ids, reason, self.logprob, tracked_logprobs=self.last_tracked)


def step_options(
    sampling: SamplingOptions, delimiter: str, temperature: float, max_tokens: int, final: bool
) -> SamplingOptions:
    """One more step (the delimiter kept in its text), or with `final` the rest of the answer."""
    if final:
        return sampling.replace(temperature=temperature, max_tokens=max_tokens)
    stop = (delimiter, *sampling.stop)
    return sampling.replace(temperature=temperature, max_tokens=max_tokens, stop=stop, include_stop_str_in_output=True)


def step_finish(step: Generation, delimiter: str, final: bool, tokens_left: int) -> str | None:
    """How the answer ends with this step, or None if it goes on: a step that stopped without the delimiter at
    its end met EOS (or a client stop string); one that filled max_tokens, or left none, ends for "length"."""
    if final or step.finish_reason != "stop" or not step.text.endswith(delimiter):
        return step.finish_reason
    return "length" if tokens_left <= 0 else None


def strip_stop(text: str, stops: Sequence[str]) -> str:
    """A client's stop string ended this answer: it was kept in the step's text, the client must not see it."""
    for stop in stops:
        if stop and text.endswith(stop):
            return text[: -len(stop)]
    return text


def split_evenly(total: int, k: int) -> list[int]:
    """`total` samples over k nodes, the first ones (the best-valued) getting the remainder."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def best_indices(values: Sequence[float], k: int) -> list[int]:
    """Indices of the k largest values, best first; the first on ties."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def value_weighted_vote(answers: Sequence[str | None], values: Sequence[float]) -> int:
    """The best-valued path of the answer with the largest summed value; paths without an answer do not vote."""
    totals: dict[str, float] = defaultdict(float)
    for answer, value in zip(answers, values):
        if answer is not None:
            totals[answer] += value
    if not totals:
        return argmax(values)
    winner = max(totals, key=lambda a: totals[a])
    members = [i for i, a in enumerate(answers) if a == winner]
    return members[argmax([values[i] for i in members])]


class Tree:
    """One request's search tree and the two things a search does to it: sample next steps, and value them."""

    def __init__(self, ctx: StrategyContext, prompt: Prompt, options: TreeSearchOptions) -> None:
        self.ctx, self.prompt, self.options = ctx, prompt, options
        self.nodes = [Node("", "", (), 0.0, None)]
        self.temperature = search_temperature(options.temperature, ctx.sampling.temperature)
        self.max_tokens = min(ctx.sampling.max_tokens, ctx.budget.max_tokens)  # of a whole answer

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def samples_left(self) -> int:
        return self.ctx.budget.max_samples - self.ctx.samples_drawn

    async def sample_steps(self, node: Node, n: int, *, final: bool = False, greedy: bool = False) -> list[Node]:
        """n next steps of `node` (with `final`, the rest of its answer) as new nodes, not yet in the tree."""
        left = self.max_tokens - len(node.solution_ids)
        temperature = 0.0 if greedy else self.temperature
        options = step_options(self.ctx.sampling, self.options.step_delimiter, temperature, left, final)
        steps = await self.ctx.sample(self.prompt.token_ids + node.solution_ids, n, options)
        return [self.extend(node, step, final) for step in steps]

    def extend(self, node: Node, step: Generation, final: bool) -> Node:
        tokens_left = self.max_tokens - len(node.solution_ids) - step.num_tokens
        finish = step_finish(step, self.options.step_delimiter, final, tokens_left)
        text = strip_stop(step.text, self.ctx.sampling.stop) if finish == "stop" and not final else step.text
        ids, logprob = node.solution_ids + step.token_ids, node.logprob + step.cumulative_logprob
        node = Node(text, node.solution + text, ids, logprob, finish, depth=node.depth + 1)
        node.last_tracked = step.tracked_logprobs[-1:]
        return node

    async def value(self, nodes: Sequence[Node]) -> None:
        """Each node's value: the verifier's score of its (partial) solution."""
        if nodes:
            scores = await self.ctx.score(self.options.value, self.prompt, [n.generation() for n in nodes])
            for node, score in zip(nodes, scores):
                node.value = score

    def attach(self, parent: Node, node: Node) -> Node:
        node.id, node.parent, node.depth = len(self.nodes), parent.id, parent.depth + 1
        self.nodes.append(node)
        parent.children.append(node.id)
        return node


async def beam_search(tree: Tree, options: TreeSearchOptions) -> str:
    """Beam search (mode beam), or N/M independent greedy subtrees (mode dvts); returns why it stopped."""
    width, subtrees = (options.beam_width, 1) if options.mode == "beam" else (1, options.n // options.beam_width)
    beams: list[list[Node]] = [[tree.root] for _ in range(subtrees)]
    for step in range(options.max_steps):
        frontier = [(b, node) for b, beam in enumerate(beams) for node in beam if not node.terminal]
        if not frontier:
            return "finished"
        frontier.sort(key=lambda pair: -pair[1].value)  # stable: the best get the remainder of an uneven split
        take = min(options.n, tree.samples_left())
        if take == 0:
            return "budget"
        final = step == options.max_steps - 1 or take == tree.samples_left()
        jobs = [(b, node, k) for (b, node), k in zip(frontier, split_evenly(take, len(frontier))) if k]
        steps = await asyncio.gather(*(tree.sample_steps(node, k, final=final) for _, node, k in jobs))
        children: list[list[Node]] = [[] for _ in beams]
        for (b, node, _), batch in zip(jobs, steps):
            node.expanded, node.visits = True, node.visits + 1
            children[b] += [tree.attach(node, child) for child in batch]
        await tree.value([child for batch in children for child in batch])
        for b, beam in enumerate(beams):
            pool = [node for node in beam if node.terminal] + children[b]
            beams[b] = [pool[i] for i in best_indices([node.value for node in pool], width)]
        if final:
            return "max_steps" if step == options.max_steps - 1 else "budget"
    return "max_steps"


def node_record(node: Node) -> dict[str, Any]:
    text = node.text if len(node.text) <= MAX_NODE_CHARS else node.text[:MAX_NODE_CHARS] + "..."
    return {
        "id": node.id,
        "parent": node.parent,
        "depth": node.depth,
        "text": text,
        "value": node.value,
        "visits": node.visits,
        "terminal": node.terminal,
        "rollout": node.rollout,
    }


def search_result(tree: Tree, options: TreeSearchOptions, stopped: str) -> Result:
    """Candidates are the finished answers (else the best partial one, cut); the best-valued or voted one wins."""
    leaves = [node for node in tree.nodes if node.terminal]
    if not leaves and len(tree.nodes) > 1:
        leaves = [max(tree.nodes[1:], key=lambda node: node.value)]
    if not leaves:
        raise BudgetExceeded(f"tree search drew no sample: its budget was {tree.ctx.budget.max_samples}")
    answers = [extract_answer(node.solution) for node in leaves]
    answers = [normalize_answer(a) if a is not None else None for a in answers]
    values = [node.value for node in leaves]
    chosen = value_weighted_vote(answers, values) if options.answer == "vote" else argmax(values)
    candidates = tuple(
        Candidate(i, node.generation(), scores={options.value: node.value}, answer=answer)
        for i, (node, answer) in enumerate(zip(leaves, answers))
    )
    details = {"mode": options.mode, "stopped_because": stopped, "nodes": [node_record(n) for n in tree.nodes]}
    return Result(candidates, chosen=(chosen,), details=details)


@register_strategy
class TreeSearch(Strategy):
    name = "tree_search"
    description = "step-by-step search (beam, dvts or mcts) over partial answers valued by a verifier"
    requires = frozenset({TOKEN_IDS})  # a step continues its node by appending the node's exact token ids
    Options = TreeSearchOptions

    async def run(self, ctx: StrategyContext, prompt: Prompt, options: TreeSearchOptions) -> Result:
        tree = Tree(ctx, prompt, options)
        ctx.snapshot = lambda: search_result(tree, options, "deadline")  # the tree as it stands, if time runs out
        search = mcts.mcts_search if options.mode == "mcts" else beam_search
        stopped = await search(tree, options)
        return search_result(tree, options, stopped)

    def planned_samples(self, options: TreeSearchOptions, request_n: int) -> int:
        return planned_samples(options)
