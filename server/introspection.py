"""Introspective reward/cost heads (after ZIP-RC): what the reserved vocabulary rows mean and how to read them.

A model with heads has R x L extra rows at the end of its vocabulary. At every position, the logits of those rows,
softmaxed among themselves, are the model's joint prediction of

    (final reward of this answer, tokens still to generate before it ends)

with the reward in R equal bins over [0, 1] and the remaining length in L bins with the edges below. The rows are
masked from sampling (a -100 logit bias), so generation is unchanged; vLLM returns their log-probs in the same
forward pass through `SamplingParams.logprob_token_ids`.

The layout is stored beside the model's config as `ponder-introspection.json`; a model directory without that
file has no heads, and strategies that need them are refused with a 400.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

HEADS_FILE = "ponder-introspection.json"
MASK_BIAS = -100.0  # the most negative logit bias vLLM accepts; far below any real logit of these rows
# Length edges from the design, for answers up to 1024 tokens; `default_length_edges` scales them to max_tokens.
REFERENCE_LENGTH_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024)
REFERENCE_MAX_TOKENS = 1024


def default_length_edges(max_tokens: int) -> tuple[float, ...]:
    """The design's edges 0, 16, ..., 1024, inf, scaled so the last finite edge is `max_tokens`."""
    scale = max_tokens / REFERENCE_MAX_TOKENS
    finite = sorted({round(edge * scale) for edge in REFERENCE_LENGTH_EDGES})
    return (*map(float, finite), math.inf)


def head_token(reward_bin: int, length_bin: int) -> str:
    return f"<|ponder_r{reward_bin}_l{length_bin}|>"


@dataclass(frozen=True)
class IntrospectionHeads:
    """Where the heads sit in the vocabulary and what their bins mean."""

    first_token_id: int
    reward_bins: int = 8
    length_edges: tuple[float, ...] = default_length_edges(REFERENCE_MAX_TOKENS)  # L + 1 edges, the last is inf

    def __post_init__(self) -> None:
        if self.reward_bins < 2:
            raise ValueError("introspection needs at least 2 reward bins")
        edges = self.length_edges
        if len(edges) < 3 or edges[0] != 0 or not math.isinf(edges[-1]) or list(edges) != sorted(set(edges)):
            raise ValueError(f"length edges must rise strictly from 0 to inf, got {edges}")

    # -- layout
    @property
    def length_bins(self) -> int:
        return len(self.length_edges) - 1

    @property
    def size(self) -> int:
        return self.reward_bins * self.length_bins

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Row r * L + l is (reward bin r, length bin l)."""
        return tuple(range(self.first_token_id, self.first_token_id + self.size))

    def token_strings(self) -> list[str]:
        return [head_token(r, l) for r in range(self.reward_bins) for l in range(self.length_bins)]  # noqa: E741

    # -- bins
    def reward_bin(self, reward: float) -> int:
        return min(max(int(reward * self.reward_bins), 0), self.reward_bins - 1)

    def length_bin(self, remaining_tokens: float) -> int:
        return min(max(bisect_right(self.length_edges, remaining_tokens) - 1, 0), self.length_bins - 1)

    def target_class(self, reward: float, remaining_tokens: float) -> int:
        return self.reward_bin(reward) * self.length_bins + self.length_bin(remaining_tokens)

    @property
    def reward_values(self) -> np.ndarray:
        """The reward each bin stands for: its centre."""
        return (np.arange(self.reward_bins) + 0.5) / self.reward_bins

    @property
    def length_values(self) -> np.ndarray:
        """The remaining length each bin stands for: its midpoint; the open last bin counts as twice its start."""
        edges = self.length_edges
        return np.array([(lo + hi) / 2 if math.isfinite(hi) else 2 * lo for lo, hi in pairwise(edges)])

    # -- reading a position
    def joint(self, logprobs: Mapping[int, float]) -> np.ndarray:
        """(R, L) probabilities from the log-probs vLLM returned for `token_ids` at one position."""
        logits = np.array([logprobs.get(t, -math.inf) for t in self.token_ids], dtype=np.float64)
        if not np.isfinite(logits).any():
            raise ValueError("no introspection log-probs at this position")
        weights = np.exp(logits - logits[np.isfinite(logits)].max())
        return (weights / weights.sum()).reshape(self.reward_bins, self.length_bins)

    def joints(self, positions: Sequence[Mapping[int, float]]) -> list[np.ndarray]:
        return [self.joint(p) for p in positions]

    def expected_reward(self, joint: np.ndarray) -> float:
        return float(joint.sum(axis=1) @ self.reward_values)

    def expected_remaining(self, joint: np.ndarray) -> float:
        return float(joint.sum(axis=0) @ self.length_values)

    # -- the file beside the model's config
    def save(self, model_dir: str | Path) -> None:
        data = {
            "format": "ponder-introspection/1",
            "first_token_id": self.first_token_id,
            "reward_bins": self.reward_bins,
            "length_edges": [e if math.isfinite(e) else None for e in self.length_edges],
            "layout": "row = first_token_id + reward_bin * length_bins + length_bin",
        }
        (Path(model_dir) / HEADS_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> IntrospectionHeads | None:
        """The heads of a local model directory, or None if it has none."""
        path = Path(model_dir) / HEADS_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        edges = tuple(math.inf if e is None else float(e) for e in data["length_edges"])
        return cls(int(data["first_token_id"]), int(data["reward_bins"]), edges)
