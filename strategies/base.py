"""What every strategy is built from: the prompt it answers, the context it runs in, and the result it returns.

A strategy is one async program: `run(ctx, prompt, options) -> Result`. The context carries the plumbing (the
engine, the verifiers, the budget, the recorder of every engine call, the streaming channel), so a strategy
file reads like its paper's pseudo-code. Strategies hold no per-request state on `self`.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo

from server.engine import Engine, Generation, GenerationDelta, SamplingOptions

if TYPE_CHECKING:
    from verifiers.base import Verifier


@dataclass(frozen=True)
class Prompt:
    """The request as strategies see it: rendered token ids plus what a judge prompt needs."""

    token_ids: tuple[int, ...]
    question: str  # the last user message (chat) or the prompt text (completions)
    messages: tuple[Mapping[str, Any], ...] | None = None
    reference: str | None = None  # a reference answer the caller supplied (evaluation, training)
    tests: tuple[str, ...] = ()  # caller-supplied checks for verifiers that run them (e.g. code tests)


@dataclass(frozen=True)
class Candidate:
    index: int
    generation: Generation
    scores: Mapping[str, float] = field(default_factory=dict)
    answer: str | None = None

    @property
    def text(self) -> str:
        return self.generation.text


@dataclass(frozen=True)
class Result:
    """Every candidate the strategy produced and which of them go back to the client, in choice order."""

    candidates: tuple[Candidate, ...]
    chosen: tuple[int, ...]
    streamed: bool = False  # the chosen text already went to the client token by token
    details: Mapping[str, Any] = field(default_factory=dict)  # strategy-specific, for the trace

    @property
    def the_one(self) -> Candidate:
        return self.candidates[self.chosen[0]]

    @property
    def returned_tokens(self) -> int:
        """Tokens of the candidates the client gets back; everything else generated is reasoning."""
        return sum(self.candidates[i].generation.num_tokens for i in self.chosen)


@dataclass(frozen=True)
class EngineCall:
    kind: str  # "sample", "stream", "judge", ...
    n: int
    prompt_tokens: int
    generated_tokens: int
    latency_s: float


@dataclass(frozen=True)
class Budget:
    """Hard limits for one request; `ctx.sample` refuses to go past them."""

    max_samples: int
    max_tokens: int  # per sample
    deadline: float | None = None  # time.monotonic() value

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class BudgetExceeded(RuntimeError):
    """A strategy asked for more than the budget the server validated: a bug in the strategy, not the request."""


class DeadlineExceeded(BudgetExceeded):
    """The request's deadline passed."""


@dataclass(frozen=True)
class AnswerSoFar:
    """A whole answer a strategy has drawn (or, cut by the deadline, the start of one): what a request whose
    deadline passed can still be answered with when it asked for the best answer so far."""

    index: int  # the sample's index within its engine call: the choice order of `single`
    generation: Generation
    score: float | None = None  # the strategy's own value of it, when it has one
    streamed: bool = False  # its text already went to the client token by token

    @property
    def complete(self) -> bool:
        """The engine finished it (a stop, or max_tokens), rather than the deadline cutting it."""
        return self.generation.finished


DeltaSink = Callable[[GenerationDelta], Awaitable[None]]
# Engine calls whose samples count against Budget.max_samples. Others ("continue" a sample, "judge", "probe")
# still count every token they generate.
NEW_SAMPLE_KINDS = frozenset({"sample", "stream", "branch"})


@dataclass
class StrategyContext:
    """Per-request plumbing. Created by the server for one request and discarded after it."""

    engine: Engine
    verifiers: Mapping[str, Verifier]
    budget: Budget
    sampling: SamplingOptions  # the request's own sampling settings
    request_id: str
    render_chat: Callable[[Sequence[Mapping[str, Any]]], list[int]]
    encode: Callable[[str], list[int]]
    on_delta: DeltaSink | None = None  # set when the client asked for a stream
    calls: list[EngineCall] = field(default_factory=list)
    samples_drawn: int = 0
    # For a deadline: whole answers drawn so far (kept only if the request wants the best so far: building them
    # costs a pass over every sample's tokens), and the strategy's own way to build its result from what it has
    # (search trees, adaptive paths); see strategies/deadline.py.
    keeps_answers: bool = False
    answers_so_far: list[AnswerSoFar] = field(default_factory=list)
    snapshot: Callable[[], Result] | None = None
    _call_counter: int = 0

    @property
    def streaming(self) -> bool:
        return self.on_delta is not None

    @property
    def generated_tokens(self) -> int:
        return sum(call.generated_tokens for call in self.calls)

    def next_request_id(self, kind: str) -> str:
        self._call_counter += 1
        return f"{self.request_id}-{kind}-{self._call_counter}"

    def _reserve(self, n: int, kind: str) -> None:
        if kind in NEW_SAMPLE_KINDS:
            if self.samples_drawn + n > self.budget.max_samples:
                total, cap = self.samples_drawn + n, self.budget.max_samples
                raise BudgetExceeded(f"{n} more samples would make {total}, over the budget of {cap}")
            self.samples_drawn += n
        left = self.budget.seconds_left()
        if left is not None and left <= 0:
            raise DeadlineExceeded("the request's deadline has passed")

    def offer_answer(
        self, index: int, generation: Generation, score: float | None = None, *, streamed: bool = False
    ) -> None:
        """Keep `generation` as a whole answer the request could return if its deadline passes."""
        self.answers_so_far.append(AnswerSoFar(index, generation, score, streamed))

    async def sample(
        self,
        prompt_ids: Sequence[int],
        n: int,
        options: SamplingOptions | None = None,
        kind: str = "sample",
        *,
        answers: bool = False,
    ) -> list[Generation]:
        """n samples from the engine, recorded and counted against the budget.

        With `answers`, each sample is a whole answer to the request (not a step, a judge's verdict or a
        probe): it is kept in `answers_so_far` as it finishes, or as it stood when the deadline cut the call."""
        options = options or self.sampling
        self._reserve(n, kind)
        started = time.monotonic()
        produced = [0]  # tokens heard of so far: what a cancelled or failed call still cost

        def count(new_tokens: int) -> None:
            produced[0] += new_tokens

        try:
            generations = await _with_deadline(
                self.engine.generate(
                    prompt_ids,
                    options,
                    n,
                    self.next_request_id(kind),
                    on_tokens=count,
                    on_sample=self.offer_answer if answers and self.keeps_answers else None,
                ),
                self.budget,
            )
            produced[0] = sum(g.num_tokens for g in generations)
            return generations
        finally:
            self.calls.append(EngineCall(kind, n, len(prompt_ids), produced[0], time.monotonic() - started))

    async def stream_samples(
        self, prompt_ids: Sequence[int], n: int, options: SamplingOptions | None = None
    ) -> list[Generation]:
        """Like `sample` with `answers`, but each new piece of text goes to the client as it is generated."""
        assert self.on_delta is not None, "stream_samples needs a streaming request"
        options = options or self.sampling
        self._reserve(n, "stream")
        started = time.monotonic()
        texts: list[list[str]] = [[] for _ in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs = [0.0] * n
        finish: list[str] = ["abort"] * n
        try:
            async with asyncio.timeout(self.budget.seconds_left()):
                async for deltas in self.engine.stream(prompt_ids, options, n, self.next_request_id("stream")):
                    for delta in deltas:
                        texts[delta.index].append(delta.text)
                        tokens[delta.index].extend(delta.token_ids)
                        logprobs[delta.index] += delta.logprob
                        if delta.finish_reason:
                            finish[delta.index] = delta.finish_reason
                        await self.on_delta(delta)
        except TimeoutError as exc:
            if self.keeps_answers:
                for i in range(n):  # what the client has seen of each sample: the answers so far
                    generation = Generation("".join(texts[i]), tuple(tokens[i]), finish[i], logprobs[i])
                    self.offer_answer(i, generation, streamed=True)
            raise DeadlineExceeded("the request's deadline passed while streaming") from exc
        finally:
            generated = sum(len(t) for t in tokens)
            self.calls.append(EngineCall("stream", n, len(prompt_ids), generated, time.monotonic() - started))
        return [Generation("".join(texts[i]), tuple(tokens[i]), finish[i], logprobs[i]) for i in range(n)]

    async def score(self, verifier_name: str, prompt: Prompt, generations: Sequence[Generation]) -> list[float]:
        scores = await self.verifiers[verifier_name].score(self, prompt, generations)
        if len(scores) != len(generations):
            raise ValueError(f"verifier {verifier_name} gave {len(scores)} scores for {len(generations)} candidates")
        return scores


async def _with_deadline(awaitable: Awaitable[list[Generation]], budget: Budget) -> list[Generation]:
    left = budget.seconds_left()
    if left is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout=max(left, 0.0))
    except TimeoutError as exc:
        raise DeadlineExceeded("the request's deadline passed while sampling") from exc


class StrategyOptions(BaseModel):
    """Base of every strategy's options: unknown keys are an error, so a typo is a 400 rather than a no-op.

    Server caps arrive through pydantic's validation context: `Options.model_validate(data, context=caps)`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


def cap_from_context(info: ValidationInfo, key: str) -> int | None:
    context = info.context or {}
    value = context.get(key)
    return int(value) if value is not None else None


class Strategy(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    # Whether the request's own `n` applies (one choice per sample) rather than one chosen answer.
    returns_every_sample: ClassVar[bool] = False
    # Engine capabilities it relies on (server.engine: TOKEN_IDS, TRACKED_LOGPROBS); without them a request is a 400.
    requires: ClassVar[frozenset[str]] = frozenset()
    # Whether it (or a verifier it may call) reads the samples' cumulative_logprob; if not, the engine is not
    # asked for log-probs at all (SamplingOptions.logprobs).
    reads_logprobs: ClassVar[bool] = True

    @abstractmethod
    async def run(self, ctx: StrategyContext, prompt: Prompt, options: StrategyOptions) -> Result: ...

    def planned_samples(self, options: StrategyOptions, request_n: int) -> int:
        """Upper bound of samples this strategy will draw: the server checks it against its cap and sets the budget."""
        return int(getattr(options, "n", request_n))


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties, so results do not depend on dict or set order."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
