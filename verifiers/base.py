"""The verifier interface: score every candidate for one prompt, one score in [0, 1] each.

Verifiers are stateless and shared across requests; one that needs a heavy model loads it lazily, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from server.engine import Engine, Generation
    from strategies.base import Prompt, StrategyContext


@dataclass(frozen=True)
class Verdict:
    """A score and, from verifiers that can say why (failing tests, unmet checklist items), feedback."""

    score: float
    feedback: str | None = None


class Verifier(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    needs_reference: ClassVar[bool] = False
    needs_tests: ClassVar[bool] = False
    # Engine capabilities it relies on (server.engine: TOKEN_IDS, TRACKED_LOGPROBS); without them it is unavailable.
    requires: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    async def score(self, ctx: StrategyContext, prompt: Prompt, generations: Sequence[Generation]) -> list[float]:
        """One score in [0, 1] per generation, in order."""

    def unavailable_reason(self, engine: Engine) -> str | None:
        """Why this verifier cannot run on this server (say, no model configured, or a model without the heads
        it reads), or None: a request naming it then gets a 400 before anything is sampled."""
        return None

    async def verdicts(self, ctx: StrategyContext, prompt: Prompt, generations: Sequence[Generation]) -> list[Verdict]:
        """Scores with feedback. Verifiers that can explain a low score override this; the rest give none."""
        return [Verdict(score) for score in await self.score(ctx, prompt, generations)]


VERIFIERS: dict[str, type[Verifier]] = {}


def register_verifier(cls: type[Verifier]) -> type[Verifier]:
    if cls.name in VERIFIERS:
        raise ValueError(f"verifier {cls.name!r} registered twice")
    VERIFIERS[cls.name] = cls
    return cls


def build_verifiers() -> dict[str, Verifier]:
    """One instance of every registered verifier, for a server to share across requests."""
    return {name: cls() for name, cls in VERIFIERS.items()}
