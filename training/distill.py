"""Distill served traces back into the model: `ponder distill --traces DIR --output_dir OUT [--method M] [flags]`.

TRL's pattern: a config dataclass extends the trainer's config with the journal's fields only, and `main(config)`
builds a conversational `Dataset` from the selected traces and hands it to the trainer. `--method` picks it:

    sft      DistillConfig(SFTConfig) -> SFTTrainer on the kept completions (loss on the assistant turn only)
    dpo      PreferenceDistillConfig(DPOConfig) -> DPOTrainer on (kept, rejected) pairs of the same prompt
    sft+dpo  the same DPOTrainer with TRL's "sft" loss added on the chosen side (iterative RPO, Pang et al.
             2024: DPO alone on self-generated reasoning can lower the chosen answers' likelihood too)

Each round starts from the base model (ReST-EM), seeded; DPO's reference model is that base. The output
directory is a plain transformers model the server serves with `ponder serve --model OUT`; a LoRA run also
keeps its adapter in `OUT/adapter`. The same command runs under `accelerate launch` on GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trl import DPOConfig, SFTConfig

from training.rationalize import load_rationales
from training.selection import Selection, SelectionConfig, select_from_journal, to_preference_rows, to_sft_rows

logger = logging.getLogger(__name__)

REPORT_FILE = "ponder-distill.json"
METHODS = ("sft", "dpo", "sft+dpo")


@dataclass
class TraceSelectionArguments:
    """The journal's fields, shared by the SFT and the preference config (each extends its TRL config with them)."""

    method: str = field(
        default="sft",
        metadata={
            "help": "sft: fine-tune on the kept completions; dpo: DPO on (kept, rejected) pairs; sft+dpo: DPO plus "
            "an SFT loss on the chosen side. `--method dpo --help` lists the DPO flags.",
            "choices": list(METHODS),
        },
    )
    traces: str = field(default="traces", metadata={"help": "Trace journal: a directory or an fsspec URL."})
    sealed_only: bool = field(
        default=False, metadata={"help": "Read sealed segments only (leave out a running server's active one)."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Model to fine-tune: an embedded name or a local directory (default: embedded)."},
    )
    reward_source: str = field(
        default="auto",
        metadata={"help": "auto | feedback | reference | verifier: where a candidate's reward comes from."},
    )
    verifier: str = field(
        default="answer_agreement", metadata={"help": "Verifier score used as reward (source verifier)."}
    )
    threshold: float = field(default=1.0, metadata={"help": "Keep candidates whose reward is at least this."})
    max_per_prompt: int = field(
        default=4, metadata={"help": "At most this many examples (or preference pairs) per prompt (ReST-EM)."}
    )
    min_examples: int = field(default=8, metadata={"help": "Refuse to train on fewer examples (pairs for DPO)."})
    rationales: str | None = field(
        default=None,
        metadata={"help": "JSONL of STaR rationalizations (`ponder loop --rationalize` writes them) to add (sft)."},
    )
    use_lora: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter (peft) and merge it, or train all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})

    def check_selection(self, methods: tuple[str, ...]) -> None:
        if self.method not in methods:
            raise ValueError(f"{type(self).__name__} trains with method {' or '.join(methods)}, not {self.method!r}")
        if self.reward_source not in ("auto", "feedback", "reference", "verifier"):
            raise ValueError(f"reward_source must be auto, feedback, reference or verifier, not {self.reward_source!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.max_per_prompt < 1:
            raise ValueError(f"max_per_prompt must be at least 1, got {self.max_per_prompt}")

    def selection(self) -> SelectionConfig:
        return SelectionConfig(self.reward_source, self.verifier, self.threshold, self.max_per_prompt)


@dataclass
class DistillConfig(SFTConfig, TraceSelectionArguments):
    # SFTConfig defaults better suited to a small model on a CPU (each stays a flag).
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the selected examples."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples per step and device."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (on for GPUs; fp32 is safer on CPU)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (big models)."})
    save_strategy: str = field(
        default="no", metadata={"help": "Intermediate checkpoints; the final model is always saved."}
    )
    logging_steps: float = field(default=5, metadata={"help": "Log the loss every this many steps."})
    logging_first_step: bool = field(
        default=True, metadata={"help": "Log the first step too (the report's first_loss, even for a short run)."}
    )
    max_length: int | None = field(default=1024, metadata={"help": "Truncate examples to this many tokens."})

    def __post_init__(self) -> None:
        self.check_selection(("sft",))
        super().__post_init__()


@dataclass
class PreferenceDistillConfig(DPOConfig, TraceSelectionArguments):
    method: str = field(
        default="dpo",
        metadata={
            "help": "dpo: DPO on (kept, rejected) pairs; sft+dpo: plus TRL's sft loss.",
            "choices": ["dpo", "sft+dpo"],
        },
    )
    # DPOConfig defaults better suited to a small model on a CPU (each stays a flag).
    learning_rate: float = field(
        default=5e-6, metadata={"help": "Peak learning rate (TRL's 1e-6 barely moves a 135M model in 100 steps)."}
    )
    beta: float = field(default=0.1, metadata={"help": "How far from the reference (the base) DPO may move."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the preference pairs."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Pairs per step and device (8 sequences, like SFT's 8 examples)."}
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (on for GPUs; fp32 is safer on CPU)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (big models)."})
    save_strategy: str = field(
        default="no", metadata={"help": "Intermediate checkpoints; the final model is always saved."}
    )
    logging_steps: float = field(default=5, metadata={"help": "Log the loss every this many steps."})
    logging_first_step: bool = field(
        default=True, metadata={"help": "Log the first step too (the report's first_loss, even for a short run)."}
    )

    def __post_init__(self) -> None:
        self.check_selection(("dpo", "sft+dpo"))
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.method == "sft+dpo" and "sft" not in self.loss_type:
            self.loss_type = [*self.loss_type, "sft"]
            if self.loss_weights is not None:
                self.loss_weights = [*self.loss_weights, 1.0]
        if self.rationales:
            logger.warning(
                "rationales are SFT examples without a rejected side: method %s leaves them out", self.method
            )
        super().__post_init__()


def load_base(base_model: str | None):
    """The base model in fp32 (training precision) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model_registry import resolve_model

    path = resolve_model(base_model).path
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def training_rows(config: DistillConfig | PreferenceDistillConfig, selection: Selection) -> list[dict[str, Any]]:
    """The trainer's dataset rows: prompt-completion for SFT (plus any rationalizations), prompt-chosen-rejected
    for DPO."""
    if config.method == "sft":
        rationales = load_rationales(config.rationales) if config.rationales else []
        return to_sft_rows([*selection.examples, *rationales])
    return to_preference_rows(selection.pairs)


def save_checkpoint(trainer, tokenizer, config: DistillConfig | PreferenceDistillConfig) -> None:
    """A model directory the server can serve: merged weights (bf16, like the base) and the tokenizer."""
    import torch

    out = Path(config.output_dir)
    model = trainer.model
    if config.use_lora:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def carry_over_heads(base_path: Path, out: Path) -> dict | None:
    """Keep the base's introspection rows servable in the new model, and say they are stale.

    The rows are part of the vocabulary, so the checkpoint already has them (and the tokenizer their tokens);
    the layout file makes the server read them. Fine-tuning moved the body they were fit on, so their
    predictions drift: retrain them on the new model, `ponder heads train --base-model OUT` (that reuses the rows).
    """
    from server.introspection import IntrospectionHeads

    heads = IntrospectionHeads.load(base_path)
    if heads is None:
        return None
    heads.save(out)
    return {"carried_over": True, "stale": True, "retrain": f"ponder heads train --base-model {out} --traces ..."}


def train_summary(trainer, config: DistillConfig | PreferenceDistillConfig, rows: int, seconds: float) -> dict:
    logged = trainer.state.log_history
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    summary = {
        "method": config.method,
        "examples": rows,  # SFT examples, or preference pairs for dpo / sft+dpo
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "learning_rate": config.learning_rate,
        "epochs": config.num_train_epochs,
        "lora": config.use_lora,
        "seed": config.seed,
    }
    if config.method != "sft":
        last = next((entry for entry in reversed(logged) if "rewards/margins" in entry), {})
        summary |= {
            "beta": config.beta,
            "loss_type": list(config.loss_type),
            "last_reward_accuracy": last.get("rewards/accuracies"),  # share of pairs where chosen beats rejected
            "last_reward_margin": last.get("rewards/margins"),
        }
    return summary


def build_trainer(config: DistillConfig | PreferenceDistillConfig, rows: list[dict[str, Any]], model, tokenizer):
    from datasets import Dataset

    dataset = Dataset.from_list(rows).shuffle(seed=config.seed)
    peft_config = None
    if config.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear")
    if config.method == "sft":
        from trl import SFTTrainer

        return SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    from trl import DPOTrainer

    # No ref_model: TRL loads a frozen copy of the base (or, with LoRA, disables the adapter) as the reference.
    return DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )


def main(config: DistillConfig | PreferenceDistillConfig) -> int:
    selection = select_from_journal(config.traces, config.selection(), config.sealed_only)
    logger.info("selection: %s", json.dumps(selection.report.as_dict()))
    rows = training_rows(config, selection)
    if len(rows) < config.min_examples:
        what = "examples" if config.method == "sft" else "preference pairs"
        logger.error("only %d %s cleared the selection (need %d)", len(rows), what, config.min_examples)
        return 1
    base_path, model, tokenizer = load_base(config.base_model)
    trainer = build_trainer(config, rows, model, tokenizer)
    started = time.monotonic()
    trainer.train()
    save_checkpoint(trainer, tokenizer, config)
    report = {
        "base_model": str(base_path),
        "introspection": carry_over_heads(base_path, Path(config.output_dir)),
        "traces": config.traces,
        "rationales": config.rationales,
        "selection": asdict(config.selection()),
        "report": selection.report.as_dict(),
        "train": train_summary(trainer, config, len(rows), time.monotonic() - started),
        "created": time.time(),
    }
    (Path(config.output_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2))
    print(json.dumps({"output_dir": config.output_dir, **report["train"]}, indent=2))
    return 0


def config_class(argv: list[str] | None) -> type[DistillConfig] | type[PreferenceDistillConfig]:
    """`--method` picks the config (and so the trainer and the flags that are valid)."""
    method_parser = argparse.ArgumentParser(add_help=False)
    method_parser.add_argument("--method", default="sft", choices=METHODS)
    known, _ = method_parser.parse_known_args(argv)
    return DistillConfig if known.method == "sft" else PreferenceDistillConfig


def cli(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(config_class(argv)).parse_args_into_dataclasses(args=argv)
    return main(config)


if __name__ == "__main__":
    sys.exit(cli())
