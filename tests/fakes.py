"""Fast stand-ins for the engine and the prompt renderer, for unit tests.

`ScriptedEngine` implements `server.engine.Engine` from a script instead of a model; `CharRenderer` implements
`server.prompt_rendering.PromptRenderer` with a toy tokenizer: one token per character, plus single-token
"Yes"/"No" words so the self-judge verifier can read its verdict from one position.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.engine import EngineDeadError, Generation, GenerationDelta, SampleSink, SamplingOptions
from server.introspection import IntrospectionHeads

# ----------------------------------------------------------------------------------------------- tokenizer
VOCAB_SIZE = 256
UNK_ID = 240  # characters outside 0..239 all become this id
WORD_IDS = {"Yes": 250, " Yes": 251, "No": 252, " No": 253}  # lowercase "yes"/"no" stay multi-token
YES_ID, NO_ID = WORD_IDS["Yes"], WORD_IDS["No"]
_WORDS_BY_ID = {i: w for w, i in WORD_IDS.items()}


class CharRenderer:
    """One token per character (its code point, below UNK_ID); whole-string "Yes"/"No"/" Yes"/" No" are words."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        if text in WORD_IDS:
            return [WORD_IDS[text]]
        return [ord(c) if ord(c) < UNK_ID else UNK_ID for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(_WORDS_BY_ID.get(i, "?" if i == UNK_ID else chr(i)) for i in ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant: "

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.encode(self.render_chat(messages))

    def text_ids(self, text: str) -> list[int]:
        return self.encode(text)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))


_RENDERER = CharRenderer()


def make_generation(
    text: str, logprob_per_token: float = -0.5, finish_reason: str = "stop", **extra: Any
) -> Generation:
    """A finished sample of `text`, tokenized by CharRenderer, every token with the same log-prob."""
    ids = tuple(_RENDERER.encode(text))
    return Generation(text, ids, finish_reason, logprob_per_token * len(ids), **extra)


def judge_generation(p_yes: float) -> Generation:
    """The 1-token verdict of a judge call: "Yes", with P(Yes) = p_yes and P(No) = 1 - p_yes at that position."""
    tracked = {YES_ID: math.log(p_yes) if p_yes > 0 else -math.inf}
    tracked[NO_ID] = math.log(1 - p_yes) if p_yes < 1 else -math.inf
    return Generation("Yes", (YES_ID,), "length", tracked[YES_ID], tracked_logprobs=(tracked,))


# ----------------------------------------------------------------------------------------------- heads
TOY_HEADS = IntrospectionHeads(first_token_id=VOCAB_SIZE, reward_bins=4, length_edges=(0, 4, 16, math.inf))
# (text the sample continues, text so far including this position's token, tokens the sample has in all,
# position) -> the (R, L) joint the heads predict there
JointScript = Callable[[str, str, int, int], np.ndarray]


def toy_joint(prefix: str, text: str, total: int, position: int) -> np.ndarray:
    """The fake's default heads: sure of reward 1 once this generation has written "42" (else 0.25 each bin),
    exact about the remaining length of the generation it is part of."""
    heads = TOY_HEADS
    reward = np.zeros(heads.reward_bins)
    if "42" in text:
        reward[-1] = 1.0
    else:
        reward[:] = 1.0 / heads.reward_bins
    length = np.zeros(heads.length_bins)
    length[heads.length_bin(total - position)] = 1.0
    return np.outer(reward, length)


def joint_logprobs(heads: IntrospectionHeads, joint: np.ndarray) -> dict[int, float]:
    """What vLLM would report for the head rows at one position if their softmax were `joint`."""
    flat = np.clip(joint.reshape(-1), 1e-9, None)
    return {t: float(v) for t, v in zip(heads.token_ids, np.log(flat / flat.sum()) - 30.0)}  # -30: rest of vocab


def with_introspection(generation: Generation, heads: IntrospectionHeads, script: JointScript, prefix: str):
    from dataclasses import replace

    ids, total = generation.token_ids, generation.num_tokens
    tracked = tuple(
        joint_logprobs(heads, script(prefix, _RENDERER.decode(ids[: j + 1]), total, j)) for j in range(total)
    )
    return replace(generation, tracked_logprobs=tracked)


# ----------------------------------------------------------------------------------------------- engine
Script = Callable[[tuple[int, ...], SamplingOptions, int, str], Sequence["str | Generation"]]


@dataclass(frozen=True)
class EngineCallRecord:
    method: str  # "generate" | "stream" | "prompt_logprobs"
    prompt_ids: tuple[int, ...]
    options: SamplingOptions | None
    n: int
    request_id: str

    @property
    def prompt_text(self) -> str:
        return _RENDERER.decode(self.prompt_ids)

    introspective: bool = False  # it tracked the introspection heads (every sample on a model with heads does)

    @property
    def is_judge(self) -> bool:
        return bool(self.options and self.options.logprob_token_ids) and not self.introspective


class ScriptedEngine:
    """An Engine that answers from a script and records every call.

    What a sampling call returns (strings are turned into generations by `make_generation`):
    - `script(prompt_ids, options, n, request_id)` if given: it returns n strings or Generations (or raises);
    - otherwise sample k of the engine's life is `texts[k % len(texts)]` (k counts every sample of every call);
    - a judge call (one with `options.logprob_token_ids`) answers `judge_generation(judge(decoded prompt))`
      when `judge` is given (a float or a function of the judge prompt's text), else it goes to the script.
    Like vLLM, it cuts a sample at max_tokens (finish_reason "length"), refuses a prompt plus max_tokens longer
    than `max_model_len`, and records a request as aborted when its caller cancels it (or closes its stream)
    early. It waits `delay_s` before answering and before each streamed step; `dead=True` makes every call raise
    EngineDeadError.
    """

    def __init__(
        self,
        texts: Sequence[str | Generation] = ("The answer is 42.",),
        *,
        script: Script | None = None,
        judge: float | Callable[[str], float] | None = None,
        model_name: str = "toy",
        max_model_len: int = 4096,
        delay_s: float = 0.0,
        dead: bool = False,
        pieces_per_stream: int = 3,
        finish_alone: bool = False,
        introspection: IntrospectionHeads | None = None,
        introspect: JointScript | None = None,
    ) -> None:
        self.texts = list(texts)
        self.introspection = introspection
        self.introspect = introspect or toy_joint
        self.script = script
        self.judge = judge
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self.dead = dead
        self.pieces_per_stream = pieces_per_stream
        self.finish_alone = finish_alone  # stream the finish reason on its own empty delta (as vLLM may at EOS)
        self.calls: list[EngineCallRecord] = []
        self.generated_tokens = 0  # every token handed out, by generate and stream alike
        self.aborted: list[str] = []
        self.is_shut_down = False
        self._drawn = 0

    # -- what tests look at
    def reset(self) -> None:
        """Forget every recorded call (for a test that reuses an engine)."""
        self.calls.clear()
        self.aborted.clear()
        self.generated_tokens = 0
        self._drawn = 0

    def calls_of(self, method: str = "generate", *, judge: bool | None = None) -> list[EngineCallRecord]:
        return [c for c in self.calls if c.method == method and (judge is None or c.is_judge == judge)]

    # -- the Engine protocol
    async def generate(
        self,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        n: int,
        request_id: str,
        on_tokens: Callable[[int], None] | None = None,
        on_sample: SampleSink | None = None,
    ) -> list[Generation]:
        generations = self._answer("generate", prompt_ids, options, n, request_id)
        if on_tokens is not None:  # a real engine reports tokens as they come; here all at once, before any delay
            on_tokens(sum(g.num_tokens for g in generations))
        if self.delay_s:
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.aborted.append(request_id)  # as vLLM does when its caller is cancelled
                if on_sample is not None:  # cut halfway: the first half of each sample's tokens, unfinished
                    for i, g in enumerate(generations):
                        on_sample(i, first_half(g))
                raise
        self.generated_tokens += sum(g.num_tokens for g in generations)
        if on_sample is not None:
            for i, g in enumerate(generations):
                on_sample(i, g)
        return generations

    async def stream(
        self, prompt_ids: Sequence[int], options: SamplingOptions, n: int, request_id: str
    ) -> AsyncIterator[list[GenerationDelta]]:
        generations = self._answer("stream", prompt_ids, options, n, request_id)
        pieces = [split_into_deltas(i, g, self.pieces_per_stream, self.finish_alone) for i, g in enumerate(generations)]
        finished = False
        try:
            for step in range(max(len(p) for p in pieces)):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                batch = [p[step] for p in pieces if step < len(p)]
                self.generated_tokens += sum(len(d.token_ids) for d in batch)
                yield batch
            finished = True
        finally:
            if not finished:  # closed or cancelled early: "closing the iterator aborts them"
                self.aborted.append(request_id)

    async def prompt_logprobs(self, prompt_ids: Sequence[int], request_id: str) -> list[float]:
        self._check_alive()
        self.calls.append(EngineCallRecord("prompt_logprobs", tuple(prompt_ids), None, 0, request_id))
        return [0.0] + [-1.0] * (len(prompt_ids) - 1)

    async def abort(self, request_ids: Sequence[str]) -> None:
        self.aborted.extend(request_ids)

    async def check_health(self) -> None:
        self._check_alive()

    async def shutdown(self) -> None:
        self.is_shut_down = True

    # -- plumbing
    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError("the scripted engine is dead")

    def _answer(
        self, method: str, prompt_ids: Sequence[int], options: SamplingOptions, n: int, request_id: str
    ) -> list[Generation]:
        self._check_alive()
        heads = self.introspection
        introspective = heads is not None and set(heads.token_ids) <= set(options.logprob_token_ids)
        record = EngineCallRecord(method, tuple(prompt_ids), options, n, request_id, introspective)
        self.calls.append(record)
        if len(prompt_ids) + options.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens={options.max_tokens} > {self.max_model_len}"
            )
        if record.is_judge and self.judge is not None:
            p = self.judge if isinstance(self.judge, float | int) else self.judge(record.prompt_text)
            return [judge_generation(float(p)) for _ in range(n)]
        if self.script is not None:
            answers = list(self.script(tuple(prompt_ids), options, n, request_id))
            if len(answers) != n:
                raise AssertionError(f"the script gave {len(answers)} answers for n={n}")
        else:
            answers = [self.texts[(self._drawn + i) % len(self.texts)] for i in range(n)]
            self._drawn += n
        generations = [a if isinstance(a, Generation) else make_generation(a) for a in answers]
        generations = [truncate(g, options.max_tokens) for g in generations]
        if introspective:
            prefix = _RENDERER.decode(prompt_ids)
            generations = [with_introspection(g, heads, self.introspect, prefix) for g in generations]
        return generations


def truncate(generation: Generation, max_tokens: int) -> Generation:
    """What vLLM does with a sample that reaches max_tokens: cut it there, finish_reason "length"."""
    if generation.num_tokens <= max_tokens:
        return generation
    ids = generation.token_ids[:max_tokens]
    logprob = generation.cumulative_logprob * max_tokens / generation.num_tokens
    return Generation(_RENDERER.decode(ids), ids, "length", logprob, generation.tracked_logprobs[:max_tokens])


def first_half(generation: Generation) -> Generation:
    """A sample cut halfway (its call cancelled): the first half of its tokens, finish_reason "abort"."""
    keep = generation.num_tokens // 2
    ids = generation.token_ids[:keep]
    logprob = generation.cumulative_logprob * keep / max(1, generation.num_tokens)
    return Generation(_RENDERER.decode(ids), ids, "abort", logprob, generation.tracked_logprobs[:keep])


def split_into_deltas(
    index: int, generation: Generation, pieces: int, finish_alone: bool = False
) -> list[GenerationDelta]:
    """A generation as up to `pieces` deltas of consecutive tokens; the last one carries the finish reason, or
    with `finish_alone` one more, empty delta does."""
    ids, text = generation.token_ids, generation.text
    k = max(1, min(pieces, len(ids)))
    per_token = generation.cumulative_logprob / max(1, len(ids))
    deltas = []
    for j in range(k):
        chunk = ids[j * len(ids) // k : (j + 1) * len(ids) // k]
        piece = text[j * len(text) // k : (j + 1) * len(text) // k]
        reason = generation.finish_reason if j == k - 1 and not finish_alone else None
        deltas.append(GenerationDelta(index, piece, tuple(chunk), per_token * len(chunk), reason))
    if finish_alone:
        deltas.append(GenerationDelta(index, "", (), 0.0, generation.finish_reason))
    return deltas
