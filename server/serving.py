"""The request handler behind /v1/chat/completions and /v1/completions.

One flow for both endpoints: validate -> render the prompt -> choose the strategy -> run it in a task ->
answer (JSON, or SSE with heartbeats while a search runs) -> count it in the metrics and write its trace.
The two endpoints differ only in their `ResponseShape`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.admission import AdmissionController, Ticket, request_cost
from server.engine import Engine, EngineDeadError, GenerationDelta, SamplingOptions, UpstreamError, missing_capabilities
from server.errors import OpenAIError, invalid_request
from server.metrics import PonderMetrics
from server.prompt_rendering import PromptRenderer
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.rate_limits import RateLimiter, client_identity
from server.redaction import Redactor
from server.settings import ServerSettings
from server.strategy_selection import StrategyChoice, choose_strategy
from server.trace_journal import TraceJournal, new_trace_id, request_record
from strategies.base import Budget, DeadlineExceeded, Prompt, Result, Strategy, StrategyContext
from strategies.deadline import ON_DEADLINE_CHOICES, OnDeadline, best_so_far
from verifiers.answer_extraction import extract_answer
from verifiers.base import Verifier
from verifiers.reference import reference_scores

logger = logging.getLogger(__name__)

HEARTBEAT = ": heartbeat\n\n"
HEARTBEAT_DUE = object()  # on a stream's queue: nothing went out for a heartbeat interval
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- response shapes
@dataclass(frozen=True)
class ResponseShape:
    endpoint: str
    object: str
    chunk_object: str
    id_prefix: str

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.endpoint == "chat.completions":
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def chunk_choice(self, index: int, text: str | None, finish_reason: str | None, role: bool = False):
        if self.endpoint == "chat.completions":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}


CHAT = ResponseShape("chat.completions", "chat.completion", "chat.completion.chunk", "chatcmpl-")
COMPLETION = ResponseShape("completions", "text_completion", "text_completion", "cmpl-")


def finish_reason_for_client(reason: str) -> str:
    """OpenAI's two reasons: "stop" for an answer that ended, "length" for one cut short (by max_tokens, or by
    the request's deadline: "abort")."""
    return "stop" if reason == "stop" else "length"


def usage_body(prompt_tokens: int, completion_tokens: int, returned_tokens: int) -> dict[str, Any]:
    """`completion_tokens` is everything generated for the request; the part not returned is reasoning."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": completion_tokens - returned_tokens},
    }


def sse(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------- validation
def reject_unsupported(request: SamplingFields) -> None:
    """Fields an OpenAI client may send that Ponder cannot honour yet: a clear 400 beats a silent no-op."""
    if isinstance(request, ChatCompletionRequest):
        if request.logprobs or request.top_logprobs:
            raise invalid_request("logprobs are not supported by Ponder yet", param="logprobs")
        if request.tools:
            raise invalid_request("tool calling is not supported by Ponder yet", param="tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise invalid_request("only response_format type 'text' is supported", param="response_format")
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise invalid_request("echo is not supported", param="echo")
        if request.logprobs is not None:
            raise invalid_request("logprobs are not supported by Ponder yet", param="logprobs")
        if request.suffix:
            raise invalid_request("suffix is not supported", param="suffix")
        if request.best_of not in (None, 1):
            raise invalid_request(
                'best_of is not supported; ask for the best_of_n strategy instead (header "X-Strategy: best_of_n")',
                param="best_of",
            )


def parse_logit_bias(raw: Mapping[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    parsed = []
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError as exc:
            raise invalid_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from exc
        if not 0 <= token_id < vocab_size:
            raise invalid_request(f"logit_bias token id {token_id} is outside the vocabulary", param="logit_bias")
        if not -100 <= value <= 100:
            raise invalid_request("logit_bias values must lie in [-100, 100]", param="logit_bias")
        parsed.append((token_id, float(value)))
    return tuple(parsed)


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, cap: int, prompt_param: str = "messages"
) -> int:
    room = max_model_len - prompt_len
    if room <= 0:
        raise invalid_request(
            f"the prompt is {prompt_len} tokens, and this model's context is {max_model_len} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(room, cap)
    if requested > cap:
        raise invalid_request(f"max_tokens={requested} is over this server's cap of {cap}", param="max_tokens")
    if requested > room:
        raise invalid_request(
            f"this model's context is {max_model_len} tokens: {prompt_len} prompt tokens leave room for "
            f"{room}, but max_tokens={requested}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def resolve_deadline(
    header_seconds: str | None,
    header_on_deadline: str | None,
    body: SamplingFields,
    server_timeout_s: float | None,
) -> tuple[float | None, OnDeadline]:
    """(seconds the request may take, what to do when they are up). The header wins over the body, as for the
    strategy; the server's own `request_timeout_s` caps both."""
    seconds = body.deadline_s
    if header_seconds is not None:
        try:
            seconds = float(header_seconds)
        except ValueError:
            seconds = -1.0
        if not (seconds > 0 and math.isfinite(seconds)):
            raise invalid_request(
                f"X-Deadline must be a positive number of seconds, got {header_seconds!r}", param="X-Deadline"
            )
    on_deadline = body.on_deadline
    if header_on_deadline is not None:
        if header_on_deadline not in ON_DEADLINE_CHOICES:
            raise invalid_request(
                f"X-On-Deadline must be one of {', '.join(ON_DEADLINE_CHOICES)}, got {header_on_deadline!r}",
                param="X-On-Deadline",
            )
        on_deadline = header_on_deadline
    if server_timeout_s is not None:
        seconds = server_timeout_s if seconds is None else min(seconds, server_timeout_s)
    return seconds, on_deadline


# ---------------------------------------------------------------------------------------------- disconnects
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; nobody reads it


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (cancelling a strategy aborts its engine
    requests). Only for handlers whose body is already parsed: it consumes the request's later messages."""

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class HeartbeatTimer:
    """Puts HEARTBEAT_DUE on a stream's queue whenever `interval_s` pass with nothing else put on it.

    One timer per stream rather than a timeout on every `queue.get()`: `asyncio.wait_for` wraps each get in a
    task of its own, extra event-loop turns on every streamed token."""

    def __init__(self, queue: asyncio.Queue, interval_s: float) -> None:
        self.queue, self.interval_s = queue, interval_s
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.handle = self.loop.call_later(interval_s, self._fire)

    def touch(self) -> None:
        self.last = self.loop.time()

    def _fire(self) -> None:
        now = self.loop.time()
        if now - self.last >= self.interval_s:
            self.queue.put_nowait(HEARTBEAT_DUE)
            self.last = now
        self.handle = self.loop.call_later(self.last + self.interval_s - now, self._fire)

    def cancel(self) -> None:
        self.handle.cancel()


class AdmittedStreamingResponse(StreamingResponse):
    """Holds its admission ticket until the stream is over, however it ends: the generator's own `finally` does
    not run when the client leaves before the first chunk, this one does."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


def check_request_limits(body: SamplingFields, settings: ServerSettings) -> None:
    """Per-request limits beyond max_tokens and samples (checked in `_prepare`)."""
    messages = getattr(body, "messages", None)
    if messages is not None and len(messages) > settings.max_messages:
        raise invalid_request(
            f"{len(messages)} messages is over this server's limit of {settings.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    if body.tests and len(body.tests) > settings.max_tests:
        raise invalid_request(
            f"{len(body.tests)} tests is over this server's limit of {settings.max_tests}", param="tests"
        )


# ---------------------------------------------------------------------------------------------- the handler
@dataclass
class PreparedRequest:
    shape: ResponseShape
    body: SamplingFields
    prompt: Prompt
    choice: StrategyChoice
    context: StrategyContext
    trace_id: str
    request_id: str
    model: str
    on_deadline: OnDeadline = "error"
    started: float = field(default_factory=time.monotonic)
    arrived: float = field(default_factory=time.time)

    def headers(self, result: Result | None = None) -> dict[str, str]:
        headers = {"X-Strategy": self.choice.name, "X-Trace-Id": self.trace_id, "X-Request-Id": self.request_id}
        if result is not None:
            headers["X-Samples"] = str(self.context.samples_drawn)
            headers["X-Generated-Tokens"] = str(self.context.generated_tokens)
            if "deadline" in result.details:
                headers["X-Deadline-Exceeded"] = "best_so_far"
        return headers


class CompletionService:
    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        renderer: PromptRenderer,
        strategies: Mapping[str, Strategy],
        verifiers: Mapping[str, Verifier],
        journal: TraceJournal,
        metrics: PonderMetrics,
        admission: AdmissionController | None = None,
        redactor: Redactor | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.admission = admission or AdmissionController(
            settings.max_inflight_cost, settings.max_queued_requests, settings.max_queue_wait_s, metrics
        )
        self.rate_limiter = rate_limiter or RateLimiter(
            settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute, metrics=metrics
        )
        self.redactor = redactor or Redactor(settings.trace_content, settings.mask_secrets, settings.api_keys)
        self.engine = engine
        self.renderer = renderer
        self.strategies = strategies
        self.verifiers = verifiers
        self.journal = journal
        self.metrics = metrics
        self.unavailable_verifiers = {
            name: reason
            for name, verifier in verifiers.items()
            if (reason := verifier.unavailable_reason(engine) or missing_capabilities(verifier.requires, engine))
        }
        # What option validation needs to know of the verifiers: fixed for the server's life, built once.
        self._verifier_context = {
            "verifiers": set(verifiers),
            "reference_verifiers": {name for name, v in verifiers.items() if v.needs_reference},
            "test_verifiers": {name for name, v in verifiers.items() if v.needs_tests},
            "unavailable_verifiers": self.unavailable_verifiers,
        }

    # -- entry points
    async def chat(self, body: ChatCompletionRequest, request: Request):
        check_request_limits(body, self.settings)
        messages = [m.model_dump(exclude_none=True, include={"role", "content", "name"}) for m in body.messages]
        for m, original in zip(messages, body.messages):
            m["content"] = original.text()
        try:
            prompt_ids = self.renderer.chat_ids(messages)
        except Exception as exc:  # a template that rejects the message order, say
            raise invalid_request(
                f"the messages do not fit the model's chat template: {exc}", param="messages"
            ) from exc
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        prompt = Prompt(tuple(prompt_ids), question, tuple(messages), body.reference, tuple(body.tests or ()))
        return await self._serve(CHAT, body, prompt, request, body.reasoning_effort)

    async def completion(self, body: CompletionRequest, request: Request):
        check_request_limits(body, self.settings)
        raw = body.prompt
        if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            ids = [int(x) for x in raw]
            if not all(0 <= t < self.renderer.vocab_size for t in ids):
                raise invalid_request("prompt token ids must lie inside the vocabulary", param="prompt")
            question = ""
        else:
            texts = [raw] if isinstance(raw, str) else raw
            if len(texts) != 1:
                raise invalid_request("send one prompt per request (batched prompts are not supported)", param="prompt")
            question = texts[0]
            ids = self.renderer.text_ids(question)
        if not ids:
            raise invalid_request("the prompt is empty", param="prompt")
        prompt = Prompt(tuple(ids), question, None, body.reference, tuple(body.tests or ()))
        return await self._serve(COMPLETION, body, prompt, request, None)

    # -- shared flow
    def _prepare(
        self, shape: ResponseShape, body: SamplingFields, prompt: Prompt, request: Request, effort: str | None
    ) -> PreparedRequest:
        if body.model != self.engine.model_name:
            raise OpenAIError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.engine.model_name!r}",
                param="model",
                code="model_not_found",
            )
        reject_unsupported(body)
        choice = choose_strategy(
            header_name=request.headers.get("x-strategy"),
            header_options=request.headers.get("x-strategy-options"),
            body_strategy=body.strategy,
            reasoning_effort=effort,
            default_name=self.settings.default_strategy,
            strategies=self.strategies,
            validation_context=self._validation_context(prompt),
        )
        if missing := missing_capabilities(choice.strategy.requires, self.engine):
            raise invalid_request(
                f"strategy {choice.name!r} {missing}", param="strategy", code="unsupported_by_upstream"
            )
        if not choice.strategy.returns_every_sample and body.n != 1:
            raise invalid_request(f"strategy {choice.name!r} returns one answer: ask with n=1", param="n")
        samples = choice.strategy.planned_samples(choice.options, body.n)
        if samples > self.settings.max_samples_per_request:
            cap = self.settings.max_samples_per_request
            if choice.strategy.returns_every_sample:
                raise invalid_request(f"n={samples} is over this server's cap of {cap}", param="n")
            raise invalid_request(
                f"strategy {choice.name!r} with these options would draw {samples} samples, over this server's "
                f"cap of {cap}",
                param="strategy",
            )
        max_tokens = resolve_max_tokens(
            body.requested_max_tokens,
            len(prompt.token_ids),
            self.engine.max_model_len,
            self.settings.max_tokens_cap,
            prompt_param="messages" if shape is CHAT else "prompt",
        )
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            min_p=body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop_list(),
            logit_bias=parse_logit_bias(body.logit_bias, self.renderer.vocab_size),
            # With heads, every sample carries their joint at every token (same forward pass, no extra cost):
            # the introspection verifier, the adaptive strategy and the trace read it.
            logprob_token_ids=self.engine.introspection.token_ids if self.engine.introspection else (),
            logprobs=choice.strategy.reads_logprobs,
        )
        trace_id = new_trace_id()
        request_id = request.headers.get("x-request-id") or trace_id
        seconds, on_deadline = resolve_deadline(
            request.headers.get("x-deadline"),
            request.headers.get("x-on-deadline"),
            body,
            self.settings.request_timeout_s,
        )
        deadline = time.monotonic() + seconds if seconds is not None else None
        context = StrategyContext(
            engine=self.engine,
            verifiers=self.verifiers,
            budget=Budget(max_samples=samples, max_tokens=max_tokens, deadline=deadline),
            sampling=sampling,
            request_id=trace_id,
            render_chat=self.renderer.chat_ids,
            encode=self.renderer.encode,
            keeps_answers=deadline is not None and on_deadline == "best_so_far",
        )
        return PreparedRequest(
            shape, body, prompt, choice, context, trace_id, request_id, self.engine.model_name, on_deadline
        )

    def _validation_context(self, prompt: Prompt) -> dict[str, Any]:
        return {
            **self._verifier_context,
            "max_samples": self.settings.max_samples_per_request,
            "has_reference": prompt.reference is not None,
            "has_tests": bool(prompt.tests),
            "has_introspection": self.engine.introspection is not None,
        }

    async def _serve(
        self, shape: ResponseShape, body: SamplingFields, prompt: Prompt, request: Request, effort: str | None
    ):
        prepared = self._prepare(shape, body, prompt, request, effort)
        budget = prepared.context.budget
        cost = request_cost(budget.max_samples, budget.max_tokens)
        grant = self.rate_limiter.take(client_identity(request), cost)  # a 429 here never queues
        request.state.rate_limit_grant = grant  # its x-ratelimit-* headers go on the response (RateLimitHeaders)
        try:  # a client that leaves while queued frees its place
            ticket = await until_disconnected(request, self.admission.admit(cost))
        except ClientDisconnected:
            grant.give_back()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except BaseException:  # refused by admission (429/503): it never ran, so its client may spend it again
            grant.give_back()
            raise
        if body.stream:
            return AdmittedStreamingResponse(
                self._stream(prepared, request), ticket, media_type="text/event-stream", headers=prepared.headers()
            )
        try:
            return await self._answer(prepared, request)
        finally:
            ticket.release()

    async def _answer(self, prepared: PreparedRequest, request: Request) -> Response:
        self.metrics.in_flight.labels(prepared.choice.name).inc()
        status, error = "cancelled", "the server stopped the request"
        result: Result | None = None
        try:
            result = await until_disconnected(request, self._run(prepared))
            status, error = "ok", None
        except ClientDisconnected:
            error = "client went away"
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:
            failure = self._as_openai_error(exc)
            failure.headers.update(prepared.headers())
            status, error = "error", failure.message
            raise failure from exc
        finally:
            self.metrics.in_flight.labels(prepared.choice.name).dec()
            self._finish(prepared, result, status, error)
        return JSONResponse(self._response_body(prepared, result), headers=prepared.headers(result))

    async def _run(self, prepared: PreparedRequest) -> Result:
        strategy = prepared.choice.strategy
        try:
            return await strategy.run(prepared.context, prepared.prompt, prepared.choice.options)
        except DeadlineExceeded as exc:
            result = None
            if prepared.on_deadline == "best_so_far":
                result = best_so_far(prepared.context, strategy.returns_every_sample)
            outcome = "best_so_far" if result is not None else "error"
            self.metrics.deadline_exceeded.labels(prepared.choice.name, outcome).inc()
            if result is not None:
                return result
            if prepared.on_deadline == "best_so_far":
                raise DeadlineExceeded(f"{exc}, before the strategy had drawn any answer") from exc
            raise

    async def _stream(self, prepared: PreparedRequest, request: Request) -> AsyncIterator[str]:
        shape, name = prepared.shape, prepared.choice.name
        chunk_id = shape.id_prefix + prepared.trace_id.removeprefix("tr-")
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            payload: dict[str, Any] = {
                "id": chunk_id,
                "object": shape.chunk_object,
                "created": created,
                "model": prepared.model,
                "choices": choices,
            }
            if usage is not None:
                payload["usage"] = usage
            return sse(payload)

        queue: asyncio.Queue[GenerationDelta | object | None] = asyncio.Queue()
        heartbeats = HeartbeatTimer(queue, self.settings.heartbeat_interval_s)

        async def on_delta(delta: GenerationDelta) -> None:
            heartbeats.touch()
            queue.put_nowait(delta)

        prepared.context.on_delta = on_delta
        self.metrics.in_flight.labels(name).inc()
        task = asyncio.create_task(self._run(prepared))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        status, error_message, result = "cancelled", "client went away", None
        finished: set[int] = set()  # choice indices whose finish_reason went out
        try:
            n_choices = prepared.body.n if prepared.choice.strategy.returns_every_sample else 1
            if shape is CHAT:
                yield chunk([shape.chunk_choice(i, "", None, role=True) for i in range(n_choices)])
            while True:
                item = await queue.get()
                if item is HEARTBEAT_DUE:
                    yield HEARTBEAT  # an SSE comment: keeps proxies from closing a quiet connection
                    continue
                if item is None:
                    break
                assert isinstance(item, GenerationDelta)
                reason = finish_reason_for_client(item.finish_reason) if item.finish_reason else None
                if reason:
                    finished.add(item.index)
                if item.text or reason:
                    yield chunk([shape.chunk_choice(item.index, item.text, reason)])
            try:
                result = task.result()
            except Exception as exc:
                error = self._as_openai_error(exc)
                status, error_message = "error", error.message
                yield error.sse_event()
                yield "data: [DONE]\n\n"
                return
            if "deadline" in result.details:
                yield ": deadline exceeded: the best answer so far follows\n\n"
            if not result.streamed:
                chosen = result.the_one.generation
                yield chunk([shape.chunk_choice(0, chosen.text, None)])
                yield chunk([shape.chunk_choice(0, None, finish_reason_for_client(chosen.finish_reason))])
            else:  # samples the deadline cut mid-stream have had no finish_reason yet
                for k, i in enumerate(result.chosen):
                    if k not in finished:
                        reason = finish_reason_for_client(result.candidates[i].generation.finish_reason)
                        yield chunk([shape.chunk_choice(k, None, reason)])
            options = prepared.body.stream_options
            if options is not None and options.include_usage:
                yield chunk([], self._usage(prepared, result))
            yield "data: [DONE]\n\n"
            status, error_message = "ok", None
        finally:
            # Nothing here may await: when the client disconnects, Starlette cancels this generator's scope, and
            # an await in `finally` would be cancelled too, losing the bookkeeping below.
            heartbeats.cancel()
            self.metrics.in_flight.labels(name).dec()
            if task.done():
                self._finish(prepared, result if status == "ok" else None, status, error_message)
            else:
                task.cancel()  # the client left: cancelling the strategy aborts its engine requests
                task.add_done_callback(lambda _: self._finish(prepared, None, status, error_message))

    # -- results
    def _usage(self, prepared: PreparedRequest, result: Result) -> dict[str, Any]:
        return usage_body(len(prepared.prompt.token_ids), prepared.context.generated_tokens, result.returned_tokens)

    def _response_body(self, prepared: PreparedRequest, result: Result) -> dict[str, Any]:
        shape = prepared.shape
        choices = [
            shape.choice(
                k, result.candidates[i].text, finish_reason_for_client(result.candidates[i].generation.finish_reason)
            )
            for k, i in enumerate(result.chosen)
        ]
        return {
            "id": shape.id_prefix + prepared.trace_id.removeprefix("tr-"),
            "object": shape.object,
            "created": int(time.time()),
            "model": prepared.model,
            "choices": choices,
            "usage": self._usage(prepared, result),
        }

    def _as_openai_error(self, exc: BaseException) -> OpenAIError:
        if isinstance(exc, OpenAIError):
            return exc
        if isinstance(exc, EngineDeadError):
            return OpenAIError(503, str(exc), code="engine_dead")
        if isinstance(exc, UpstreamError):
            return OpenAIError(502, str(exc), code="upstream_error")
        if isinstance(exc, DeadlineExceeded):
            return OpenAIError(504, str(exc), code="deadline_exceeded")
        logger.exception("strategy failed", exc_info=exc)
        return OpenAIError(500, f"the strategy failed: {type(exc).__name__}: {exc}", code="strategy_failed")

    def _finish(self, prepared: PreparedRequest, result: Result | None, status: str, error: str | None) -> None:
        """Metrics and the trace record, once per request whatever its outcome."""
        name = prepared.choice.name
        ctx = prepared.context
        latency = time.monotonic() - prepared.started
        self.metrics.requests.labels(name, status).inc()
        self.metrics.request_duration.labels(name).observe(latency)
        self.metrics.samples.labels(name).observe(ctx.samples_drawn)
        returned = result.returned_tokens if result else 0
        self.metrics.generated_tokens.labels(name, "returned").inc(returned)
        self.metrics.generated_tokens.labels(name, "hidden").inc(ctx.generated_tokens - returned)
        if result is not None:
            for candidate in result.candidates:
                for verifier, score in candidate.scores.items():
                    self.metrics.verifier_score.labels(verifier).observe(score)
        try:
            record = self.redactor.trace_record(trace_record(prepared, result, status, error, latency))
            self.journal.append(record)
        except Exception:
            self.metrics.trace_write_errors.inc()
            logger.exception("could not queue trace %s", prepared.trace_id)


def trace_record(
    prepared: PreparedRequest, result: Result | None, status: str, error: str | None, latency: float
) -> dict[str, Any]:
    """The journal line for one request (schema in docs/traces.md)."""
    body, ctx, prompt = prepared.body, prepared.context, prepared.prompt
    candidates = []
    if result is not None:
        reference = (
            reference_scores([c.text for c in result.candidates], prompt.reference) if prompt.reference else None
        )
        for k, c in enumerate(result.candidates):
            scores = dict(c.scores)
            if reference is not None:
                scores.setdefault("reference", reference[k])
            candidates.append(
                {
                    "index": c.index,
                    "text": c.text,
                    "num_tokens": c.generation.num_tokens,
                    "token_ids": list(c.generation.token_ids),
                    "finish_reason": c.generation.finish_reason,
                    "cumulative_logprob": c.generation.cumulative_logprob if ctx.sampling.logprobs else None,
                    "answer": c.answer if c.answer is not None else extract_answer(c.text),
                    "scores": scores,
                }
            )
    returned = result.returned_tokens if result else 0
    usage = usage_body(len(prompt.token_ids), ctx.generated_tokens, returned)
    sampling = ctx.sampling
    return request_record(
        created=prepared.arrived,
        trace_id=prepared.trace_id,
        request_id=prepared.request_id,
        endpoint=prepared.shape.endpoint,
        model=prepared.model,
        input={"messages": list(prompt.messages)} if prompt.messages is not None else {"prompt": prompt.question},
        sampling={
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "n": body.n,
            "stop": list(sampling.stop),
            "seed_ignored": body.seed is not None,
        },
        reference=prompt.reference,
        tests=list(prompt.tests),
        strategy={
            "name": prepared.choice.name,
            "options": prepared.choice.options.model_dump(),
            "source": prepared.choice.source,
        },
        candidates=candidates,
        chosen_index=result.chosen[0] if result else None,
        chosen_indices=list(result.chosen) if result else [],
        details=dict(result.details) if result else {},
        engine_calls=[vars(call) | {} for call in ctx.calls],
        usage={
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "returned_tokens": returned,
            "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"],
        },
        latency_s=latency,
        status=status,
        error=error,
    )
