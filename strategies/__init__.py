"""Test-time strategies. Importing this package registers every built-in strategy in `STRATEGIES`."""

from strategies import adaptive, best_of_n, reflection, self_consistency, single, tree_search  # noqa: F401  (registration)
from strategies.base import STRATEGIES, Prompt, Result, Strategy, StrategyContext, register_strategy

__all__ = ["STRATEGIES", "Prompt", "Result", "Strategy", "StrategyContext", "register_strategy"]
