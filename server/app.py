"""The FastAPI application: thin routes over `CompletionService`, built by `create_app(settings)`.

No module globals: everything a route needs lives on `app.state`, so tests build as many apps as they like.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.admission import AdmissionController
from server.engine import Engine, EngineDeadError
from server.errors import OpenAIError, install_error_handlers
from server.metrics import PonderMetrics
from server.prompt_rendering import PromptRenderer
from server.protocol import ChatCompletionRequest, CompletionRequest, FeedbackRequest
from server.rate_limits import RateLimitHeaders
from server.redaction import Redactor
from server.security import BodySizeLimit, digest, require_api_key, require_api_key_for_metrics
from server.serving import CompletionService
from server.settings import ServerSettings
from server.strategy_selection import build_strategies
from server.trace_journal import TraceJournal, feedback_record, find_trace
from verifiers import build_verifiers

logger = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]
RendererFactory = Callable[[], PromptRenderer]


def create_app(settings: ServerSettings, engine_factory: EngineFactory, renderer_factory: RendererFactory) -> FastAPI:
    """The engine and renderer are built at start-up (vLLM must start inside the running loop)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = PonderMetrics()
        journal = TraceJournal(
            settings.trace_dir,
            flush_interval_s=settings.trace_flush_interval_s,
            on_write_error=lambda exc: metrics.trace_write_errors.inc(),
        )
        journal.start()
        engine = engine_factory()
        admission = AdmissionController(
            settings.max_inflight_cost, settings.max_queued_requests, settings.max_queue_wait_s, metrics
        )
        redactor = Redactor(settings.trace_content, settings.mask_secrets, settings.api_keys)
        app.state.service = CompletionService(
            settings,
            engine,
            renderer_factory(),
            build_strategies(),
            build_verifiers(),
            journal,
            metrics,
            admission=admission,
            redactor=redactor,
        )
        app.state.created = int(time.time())
        logger.info("Ponder serves %s on http://%s:%d/v1", engine.model_name, settings.host, settings.port)
        try:
            yield
        finally:
            await journal.close()
            await engine.shutdown()

    app = FastAPI(title="Ponder", version="0.1.0", lifespan=lifespan)
    app.state.api_key_digests = tuple(digest(key) for key in settings.api_keys)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitHeaders)
    install_error_handlers(app)
    add_routes(app)
    return app


def service_of(request: Request) -> CompletionService:
    return request.app.state.service


AUTHENTICATED = [Depends(require_api_key)]


def add_routes(app: FastAPI) -> None:
    """Every route needs an API key (when the server has any) but /health, and /metrics unless configured so."""

    @app.post("/v1/chat/completions", dependencies=AUTHENTICATED)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await service_of(request).chat(body, request)

    @app.post("/v1/completions", dependencies=AUTHENTICATED)
    async def completions(body: CompletionRequest, request: Request):
        return await service_of(request).completion(body, request)

    @app.get("/v1/models", dependencies=AUTHENTICATED)
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(request)]}

    @app.get("/v1/models/{model_id:path}", dependencies=AUTHENTICATED)
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        card = model_card(request)
        if model_id != card["id"]:
            raise OpenAIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return card

    @app.get("/v1/strategies", dependencies=AUTHENTICATED)
    async def list_strategies(request: Request) -> dict[str, Any]:
        service = service_of(request)
        return {
            "object": "list",
            "default": service.settings.default_strategy,
            "data": [
                {"name": s.name, "description": s.description, "options": s.Options.model_json_schema()}
                for s in service.strategies.values()
            ],
            "verifiers": [
                {
                    "name": v.name,
                    "description": v.description,
                    "needs_reference": v.needs_reference,
                    "needs_tests": v.needs_tests,
                    "available": v.name not in service.unavailable_verifiers,
                }
                for v in service.verifiers.values()
            ],
        }

    @app.get("/v1/traces/{trace_id}", dependencies=AUTHENTICATED)
    async def get_trace(trace_id: str, request: Request) -> dict[str, Any]:
        return await lookup_trace(service_of(request), trace_id)

    @app.post("/v1/traces/{trace_id}/feedback", dependencies=AUTHENTICATED)
    async def post_feedback(trace_id: str, body: FeedbackRequest, request: Request) -> dict[str, Any]:
        service = service_of(request)
        await lookup_trace(service, trace_id)
        record = feedback_record(trace_id, body.reward, reference=body.reference, comment=body.comment)
        service.journal.append(service.redactor.trace_record(record))
        service.metrics.feedback.inc()
        return {"object": "trace.feedback", "trace_id": trace_id, "accepted": True}

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Readiness: 503 while draining (a load balancer stops sending), or when the engine does not answer."""
        service = service_of(request)
        if service.admission.draining:
            return OpenAIError(503, "the server is shutting down", code="shutting_down").response()
        engine = service.engine
        try:
            await asyncio.wait_for(engine.check_health(), timeout=10)
        except (EngineDeadError, TimeoutError) as exc:
            return OpenAIError(503, f"engine unavailable: {exc}", code="engine_unavailable").response()
        details = engine.health_details() if hasattr(engine, "health_details") else {}  # a remote engine's upstreams
        return JSONResponse({"status": "ok", **details})

    @app.get("/metrics", dependencies=[Depends(require_api_key_for_metrics)])
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def model_card(request: Request) -> dict[str, Any]:
    service = service_of(request)
    return {
        "id": service.engine.model_name,
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "ponder",
        "max_model_len": service.engine.max_model_len,
    }


async def lookup_trace(service: CompletionService, trace_id: str) -> dict[str, Any]:
    await service.journal.flush()
    record = await asyncio.to_thread(find_trace, service.journal.directory, trace_id)
    if record is None:
        raise OpenAIError(
            404, f"no trace {trace_id!r} in this server's journal", param="trace_id", code="trace_not_found"
        )
    return record


async def drain(service: CompletionService, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Refuse new requests (503, /health too), then wait up to `timeout_s` for admitted and queued ones to end.
    True if everything finished in time."""
    admission = service.admission
    admission.draining = True
    service.metrics.draining.set(1)
    deadline = time.monotonic() + timeout_s
    while admission.running or admission.queue:
        if time.monotonic() >= deadline:
            running, queued = admission.running, len(admission.queue)
            logger.warning("drain timed out with %d requests running, %d queued", running, queued)
            return False
        await asyncio.sleep(poll_s)
    return True
