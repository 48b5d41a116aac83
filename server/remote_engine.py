"""An Engine over one or more OpenAI-compatible upstreams (`ponder serve --upstream http://host:port/v1`).

Ponder keeps rendering prompts itself (tokenizer and chat template from the local `--model` directory) and sends
token ids to `/v1/completions`. Against a vLLM upstream every engine feature maps onto vLLM's extra request
fields (`return_token_ids`, `logprob_token_ids`, `prompt_logprobs`, ...); against a plain OpenAI-style upstream
the prompt goes as text and the strategies and verifiers that need exact token ids or tracked log-probs are
refused with a 400 (see `capabilities`).

Every sampling call is streamed from the upstream, so the caller hears of tokens as they come and closing the
stream (a cancelled call, a client that went away, `abort`) closes the HTTP response: vLLM then aborts the
request. A request's calls share one upstream (its prefix cache); new requests go to the least-loaded live
upstream; one that fails to connect is taken out and probed again with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
import openai

from server.engine import (
    ALL_CAPABILITIES,
    TOKEN_IDS,
    TRACKED_LOGPROBS,
    EngineDeadError,
    Generation,
    GenerationDelta,
    SampleSink,
    SamplingOptions,
    UpstreamError,
)
from server.introspection import MASK_BIAS, IntrospectionHeads

logger = logging.getLogger(__name__)

UpstreamKind = Literal["vllm", "openai"]
Clock = Callable[[], float]

# HTTP statuses after which an upstream is taken out (its server is down or overloaded), rather than the call
# alone failing with a 502.
UPSTREAM_DOWN_STATUSES = frozenset({502, 503, 504})
STICKY_CAPACITY = 4096  # request keys remembered for stickiness (least recently used evicted first)
HEALTH_PROBE_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------------------- routing (pure)
_CALL_ID = re.compile(r"^(?P<request>.+)-[a-z_]+-\d+$")


def sticky_key(request_id: str) -> str:
    """The request a call belongs to: `StrategyContext.next_request_id` makes ids `<trace id>-<kind>-<count>`."""
    match = _CALL_ID.match(request_id)
    return match["request"] if match else request_id


def backoff_seconds(failures: int, base_s: float, cap_s: float) -> float:
    """Wait before probing an upstream again after `failures` consecutive failures: base, 2 base, 4 base, ..."""
    return min(cap_s, base_s * 2 ** max(0, failures - 1))


@dataclass
class Upstream:
    """One OpenAI-compatible server and what the router knows of it."""

    url: str
    client: openai.AsyncOpenAI
    in_flight: int = 0
    picks: int = 0  # how often it was chosen: rotates ties between equally loaded upstreams
    failures: int = 0  # consecutive
    down: bool = False
    retry_at: float = 0.0  # monotonic time of the next probe while down
    last_error: str | None = None

    def state(self, now: float) -> dict[str, Any]:
        state: dict[str, Any] = {"url": self.url, "state": "down" if self.down else "up", "in_flight": self.in_flight}
        if self.down:
            state |= {"failures": self.failures, "retry_in_s": round(max(0.0, self.retry_at - now), 1)}
        if self.last_error:
            state["last_error"] = self.last_error
        return state


def least_loaded(upstreams: Sequence[Upstream], now: float, exclude: frozenset[str] = frozenset()) -> Upstream | None:
    """The live upstream with the fewest calls in flight; with none live, one whose backoff has run out (a trial
    call), else None."""
    candidates = [u for u in upstreams if u.url not in exclude and not u.down]
    if not candidates:
        candidates = [u for u in upstreams if u.url not in exclude and u.retry_at <= now]
    if not candidates:
        return None
    return min(candidates, key=lambda u: (u.in_flight, u.picks))


class UpstreamRouter:
    """Chooses the upstream for each call: sticky per request, else least-loaded; keeps up/down state."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self.upstreams = list(upstreams)
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.clock = clock
        self._sticky: OrderedDict[str, Upstream] = OrderedDict()

    def route(self, request_id: str, exclude: frozenset[str] = frozenset()) -> Upstream:
        key = sticky_key(request_id)
        pinned = self._sticky.get(key)
        if pinned is not None and not pinned.down and pinned.url not in exclude:
            self._sticky.move_to_end(key)
            return pinned
        chosen = least_loaded(self.upstreams, self.clock(), exclude)
        if chosen is None:
            raise EngineDeadError(f"no upstream can take the request: {self.describe()}")
        chosen.picks += 1
        self._sticky[key] = chosen
        self._sticky.move_to_end(key)
        while len(self._sticky) > STICKY_CAPACITY:
            self._sticky.popitem(last=False)
        return chosen

    def mark_down(self, upstream: Upstream, error: str) -> None:
        if not upstream.down:
            logger.warning("upstream %s is down: %s", upstream.url, error)
        upstream.down = True
        upstream.failures += 1
        upstream.last_error = error
        upstream.retry_at = self.clock() + backoff_seconds(upstream.failures, self.backoff_base_s, self.backoff_cap_s)

    def mark_up(self, upstream: Upstream) -> None:
        if upstream.down:
            logger.info("upstream %s is back", upstream.url)
        upstream.down = False
        upstream.failures = 0

    def due_for_probe(self) -> list[Upstream]:
        now = self.clock()
        return [u for u in self.upstreams if u.down and u.retry_at <= now]

    def next_probe_in(self) -> float | None:
        waits = [u.retry_at - self.clock() for u in self.upstreams if u.down]
        return max(0.0, min(waits)) if waits else None

    def states(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [u.state(now) for u in self.upstreams]

    def describe(self) -> str:
        return "; ".join(
            f"{u.url} {'down' if u.down else 'up'}" + (f" ({u.last_error})" if u.down else "") for u in self.upstreams
        )


# ---------------------------------------------------------------------------------------------- requests (pure)
def completion_body(
    prompt_ids: Sequence[int],
    options: SamplingOptions,
    n: int,
    *,
    model: str,
    kind: UpstreamKind,
    decode: Callable[[Sequence[int]], str] | None = None,
    masked_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The keyword arguments of `completions.create` for one call. Never a `seed`: on vLLM's CPU backend a
    per-request seed can kill the engine core."""
    logit_bias = dict(options.logit_bias) | dict.fromkeys(masked_ids, MASK_BIAS)
    body: dict[str, Any] = {
        "model": model,
        "n": n,
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
    }
    if options.stop:
        body["stop"] = list(options.stop)
    if logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in logit_bias.items()}
    extra: dict[str, Any] = {}
    if kind == "vllm":
        body["prompt"] = list(prompt_ids)
        # The sampled token's log-prob unless the caller reads none; vLLM wants `logprobs` set when ids are tracked.
        if options.logprob_token_ids or options.logprobs:
            body["logprobs"] = len(options.logprob_token_ids)
        extra |= {
            "top_k": options.top_k if options.top_k > 0 else -1,
            "min_p": options.min_p,
            "repetition_penalty": options.repetition_penalty,
            "include_stop_str_in_output": options.include_stop_str_in_output,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,  # top_logprobs keyed "token_id:<id>"
        }
        if options.stop_token_ids:
            extra["stop_token_ids"] = list(options.stop_token_ids)
        if options.logprob_token_ids:
            extra["logprob_token_ids"] = list(options.logprob_token_ids)
    else:
        if decode is None:
            raise ValueError("a plain OpenAI upstream takes text: pass `decode`")
        body["prompt"] = decode(prompt_ids)
        if options.logprobs:
            body["logprobs"] = 1
        # vLLM's own knobs, only where the request changed them: a plain upstream may reject unknown fields.
        if options.top_k > 0:
            extra["top_k"] = options.top_k
        if options.min_p:
            extra["min_p"] = options.min_p
        if options.repetition_penalty != 1.0:
            extra["repetition_penalty"] = options.repetition_penalty
        if options.stop_token_ids:
            extra["stop_token_ids"] = list(options.stop_token_ids)
    if extra:
        body["extra_body"] = extra
    return body


def token_id_of(key: str) -> int | None:
    """vLLM's `return_tokens_as_token_ids` spelling of a token, "token_id:123" -> 123."""
    prefix, _, rest = key.partition(":")
    return int(rest) if prefix == "token_id" and rest.lstrip("-").isdigit() else None


@dataclass(frozen=True)
class ChoicePiece:
    """What one streamed chunk adds to one sample."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprob: float  # summed over the piece's tokens
    tracked: tuple[dict[int, float], ...]
    finish_reason: str | None


def choice_piece(choice: Any, tracked_ids: Sequence[int], encode: Callable[[str], list[int]] | None) -> ChoicePiece:
    """One streamed choice of a completions chunk. vLLM returns the new `token_ids`; a plain upstream only
    text, which is then re-tokenized locally (counts for usage, not exact ids)."""
    text = choice.text or ""
    token_ids = getattr(choice, "token_ids", None)
    if token_ids is None:
        token_ids = encode(text) if (encode is not None and text) else []
    logprobs = choice.logprobs
    token_logprobs = [lp for lp in (getattr(logprobs, "token_logprobs", None) or []) if lp is not None]
    tracked: tuple[dict[int, float], ...] = ()
    if tracked_ids and logprobs is not None and logprobs.top_logprobs:
        wanted = set(tracked_ids)
        tracked = tuple(
            {tid: float(lp) for key, lp in (position or {}).items() if (tid := token_id_of(key)) in wanted}
            for position in logprobs.top_logprobs
        )
    return ChoicePiece(
        index=choice.index,
        text=text,
        token_ids=tuple(int(t) for t in token_ids),
        logprob=float(sum(token_logprobs)),
        tracked=tracked,
        finish_reason=choice.finish_reason,
    )


@dataclass
class SampleParts:
    """One sample of a streamed call, assembled piece by piece."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprob: float = 0.0
    tracked: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str = "abort"
    finished: bool = False

    def add(self, piece: ChoicePiece) -> None:
        self.texts.append(piece.text)
        self.token_ids.extend(piece.token_ids)
        self.logprob += piece.logprob
        self.tracked.extend(piece.tracked)
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
            self.finished = True

    def generation(self) -> Generation:
        return Generation(
            text="".join(self.texts),
            token_ids=tuple(self.token_ids),
            finish_reason=self.finish_reason,
            cumulative_logprob=self.logprob,
            tracked_logprobs=tuple(self.tracked),
        )


def prompt_logprob_values(prompt_ids: Sequence[int], positions: Sequence[Mapping[str, Any] | None]) -> list[float]:
    """vLLM's `prompt_logprobs` (JSON: one {"<id>": {"logprob": ...}} per prompt token, None first)."""
    values = []
    for tid, position in zip(prompt_ids, positions):
        entry = (position or {}).get(str(tid))
        values.append(0.0 if entry is None else float(entry["logprob"] if isinstance(entry, Mapping) else entry))
    return values


def upstream_failure(exc: Exception) -> tuple[bool, str]:
    """(does it take the upstream out, a message) for an error of the openai client (or of its transport)."""
    if isinstance(exc, (openai.APIConnectionError, httpx2.HTTPError)):  # refused, reset, timed out
        return True, f"{type(exc).__name__}: {exc}"
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc)
    if status is None:
        return False, f"the upstream stream failed: {message}"
    return status in UPSTREAM_DOWN_STATUSES, f"the upstream answered {status}: {message}"


# ---------------------------------------------------------------------------------------------- the engine
class RemoteEngine:
    """`server.engine.Engine` over OpenAI-compatible upstreams. Build it with `RemoteEngine.connect(...)` inside
    the running event loop (the app's lifespan does)."""

    def __init__(
        self,
        router: UpstreamRouter,
        *,
        model_name: str,
        upstream_model: str,
        max_model_len: int,
        kind: UpstreamKind,
        decode: Callable[[Sequence[int]], str] | None = None,
        encode: Callable[[str], list[int]] | None = None,
        introspection: IntrospectionHeads | None = None,
    ) -> None:
        self.router = router
        self.model_name = model_name
        self.upstream_model = upstream_model
        self.max_model_len = max_model_len
        self.kind: UpstreamKind = kind
        self.introspection = introspection if kind == "vllm" else None
        self.capabilities = ALL_CAPABILITIES if kind == "vllm" else ALL_CAPABILITIES - {TOKEN_IDS, TRACKED_LOGPROBS}
        self._decode = decode
        self._encode = encode if kind == "openai" else None
        self._masked_ids = self.introspection.token_ids if self.introspection else ()
        self._open_streams: dict[str, Any] = {}  # request id -> the upstream stream, for abort()
        self._aborted: set[str] = set()
        self._prober: asyncio.Task[None] | None = None

    @classmethod
    def connect(
        cls,
        urls: Sequence[str],
        *,
        api_key: str = "unused",
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 0,
        max_connections: int = 256,
        **engine_kwargs: Any,
    ) -> RemoteEngine:
        """One pooled `AsyncOpenAI` client per upstream. `max_retries` are the client's own retries of a call
        (connection errors, 429, 5xx); a call is also tried once on each other live upstream before it fails.
        A request's `--request-timeout` bounds all of it: the strategy cancels the call at the deadline."""
        upstreams = [
            Upstream(
                url=url.rstrip("/"),
                client=openai.AsyncOpenAI(
                    base_url=url.rstrip("/"),
                    api_key=api_key,
                    max_retries=max_retries,
                    timeout=httpx2.Timeout(timeout_s, connect=connect_timeout_s),
                    http_client=openai.DefaultAsyncHttpxClient(
                        limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=64),
                        timeout=httpx2.Timeout(timeout_s, connect=connect_timeout_s),
                    ),
                ),
            )
            for url in urls
        ]
        return cls(UpstreamRouter(upstreams), **engine_kwargs)

    # -- sampling
    async def generate(
        self,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        n: int,
        request_id: str,
        on_tokens: Callable[[int], None] | None = None,
        on_sample: SampleSink | None = None,
    ) -> list[Generation]:
        samples = [SampleParts() for _ in range(n)]
        try:
            async with contextlib.aclosing(self._pieces(prompt_ids, options, n, request_id)) as pieces:
                async for piece in pieces:
                    samples[piece.index].add(piece)
                    if on_tokens is not None and piece.token_ids:
                        on_tokens(len(piece.token_ids))
                    if on_sample is not None and piece.finish_reason:
                        on_sample(piece.index, samples[piece.index].generation())
        except asyncio.CancelledError:
            if on_sample is not None:
                for index, sample in enumerate(samples):
                    if not sample.finished:
                        on_sample(index, sample.generation())
            raise
        return [sample.generation() for sample in samples]

    async def stream(
        self, prompt_ids: Sequence[int], options: SamplingOptions, n: int, request_id: str
    ) -> AsyncIterator[list[GenerationDelta]]:
        async with contextlib.aclosing(self._pieces(prompt_ids, options, n, request_id)) as pieces:
            async for piece in pieces:
                if piece.text or piece.token_ids or piece.finish_reason:
                    yield [
                        GenerationDelta(piece.index, piece.text, piece.token_ids, piece.logprob, piece.finish_reason)
                    ]

    async def _pieces(
        self, prompt_ids: Sequence[int], options: SamplingOptions, n: int, request_id: str
    ) -> AsyncIterator[ChoicePiece]:
        body = completion_body(
            prompt_ids,
            options,
            n,
            model=self.upstream_model,
            kind=self.kind,
            decode=self._decode,
            masked_ids=self._masked_ids,
        )
        tracked_ids = options.logprob_token_ids
        async with contextlib.aclosing(self._chunks(request_id, body)) as chunks:
            async for chunk in chunks:
                for choice in chunk.choices:
                    yield choice_piece(choice, tracked_ids, self._encode)

    async def _chunks(self, request_id: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """The upstream's stream of completion chunks. A call that cannot start is tried on each other live
        upstream; one that breaks off after it started is a 502 (its tokens are already out)."""
        self._start_prober()
        tried: frozenset[str] = frozenset()
        while True:
            upstream = self.router.route(request_id, exclude=tried)
            upstream.in_flight += 1
            try:
                try:
                    stream = await upstream.client.completions.create(**body, stream=True)
                except openai.APIError as exc:
                    takes_it_out, message = upstream_failure(exc)
                    if not takes_it_out:
                        raise UpstreamError(f"upstream {upstream.url}: {message}") from exc
                    self.router.mark_down(upstream, message)
                    tried |= {upstream.url}
                    continue
                self.router.mark_up(upstream)
                self._open_streams[request_id] = stream
                try:
                    async with stream:  # leaving it (done, cancelled, closed) closes the HTTP response
                        async for chunk in stream:
                            if request_id in self._aborted:
                                break
                            yield chunk
                except (openai.APIError, httpx2.HTTPError) as exc:
                    if request_id in self._aborted:
                        return  # abort() closed the stream under us: the samples end as "abort"
                    takes_it_out, message = upstream_failure(exc)
                    if takes_it_out:
                        self.router.mark_down(upstream, message)
                    raise UpstreamError(f"upstream {upstream.url} broke off the call: {message}") from exc
                finally:
                    self._open_streams.pop(request_id, None)
                    self._aborted.discard(request_id)
                return
            finally:
                upstream.in_flight -= 1

    async def prompt_logprobs(self, prompt_ids: Sequence[int], request_id: str) -> list[float]:
        if self.kind != "vllm":
            raise UpstreamError("prompt log-probs need a vLLM upstream")
        upstream = self.router.route(request_id)
        upstream.in_flight += 1
        try:
            response = await upstream.client.completions.create(
                model=self.upstream_model,
                prompt=list(prompt_ids),
                max_tokens=1,
                temperature=0.0,
                extra_body={"prompt_logprobs": 0},
            )
        except openai.APIError as exc:
            takes_it_out, message = upstream_failure(exc)
            if takes_it_out:
                self.router.mark_down(upstream, message)
            raise UpstreamError(f"upstream {upstream.url}: {message}") from exc
        finally:
            upstream.in_flight -= 1
        positions = getattr(response.choices[0], "prompt_logprobs", None) or []
        return prompt_logprob_values(prompt_ids, positions)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Close these calls' upstream streams: the upstream aborts them."""
        for request_id in request_ids:
            stream = self._open_streams.get(request_id)
            if stream is not None:
                self._aborted.add(request_id)
                await stream.close()

    # -- health
    async def check_health(self) -> None:
        """Probe every live upstream and each down one whose backoff ran out; raise if none is up."""
        self._start_prober()
        probed = [u for u in self.router.upstreams if not u.down] + self.router.due_for_probe()
        await asyncio.gather(*(self._probe(u) for u in probed))
        if all(u.down for u in self.router.upstreams):
            raise EngineDeadError(f"no upstream is reachable: {self.router.describe()}")

    def health_details(self) -> dict[str, Any]:
        return {"upstream_kind": self.kind, "upstreams": self.router.states()}

    async def _probe(self, upstream: Upstream) -> None:
        try:
            await upstream.client.models.list(timeout=HEALTH_PROBE_TIMEOUT_S)
        except openai.APIError as exc:
            self.router.mark_down(upstream, upstream_failure(exc)[1])
        else:
            self.router.mark_up(upstream)

    def _start_prober(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_down_upstreams())

    async def _probe_down_upstreams(self) -> None:
        """Brings taken-out upstreams back: each is probed when its backoff runs out (started by the first call
        or health check, stopped by `shutdown`)."""
        while True:
            wait = self.router.next_probe_in()
            await asyncio.sleep(1.0 if wait is None else max(wait, 0.05))
            await asyncio.gather(*(self._probe(u) for u in self.router.due_for_probe()))

    async def shutdown(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        for upstream in self.router.upstreams:
            await upstream.client.close()


# ---------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class UpstreamInfo:
    model: str
    max_model_len: int | None
    kind: UpstreamKind


def read_model_card(models_json: Mapping[str, Any], wanted: str | None = None) -> UpstreamInfo:
    """An upstream's GET /models answer -> its model (the wanted one, else the first). vLLM lists
    `max_model_len` on its cards, which is also how a vLLM upstream is told from a plain one."""
    cards = list(models_json.get("data") or [])
    if not cards:
        raise ValueError("the upstream lists no models")
    card = next((c for c in cards if c.get("id") == wanted), None) if wanted else cards[0]
    if card is None:
        raise ValueError(f"the upstream does not serve {wanted!r}; it lists {[c.get('id') for c in cards]}")
    max_len = card.get("max_model_len")
    return UpstreamInfo(
        str(card["id"]), int(max_len) if max_len else None, "vllm" if "max_model_len" in card else "openai"
    )


def discover_upstream(url: str, api_key: str = "unused", timeout_s: float = 10.0, wanted: str | None = None):
    """GET <url>/models, synchronously (at start-up, before the server's loop runs)."""
    response = httpx2.get(
        url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s
    )
    response.raise_for_status()
    return read_model_card(response.json(), wanted)
