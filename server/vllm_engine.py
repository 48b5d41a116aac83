"""vLLM's AsyncLLM in-process, behind the `server.engine.Engine` interface.

The engine core and its worker run in child processes that vLLM spawns, so whatever builds a `VllmEngine` must
run under an `if __name__ == "__main__":` guard (the `ponder` command does).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from server.engine import EngineDeadError, Generation, GenerationDelta, SampleSink, SamplingOptions
from server.introspection import MASK_BIAS, IntrospectionHeads

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.outputs import CompletionOutput
    from vllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


def to_sampling_params(
    options: SamplingOptions, n: int, output_kind: RequestOutputKind, masked_ids: Sequence[int] = ()
) -> SamplingParams:
    """The one place request options become vLLM `SamplingParams`. No `seed`: on the CPU backend a per-request
    seed can kill the engine core ("CPU Generator does not use offset"), so it never reaches vLLM.

    `masked_ids` (the introspection rows) get the most negative bias vLLM takes, over anything the request
    asked. vLLM reports log-probs from the logits before any bias, so reading those rows is unaffected."""
    from vllm.sampling_params import SamplingParams

    logit_bias = dict(options.logit_bias) | dict.fromkeys(masked_ids, MASK_BIAS)

    return SamplingParams(
        n=n,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        stop=list(options.stop) or None,
        stop_token_ids=list(options.stop_token_ids) or None,
        include_stop_str_in_output=options.include_stop_str_in_output,
        logit_bias=logit_bias or None,
        logprob_token_ids=list(options.logprob_token_ids) or None,
        # logprobs=0: the sampled token's log-prob only (enough for cumulative_logprob); vLLM wants `logprobs`
        # to equal the number of tracked ids when there are some.
        logprobs=sampled_logprobs(options),
        output_kind=output_kind,
    )


def sampled_logprobs(options: SamplingOptions) -> int | None:
    """vLLM's `logprobs`: the number of tracked ids, 0 for the sampled token's alone, None for none at all."""
    if options.logprob_token_ids:
        return len(options.logprob_token_ids)
    return 0 if options.logprobs else None


def to_generation(output: CompletionOutput, tracked_ids: Sequence[int]) -> Generation:
    tracked: tuple[dict[int, float], ...] = ()
    if tracked_ids and output.logprobs:
        tracked = tuple(
            {tid: position[tid].logprob for tid in tracked_ids if tid in position} for position in output.logprobs
        )
    return Generation(
        text=output.text,
        token_ids=tuple(output.token_ids),
        finish_reason=output.finish_reason or "abort",
        cumulative_logprob=float(output.cumulative_logprob or 0.0),
        tracked_logprobs=tracked,
    )


class SampleAccumulator:
    """One sample of a DELTA-mode request, assembled piece by piece."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.positions: list[dict] = []  # vLLM's {token_id: Logprob} per generated token
        self.finish_reason = "abort"
        self.finished = False

    def add(self, output: CompletionOutput) -> None:
        self.texts.append(output.text)
        self.token_ids.extend(output.token_ids)
        self.positions.extend(output.logprobs or [])
        if output.finish_reason:
            self.finish_reason = output.finish_reason
            self.finished = True

    def generation(self, tracked_ids: Sequence[int]) -> Generation:
        pairs = list(zip(self.token_ids, self.positions))
        tracked = tuple({t: pos[t].logprob for t in tracked_ids if t in pos} for _, pos in pairs) if tracked_ids else ()
        return Generation(
            text="".join(self.texts),
            token_ids=tuple(self.token_ids),
            finish_reason=self.finish_reason,
            cumulative_logprob=sum(pos[t].logprob for t, pos in pairs if t in pos),
            tracked_logprobs=tracked,
        )


def summed_logprob(output: CompletionOutput) -> float:
    """Log-prob of the tokens in this (delta) output; vLLM lists one {id: Logprob} per token."""
    if not output.logprobs:
        return 0.0
    return sum(position[tid].logprob for tid, position in zip(output.token_ids, output.logprobs) if tid in position)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (even by SIGKILL). vLLM's EngineCore ends
    cleanly on SIGTERM, and its workers follow it through their own death pipes."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if parent == 1:  # the parent died before prctl took effect: nobody will send the signal
        os.kill(os.getpid(), sig)


def run_engine_core_tied_to_parent(*args, **kwargs):
    """EngineCore's process entry point, dying with the server: without this, a `kill -9` of the server leaves
    EngineCore (and its workers) running until someone SIGKILLs them. Picklable by name, for spawned children."""
    from vllm.v1.engine.core import EngineCoreProc

    die_with_parent()
    original = getattr(EngineCoreProc, "_ponder_original_run_engine_core", EngineCoreProc.run_engine_core)
    return original(*args, **kwargs)


def tie_engine_core_to_this_process() -> None:
    """Make EngineCore processes started from now on (by this thread) exit when this process dies."""
    from vllm.v1.engine.core import EngineCoreProc

    if not hasattr(EngineCoreProc, "_ponder_original_run_engine_core"):
        EngineCoreProc._ponder_original_run_engine_core = EngineCoreProc.run_engine_core
        EngineCoreProc.run_engine_core = staticmethod(run_engine_core_tied_to_parent)


class VllmEngine:
    """Owns one AsyncLLM. Build it with `VllmEngine.start(engine_args)` inside a running event loop."""

    def __init__(
        self, llm: object, model_name: str, max_model_len: int, introspection: IntrospectionHeads | None = None
    ) -> None:
        self._llm = llm
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.introspection = introspection
        self._masked_ids = introspection.token_ids if introspection else ()

    @classmethod
    def start(cls, engine_args: AsyncEngineArgs) -> VllmEngine:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        introspection = IntrospectionHeads.load(engine_args.model)
        if introspection is not None and (engine_args.max_logprobs or 0) < introspection.size:
            engine_args.max_logprobs = introspection.size  # every head row's log-prob at every token
        tie_engine_core_to_this_process()
        llm = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        model_config = llm.model_config
        return cls(llm, model_config.served_model_name, model_config.max_model_len, introspection)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        n: int,
        request_id: str,
        on_tokens: Callable[[int], None] | None = None,
        on_sample: SampleSink | None = None,
    ) -> list[Generation]:
        from vllm.sampling_params import RequestOutputKind

        # Deltas rather than one final output: the caller hears of every token, even of a call it cancels.
        params = to_sampling_params(options, n, RequestOutputKind.DELTA, self._masked_ids)
        samples = [SampleAccumulator() for _ in range(n)]
        tracked = options.logprob_token_ids
        try:
            async for out in self._iterate(prompt_ids, params, request_id):
                for output in out.outputs:
                    samples[output.index].add(output)
                    if on_tokens is not None and output.token_ids:
                        on_tokens(len(output.token_ids))
                    if on_sample is not None and output.finish_reason:
                        on_sample(output.index, samples[output.index].generation(tracked))
        except asyncio.CancelledError:
            if on_sample is not None:
                for index, sample in enumerate(samples):
                    if not sample.finished:
                        on_sample(index, sample.generation(tracked))
            raise
        return [sample.generation(tracked) for sample in samples]

    async def stream(
        self, prompt_ids: Sequence[int], options: SamplingOptions, n: int, request_id: str
    ) -> AsyncIterator[list[GenerationDelta]]:
        from vllm.sampling_params import RequestOutputKind

        params = to_sampling_params(options, n, RequestOutputKind.DELTA, self._masked_ids)
        async for out in self._iterate(prompt_ids, params, request_id):
            yield [
                GenerationDelta(o.index, o.text, tuple(o.token_ids), summed_logprob(o), o.finish_reason)
                for o in out.outputs
                if o.text or o.token_ids or o.finish_reason
            ]

    async def prompt_logprobs(self, prompt_ids: Sequence[int], request_id: str) -> list[float]:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = await self._final(prompt_ids, params, request_id)
        assert final.prompt_logprobs is not None
        return [0.0 if pos is None else pos[tid].logprob for tid, pos in zip(prompt_ids, final.prompt_logprobs)]

    async def _final(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str):
        """The last (with FINAL_ONLY: the only) output of a request."""
        outputs = [out async for out in self._iterate(prompt_ids, params, request_id)]
        if not outputs:
            raise EngineDeadError(f"engine returned no output for {request_id}")
        return outputs[-1]

    async def _iterate(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str):
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError

        if self._llm.errored:
            raise EngineDeadError("the vLLM engine has died; restart the server")
        try:
            async for out in self._llm.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id):
                yield out
        except VllmDeadError as exc:
            raise EngineDeadError(f"the vLLM engine has died: {exc}") from exc

    async def abort(self, request_ids: Sequence[str]) -> None:
        await self._llm.abort(list(request_ids))

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineDeadError("the vLLM engine has died")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineDeadError(str(exc)) from exc

    async def shutdown(self) -> None:
        self._llm.shutdown()
