"""API keys and request-size limits: what a request must pass before any handler looks at it.

Keys travel as OpenAI's clients send them (`Authorization: Bearer <key>`) and are compared in constant time:
both sides are hashed to 32 bytes first, so `hmac.compare_digest` sees equal lengths, and every configured key
is compared, so the time does not tell which one (or whether an early one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import OpenAIError

API_KEY_ENV = "PONDER_API_KEY"
bearer_scheme = HTTPBearer(auto_error=False, description="an API key from --api-key, PONDER_API_KEY or a keys file")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_label(key: str) -> str:
    """A name for the key that is safe to keep in memory (rate limits are per key): 64 bits of its SHA-256."""
    return "key:" + digest(key).hex()[:16]


def key_matches(presented: str, key_digests: Iterable[bytes]) -> bool:
    """Constant time in the presented key and in which configured key matched."""
    presented_digest = digest(presented)
    matched = False
    for key_digest in key_digests:
        matched |= hmac.compare_digest(presented_digest, key_digest)
    return matched


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and `#` comments are skipped."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def collect_api_keys(flag_keys: Iterable[str] | None, keys_file: Path | None, environ=os.environ) -> tuple[str, ...]:
    """--api-key (repeatable), then PONDER_API_KEY, then --api-keys-file: all of them are valid."""
    keys = [k for k in (flag_keys or []) if k]
    if environ.get(API_KEY_ENV):
        keys.append(environ[API_KEY_ENV])
    if keys_file is not None:
        keys.extend(read_keys_file(keys_file))
    return tuple(dict.fromkeys(keys))


def unauthorized(message: str) -> OpenAIError:
    error = OpenAIError(401, message, code="invalid_api_key")
    error.headers["WWW-Authenticate"] = "Bearer"
    return error


async def require_api_key(request: Request, credentials: BearerCredentials) -> None:
    """A FastAPI dependency: passes when the server has no keys, or the request carries one of them (then its
    `key_label` goes on `request.state.api_key_label`, the identity rate limits count against)."""
    key_digests: tuple[bytes, ...] = request.app.state.api_key_digests
    if not key_digests:
        return
    if credentials is None:
        raise unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
    if not key_matches(credentials.credentials, key_digests):
        raise unauthorized("incorrect API key provided")
    request.state.api_key_label = key_label(credentials.credentials)


async def require_api_key_for_metrics(request: Request, credentials: BearerCredentials) -> None:
    if request.app.state.service.settings.metrics_require_auth:
        await require_api_key(request, credentials)


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` is a 413 before any handler (or JSON parser) reads it.

    A declared Content-Length is checked up front; a chunked body is read up to the limit, then replayed to the
    app as one message (later `receive()` calls, e.g. disconnect watchers, go to the server as before)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self.too_large(scope, receive, send)
                return
        await self.app(scope, replay(b"".join(chunks), receive), send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = OpenAIError(413, f"the request body is over this server's limit of {self.max_bytes} bytes")
        error.code = "request_too_large"
        await error.response()(scope, receive, send)


def replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replaying_receive() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying_receive
