"""Which strategy runs a request, with which options: header, then body, then `reasoning_effort`, then default.

`X-Strategy: best_of_n` plus `X-Strategy-Options: {"n": 8}` wins over a body field
`"strategy": {"name": "self_consistency", "n": 8}` (or just `"strategy": "self_consistency"`). An unknown
name or a bad option is a 400 that says what is valid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from server.errors import invalid_request
from strategies.base import STRATEGIES, Strategy, StrategyOptions

# On a model with introspection heads, effort is the adaptive strategy's price of compute and its caps; on one
# without, self-consistency of growing width.
ADAPTIVE_EFFORT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "minimal": ("single", {}),
    "low": ("adaptive", {"beta": 1.0, "k0": 1, "max_samples": 4}),
    "medium": ("adaptive", {"beta": 0.3, "k0": 2, "max_samples": 8}),
    "high": ("adaptive", {"beta": 0.1, "k0": 4, "max_samples": 16}),
}
REASONING_EFFORT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "minimal": ("single", {}),
    "low": ("single", {}),
    "medium": ("self_consistency", {"n": 4}),
    "high": ("self_consistency", {"n": 8}),
}


# Which request field a 400 blames, by where the strategy's name and its options came from.
NAME_PARAM = {"header": "X-Strategy", "body": "strategy", "reasoning_effort": "reasoning_effort", "default": "strategy"}
OPTIONS_PARAM = {**NAME_PARAM, "header": "X-Strategy-Options"}


@dataclass(frozen=True)
class StrategyChoice:
    strategy: Strategy
    options: StrategyOptions
    source: str  # "header" | "body" | "reasoning_effort" | "default"

    @property
    def name(self) -> str:
        return self.strategy.name


def parse_header_options(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid_request(f"X-Strategy-Options is not valid JSON: {exc.msg}", param="X-Strategy-Options") from exc
    if not isinstance(value, dict):
        raise invalid_request("X-Strategy-Options must be a JSON object", param="X-Strategy-Options")
    return value


def split_body_strategy(body: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(body, str):
        return body, {}
    options = dict(body)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise invalid_request('strategy must be a name or an object with a "name"', param="strategy")
    return name, options


def requested_strategy(
    header_name: str | None,
    header_options: str | None,
    body_strategy: str | Mapping[str, Any] | None,
    reasoning_effort: str | None,
    default_name: str,
    effort_presets: Mapping[str, tuple[str, dict[str, Any]]] = REASONING_EFFORT_PRESETS,
) -> tuple[str, dict[str, Any], str]:
    """(name, raw options, source) before validation."""
    if header_name:
        return header_name.strip(), parse_header_options(header_options), "header"
    if header_options:
        raise invalid_request("X-Strategy-Options needs an X-Strategy header", param="X-Strategy-Options")
    if body_strategy is not None:
        name, options = split_body_strategy(body_strategy)
        return name, options, "body"
    if reasoning_effort is not None:
        name, options = effort_presets[reasoning_effort]
        return name, dict(options), "reasoning_effort"
    return default_name, {}, "default"


def validate_options(
    strategy: Strategy, raw: dict[str, Any], context: Mapping[str, Any], param: str
) -> StrategyOptions:
    try:
        return strategy.Options.model_validate(raw, context=dict(context))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        valid = ", ".join(strategy.Options.model_fields) or "none"
        raise invalid_request(
            f"bad option for strategy {strategy.name!r}: {field}: {message} (its options: {valid})",
            param=f"{param}.{field}" if field else param,
        ) from exc


def choose_strategy(
    *,
    header_name: str | None,
    header_options: str | None,
    body_strategy: str | Mapping[str, Any] | None,
    reasoning_effort: str | None,
    default_name: str,
    strategies: Mapping[str, Strategy],
    validation_context: Mapping[str, Any],
) -> StrategyChoice:
    presets = ADAPTIVE_EFFORT_PRESETS if validation_context.get("has_introspection") else REASONING_EFFORT_PRESETS
    name, raw, source = requested_strategy(
        header_name, header_options, body_strategy, reasoning_effort, default_name, presets
    )
    if source == "reasoning_effort" and "max_samples" in validation_context:
        for key in ("n", "max_samples"):  # a preset must not trip the server's own cap
            if key in raw:
                raw[key] = min(raw[key], validation_context["max_samples"])
    strategy = strategies.get(name)
    if strategy is None:
        raise invalid_request(
            f"unknown strategy {name!r}; valid: {', '.join(sorted(strategies))}",
            param=NAME_PARAM[source],
            code="unknown_strategy",
        )
    return StrategyChoice(strategy, validate_options(strategy, raw, validation_context, OPTIONS_PARAM[source]), source)


def build_strategies() -> dict[str, Strategy]:
    import strategies  # noqa: F401  (registers the built-in strategies)

    return {name: cls() for name, cls in STRATEGIES.items()}
