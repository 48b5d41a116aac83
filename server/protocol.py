"""Request and response bodies of the OpenAI-compatible routes.

Request models follow OpenAI's field order, tolerate fields they do not know (an unchanged client may send
newer ones) and log them. Ponder's own extensions come last: `strategy` (which test-time strategy, with its
options) and `reference` (a reference answer, recorded in the trace for evaluation and training).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)


class TolerantModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def log_unknown_fields(self) -> TolerantModel:
        if self.model_extra:
            logger.info("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self


class TextPart(TolerantModel):
    type: Literal["text"]
    text: str


class ChatMessage(TolerantModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(TolerantModel):
    include_usage: bool = False


class SamplingFields(TolerantModel):
    """Fields both endpoints share, in OpenAI's order."""

    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM's sampling extensions
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    # Ponder's extensions
    strategy: str | dict[str, Any] | None = None
    reference: str | None = None
    tests: list[str] | None = None  # checks a verifier may run on candidates (e.g. code_tests)
    deadline_s: float | None = Field(None, gt=0, description="seconds this request may take (strategies/deadline.py)")
    on_deadline: Literal["error", "best_so_far"] = "error"

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = Field(16, ge=1)
    suffix: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reward: float = Field(ge=0.0, le=1.0, description="how good the served answer was, 0 (wrong) to 1 (right)")
    reference: str | None = Field(None, description="the correct answer, if known")
    comment: str | None = None
