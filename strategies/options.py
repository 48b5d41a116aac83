"""Option fields that several strategies share, each validated against the server's caps."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from strategies.base import StrategyOptions, cap_from_context


class SampledOptions(StrategyOptions):
    """Options of a strategy that draws `n` independent samples."""

    n: int = Field(4, ge=1, description="number of samples")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="sampling temperature; default: the request's, or 0.8 if it asked for 0"
    )

    @field_validator("n")
    @classmethod
    def n_within_cap(cls, n: int, info: ValidationInfo) -> int:
        cap = cap_from_context(info, "max_samples")
        if cap is not None and n > cap:
            raise ValueError(f"n={n} is over this server's cap of {cap} samples per request")
        return n


def max_samples_within_cap(value: int | None, info: ValidationInfo, default: int | None = None) -> int | None:
    """A search's total sample option: refused over the server's cap; when absent, `default` (capped) or the cap."""
    cap = cap_from_context(info, "max_samples")
    if value is not None and cap is not None and value > cap:
        raise ValueError(f"max_samples={value} is over this server's cap of {cap} samples per request")
    if value is not None:
        return value
    if default is None:
        return cap
    return default if cap is None else min(default, cap)


def check_verifier_name(name: str, info: ValidationInfo) -> str:
    """A verifier option must name a registered verifier; one that needs a reference needs the request to have one."""
    context = info.context or {}
    known = context.get("verifiers")
    if known is not None and name not in known:
        raise ValueError(f"unknown verifier {name!r}; valid: {', '.join(sorted(known))}")
    if name in context.get("reference_verifiers", ()) and not context.get("has_reference"):
        raise ValueError(f"verifier {name!r} needs a reference answer: send `reference` in the request body")
    unavailable = context.get("unavailable_verifiers", {}).get(name)
    if unavailable:
        raise ValueError(unavailable)
    if name in context.get("test_verifiers", ()) and not context.get("has_tests"):
        raise ValueError(f"verifier {name!r} needs tests to run: send `tests` in the request body")
    return name


DEFAULT_SEARCH_TEMPERATURE = 0.8  # diverse enough to disagree, cool enough to stay on topic for small models


def search_temperature(option: float | None, requested: float) -> float:
    """Samples must differ to be worth choosing between: a greedy request still samples unless told not to."""
    if option is not None:
        return option
    return requested if requested > 0 else DEFAULT_SEARCH_TEMPERATURE
