"""What of a request's content may leave the process: the trace journal (and so /v1/traces) and the logs.

Two independent settings:
- `trace_content` (`keep` | `hash` | `drop`): message, prompt, candidate, reference and test text in a trace is
  kept, replaced by `sha256:<hex>` (equal texts stay joinable, e.g. to find repeated prompts), or replaced by null.
- `mask_secrets`: anything that looks like a credential (the server's own API keys, `Bearer ...`, OpenAI-style
  `sk-...` keys, `api_key=...` assignments, AWS access key ids) is replaced by `[REDACTED]` in every string of a
  trace record and in every log line, whatever `trace_content` says.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from server.settings import TraceContent

MASK = "[REDACTED]"
SECRET_PATTERNS = (
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"(?i)\b(api[_-]?key|secret|token|password)([\"']?\s*[=:]\s*[\"']?)[^\s\"',;]{8,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
)
# Fields of a trace's `details` that describe the search, not the content; everything else there is content.
DETAIL_METADATA_KEYS = frozenset({"mode", "stopped_because", "id", "parent", "depth", "value", "visits"})


def mask_secrets(text: str, known_secrets: Iterable[str] = ()) -> str:
    for secret in known_secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    for pattern in SECRET_PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
        else:
            text = pattern.sub(MASK, text)
    return text


def hash_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def map_strings(value: Any, transform: Callable[[str], Any], *, keys: bool = False) -> Any:
    """`value` with `transform` applied to every string in it (and to dict keys when `keys`)."""
    if isinstance(value, str):
        return transform(value)
    if isinstance(value, dict):
        return {
            (transform(k) if keys and isinstance(k, str) else k): map_strings(v, transform, keys=keys)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [map_strings(item, transform, keys=keys) for item in value]
    return value


class Redactor:
    def __init__(self, trace_content: TraceContent = "keep", mask: bool = True, known_secrets: Iterable[str] = ()):
        self.trace_content = trace_content
        self.mask = mask
        self.known_secrets = tuple(sorted((s for s in known_secrets if s), key=len, reverse=True))

    def text(self, text: str) -> str:
        """Secrets masked (when configured): for any text that leaves the process."""
        return mask_secrets(text, self.known_secrets) if self.mask else text

    def content(self, text: Any) -> Any:
        """A piece of request or answer content, as `trace_content` says."""
        if not isinstance(text, str) or self.trace_content == "keep":
            return text
        return hash_text(text) if self.trace_content == "hash" else None

    def trace_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A new record: content fields handled per `trace_content`, then secrets masked in every string."""
        record = dict(record)
        if self.trace_content != "keep":
            record = self._without_content(record)
        return map_strings(record, self.text, keys=True) if self.mask else record

    def _without_content(self, record: dict[str, Any]) -> dict[str, Any]:
        content = self.content
        record["input"] = self._input(record.get("input") or {})
        for key in ("reference", "error"):
            record[key] = content(record.get(key))
        record["tests"] = [content(t) for t in record.get("tests") or []]
        record["candidates"] = [
            # token ids spell the text out: they go whenever the text does not stay as it is
            c | {"text": content(c.get("text")), "answer": content(c.get("answer")), "token_ids": None}
            for c in record.get("candidates", [])
        ]
        record["details"] = self._details(record.get("details") or {})
        if record.get("type") == "feedback":
            record["comment"] = content(record.get("comment"))
        return record

    def _input(self, given: dict[str, Any]) -> dict[str, Any]:
        """{"messages": [...]} keeps each message's role; {"prompt": text} is all content."""
        if "messages" in given:
            return given | {"messages": [m | {"content": self.content(m.get("content"))} for m in given["messages"]]}
        return map_strings(given, self.content)

    def _details(self, value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            keys_are_content = key == "votes"  # {answer: count}
            return {(self.content(k) if keys_are_content else k): self._details(v, k) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._details(item, key) for item in value]
        if isinstance(value, str) and key not in DETAIL_METADATA_KEYS:
            return self.content(value)
        return value


class SecretMaskingFilter(logging.Filter):
    """Masks secrets in a log record's rendered message (and its exception text) before any handler sees it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.redactor.text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.text(record.exc_text)
        return True


def install_log_masking(redactor: Redactor) -> Callable[[], None]:
    """Every log record created from now on, by any logger (Ponder's, uvicorn's, vLLM's), is masked at creation:
    a record factory, unlike a handler filter, also covers handlers that libraries add later. Returns an undo."""
    previous = logging.getLogRecordFactory()
    masking = SecretMaskingFilter(redactor)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        masking.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    return lambda: logging.setLogRecordFactory(previous)
