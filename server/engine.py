"""The narrow interface every strategy and verifier talks to.

Two things implement it: `server.vllm_engine.VllmEngine` (vLLM's AsyncLLM in-process) and, in unit tests, a
scripted fake. Prompts are token ids, never text: the server renders the chat template once, and a strategy that
continues a partial answer just appends that prefix's ids, so vLLM's prefix cache makes forks cheap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from server.introspection import IntrospectionHeads


class EngineDeadError(RuntimeError):
    """The engine can no longer serve; the server answers 503 until it is restarted."""


class UpstreamError(RuntimeError):
    """A remote upstream refused or broke off one call (the server answers 502); the engine itself still serves."""


# What an engine can do beyond sampling text. The in-process engine does all of it; a plain OpenAI-style
# upstream returns neither generated token ids (continuing a partial answer by ids) nor chosen ids' log-probs.
TOKEN_IDS = "token_ids"  # exact generated ids: a partial answer is continued by appending them (tree search)
TRACKED_LOGPROBS = "tracked_logprobs"  # SamplingOptions.logprob_token_ids (yes/no judges, introspection)
PROMPT_LOGPROBS = "prompt_logprobs"
ALL_CAPABILITIES = frozenset({TOKEN_IDS, TRACKED_LOGPROBS, PROMPT_LOGPROBS})


def engine_capabilities(engine: object) -> frozenset[str]:
    """An engine's `capabilities` attribute; engines without one (in-process vLLM, fakes) can do everything."""
    return getattr(engine, "capabilities", ALL_CAPABILITIES)


def missing_capabilities(required: frozenset[str], engine: object) -> str | None:
    """Why `engine` cannot serve something that needs `required`, or None."""
    missing = sorted(required - engine_capabilities(engine))
    if not missing:
        return None
    return f"needs {' and '.join(missing)}, which this server's upstream does not return (a vLLM upstream does)"


@dataclass(frozen=True)
class SamplingOptions:
    """Engine-independent sampling settings.

    `seed` is deliberately absent: on vLLM's CPU backend a per-request seed can kill the engine core ("CPU
    Generator does not use offset"), so the server accepts it from clients and records it as ignored.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False  # step-wise search keeps its step delimiter in the text
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Log-probs of these ids at every generated position (introspection heads, yes/no judges).
    logprob_token_ids: tuple[int, ...] = ()
    # The sampled tokens' own log-probs (Generation.cumulative_logprob). Off where nothing reads them (`single`):
    # vLLM's frontend then skips a log-prob entry, with its decoded text, per generated token.
    logprobs: bool = True

    def replace(self, **changes: object) -> SamplingOptions:
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class Generation:
    """One finished sample."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length" | "abort"
    cumulative_logprob: float
    # One dict per generated position: {token_id: logprob} for SamplingOptions.logprob_token_ids.
    tracked_logprobs: tuple[dict[int, float], ...] = field(default=(), repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        """The engine ended it (a stop, or max_tokens), rather than a cancellation or deadline cutting it."""
        return self.finish_reason in ("stop", "length")

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / max(1, self.num_tokens)


@dataclass(frozen=True)
class GenerationDelta:
    """New text for one sample of a streamed request; `finish_reason` is set on its last delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprob: float  # summed over token_ids
    finish_reason: str | None = None


SampleSink = Callable[[int, Generation], None]


@runtime_checkable
class Engine(Protocol):
    """What a backend must offer. Every call takes a caller-chosen `request_id` so it can be aborted."""

    model_name: str
    max_model_len: int
    # The model's introspective reward/cost heads, or None. An engine serving a model with heads masks their
    # rows from sampling on every request, whatever the request's own logit_bias says.
    introspection: IntrospectionHeads | None

    async def generate(
        self,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        n: int,
        request_id: str,
        on_tokens: Callable[[int], None] | None = None,
        on_sample: SampleSink | None = None,
    ) -> list[Generation]:
        """n samples of the continuation of `prompt_ids` (a prefix to continue is simply part of it).

        `on_tokens` hears how many tokens were generated as they arrive, so a call cancelled halfway is still
        accounted for. `on_sample(index, generation)` hears of each sample as soon as it finishes and, if the
        call is cancelled, of each unfinished one as it stood (finish_reason "abort"): what a request whose
        deadline passed can still answer with."""
        ...

    def stream(
        self, prompt_ids: Sequence[int], options: SamplingOptions, n: int, request_id: str
    ) -> AsyncIterator[list[GenerationDelta]]:
        """The same samples as they are produced; closing the iterator aborts them."""
        ...

    async def prompt_logprobs(self, prompt_ids: Sequence[int], request_id: str) -> list[float]:
        """Log-prob of each prompt token given the ones before it (the first has none: 0.0)."""
        ...

    async def abort(self, request_ids: Sequence[str]) -> None: ...

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine cannot serve."""
        ...

    async def shutdown(self) -> None: ...
