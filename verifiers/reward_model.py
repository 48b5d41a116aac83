"""Reward model (optional): a local transformers sequence-classification model scores each candidate.

An outcome reward model (ORM, e.g. Cobbe et al. 2021) reads the question and the whole answer; used as a process
reward model (PRM, Lightman et al. 2023) it reads the question and each prefix of the answer's steps (steps are
split on blank lines) and the per-step scores are aggregated by `aggregate_steps`: `last` (the whole answer, one
forward pass: the ORM case), `min` (the weakest step) or `prod` (every step right).

Configuration, read when the server builds its verifiers:
- `PONDER_REWARD_MODEL`: a local directory with a tokenizer and an `AutoModelForSequenceClassification`
  checkpoint (nothing is downloaded). Unset: the verifier is still listed, and a request that uses it fails with
  a message saying so.
- `PONDER_REWARD_MODEL_AGGREGATION`: `last` (default), `min` or `prod`.

A score is sigmoid(logit) for a one-label head, else the softmax probability of the last label ("good"). The
model loads once, on first use, in a worker thread; inference runs there too, batched, one batch at a time.
Token-classification PRMs that read a score at a step-separator token (Math-Shepherd, Qwen2.5-Math-PRM) are not
supported: they need their own separator and label conventions.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Sequence

from server.engine import Engine, Generation
from strategies.base import Prompt, StrategyContext
from verifiers.base import Verifier, register_verifier

MODEL_ENV = "PONDER_REWARD_MODEL"
AGGREGATION_ENV = "PONDER_REWARD_MODEL_AGGREGATION"
AGGREGATIONS = ("last", "min", "prod")
BATCH_SIZE = 8  # texts per forward pass: bounded memory on CPU
MAX_INPUT_TOKENS = 4096  # unless the model allows less; truncation keeps the end, where the answer concludes


def aggregate_steps(step_scores: Sequence[float], how: str) -> float:
    """One score from per-step scores: the last step's, the weakest step's, or the product of all."""
    if not step_scores:
        raise ValueError("no step scores to aggregate")
    if how == "last":
        return step_scores[-1]
    if how == "min":
        return min(step_scores)
    if how == "prod":
        return math.prod(step_scores)
    raise ValueError(f"unknown aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")


def probability_of_good(logits):
    """(batch, num_labels) logits -> (batch,) probabilities: sigmoid of a single logit, else the last label's."""
    return logits[:, 0].sigmoid() if logits.shape[-1] == 1 else logits.softmax(dim=-1)[:, -1]


def split_steps(text: str) -> list[str]:
    """The answer's steps: its blank-line-separated paragraphs (an empty answer is one empty step)."""
    steps = [block.strip() for block in text.replace("\r\n", "\n").split("\n\n")]
    return [step for step in steps if step] or [text.strip()]


class _Loaded:
    """The tokenizer and model, loaded together, used from one thread at a time."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        if self.tokenizer.pad_token is None:  # decoder-only checkpoints often have none; batching needs one
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:  # how the head finds each row's last real token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        limits = [MAX_INPUT_TOKENS, self.tokenizer.model_max_length]
        limits.append(getattr(self.model.config, "max_position_embeddings", None) or MAX_INPUT_TOKENS)
        self.max_length = int(min(limits))
        self.lock = threading.Lock()

    def format(self, question: str, answer: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{question}\n\n{answer}"

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        """P(good) for each text, in batches."""
        scores: list[float] = []
        with self.lock, self.torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                batch = self.tokenizer(
                    list(texts[start : start + BATCH_SIZE]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                scores.extend(probability_of_good(self.model(**batch).logits.float()).tolist())
        return scores


@register_verifier
class RewardModel(Verifier):
    name = "reward_model"
    description = f"a local transformers reward model (optional: set {MODEL_ENV}), outcome or per-step"

    def __init__(self, path: str | None = None, aggregation: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get(MODEL_ENV) or None
        self.aggregation = aggregation or os.environ.get(AGGREGATION_ENV) or "last"  # checked on use, like the path
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()

    def unavailable_reason(self, engine: Engine) -> str | None:
        if self.path is None:
            return f"the reward_model verifier has no model: start the server with {MODEL_ENV} set"
        if not os.path.isdir(self.path):
            return f"{MODEL_ENV}={self.path!r} is not a directory"
        if self.aggregation not in AGGREGATIONS:
            return f"{AGGREGATION_ENV}={self.aggregation!r}; valid: {', '.join(AGGREGATIONS)}"
        return None

    def _model(self) -> _Loaded:
        """Load on first use, once, whichever thread gets here first."""
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    if self.path is None:
                        raise ValueError(
                            f"the reward_model verifier has no model: set {MODEL_ENV} to a local transformers "
                            "directory (a sequence-classification checkpoint) and restart the server"
                        )
                    if not os.path.isdir(self.path):
                        raise ValueError(f"{MODEL_ENV}={self.path!r} is not a directory")
                    self._loaded = _Loaded(self.path)
        return self._loaded

    async def score(self, ctx: StrategyContext, prompt: Prompt, generations: Sequence[Generation]) -> list[float]:
        if not generations:
            return []
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{AGGREGATION_ENV}={self.aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        steps = [split_steps(g.text) for g in generations]
        only_last = self.aggregation == "last"  # the last prefix is the whole answer: one pass per candidate
        per_candidate = await asyncio.to_thread(self._score_prefixes, prompt.question, steps, only_last)
        return [aggregate_steps(scores, self.aggregation) for scores in per_candidate]

    async def step_scores(self, prompt: Prompt, generations: Sequence[Generation]) -> list[list[float]]:
        """Per-step scores of every candidate: the score of the question with each prefix of its steps."""
        steps = [split_steps(g.text) for g in generations]
        return await asyncio.to_thread(self._score_prefixes, prompt.question, steps)

    def _score_prefixes(
        self, question: str, steps: Sequence[Sequence[str]], only_last: bool = False
    ) -> list[list[float]]:
        """For each candidate, the scores of the question with each prefix of its steps (or the whole answer)."""
        loaded = self._model()
        ends = [[len(candidate)] if only_last else range(1, len(candidate) + 1) for candidate in steps]
        texts = [
            loaded.format(question, "\n\n".join(c[:end])) for c, ends_of_c in zip(steps, ends) for end in ends_of_c
        ]
        flat = iter(loaded.probabilities(texts))
        return [[next(flat) for _ in ends_of_c] for ends_of_c in ends]
