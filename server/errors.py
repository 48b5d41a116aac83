"""OpenAI's error envelope, and the one chokepoint that turns every exception into it.

Every 4xx/5xx the server sends is `{"error": {"message", "type", "param", "code"}}`. Validation problems are
400s (OpenAI's status), never FastAPI's 422, and an unexpected exception is a logged 500 in the same shape.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
}
# Errors a retry of the same request cannot fix, though OpenAI's SDKs would retry their status by default (every
# 5xx): `x-should-retry: false` stops them. A dead engine needs a restart; a request past its deadline would
# only spend its whole budget again. Admission refusals say `true` (server/admission.py).
NOT_RETRYABLE_CODES = frozenset({"engine_dead", "engine_unavailable", "deadline_exceeded", "strategy_failed"})


class OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers: dict[str, str] = {}  # e.g. X-Trace-Id, so a failed request can still be looked up
        if code in NOT_RETRYABLE_CODES:
            self.headers["x-should-retry"] = "false"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse_event(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, **(headers or {})})


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def param_from_location(location: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages.0.content"; the body itself -> None."""
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return invalid_request("invalid request")
    first = errors[0]
    param = param_from_location(tuple(first.get("loc", ())))
    body_level = param is None and first.get("type") in ("model_attributes_type", "dict_type", "missing")
    if first.get("type") == "json_invalid" or body_level:  # json_invalid's location ends in a character offset
        return invalid_request("the request body must be a JSON object", code="invalid_body")
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return invalid_request(f"{param}: {message}{more}" if param else f"{message}{more}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail)).response(headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
