"""One tiny distillation round end to end, on the real model: serve -> traces -> distill -> serve the result.

This proves the plumbing (a checkpoint the server loads and answers with, a report written); the benchmark in
docs/benchmarks.md is what measures the gain.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest

from server.trace_journal import read_records
from training.distill import REPORT_FILE, DistillConfig, PreferenceDistillConfig
from training.distill import main as distill_main
from training.evaluate import EvalConfig, run_eval, summarize, write_report
from training.server_process import ServerProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.own_servers,
    pytest.mark.usefixtures("no_shared_server"),
]

SERVE_ARGS = ("--max-model-len", "1024")


def eval_config(server: ServerProcess, out: Path, count: int, strategies: list[str], max_tokens: int = 48):
    return EvalConfig(
        base_url=server.base_url,
        count=count,
        seed=7,
        strategies=strategies,
        max_tokens=max_tokens,
        concurrency=4,
        output_dir=str(out),
    )


@pytest.fixture(scope="module")
def bootstrap_traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few dozen traces from the base model: 12 prompts, 4 samples each, graded against the reference.

    64 tokens let most samples finish, so the prompts mix right and wrong answers and DPO gets pairs."""
    work = tmp_path_factory.mktemp("bootstrap")
    traces = work / "traces"
    with ServerProcess(None, traces, work / "base.log", SERVE_ARGS) as server:
        config = eval_config(server, work / "bootstrap", 12, ["self_consistency:n=4"], max_tokens=64)
        results = asyncio.run(run_eval(config))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    requests = [r for r in read_records(traces) if r["type"] == "request"]
    assert len(requests) == 12 and all(len(r["candidates"]) == 4 for r in requests)
    return traces


def assert_served_and_answers(checkpoint: Path, work: Path) -> ServerProcess:
    """Serve the checkpoint, ask it one question, and leave the server running for more (the caller stops it)."""
    server = ServerProcess(str(checkpoint), work / "new-traces", work / "new.log", SERVE_ARGS).__enter__()
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    (model,) = [m.id for m in client.models.list()]
    assert model == checkpoint.name  # a local directory is served under its name
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 3 * 4?"}], max_tokens=32, temperature=0
    )
    assert reply.choices[0].message.content.strip()
    return server


def test_a_distilled_checkpoint_is_served_and_evaluated(bootstrap_traces: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model"
    distill = DistillConfig(
        output_dir=str(checkpoint),
        traces=str(bootstrap_traces),
        reward_source="reference",
        threshold=0.0,
        max_per_prompt=2,
        min_examples=4,
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        seed=0,
    )
    assert distill_main(distill) == 0
    report = json.loads((checkpoint / REPORT_FILE).read_text())
    assert report["train"]["steps"] == 2 and report["train"]["method"] == "sft"
    assert report["report"]["requests"] == 12 and report["report"]["kept"] == report["train"]["examples"] > 0
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.json").exists()

    server = assert_served_and_answers(checkpoint, tmp_path)
    try:
        config = eval_config(server, tmp_path / "eval", 4, ["single"])
        results = asyncio.run(run_eval(config))
        json_path, png_path = write_report(config, results, summarize(results))
    finally:
        server.stop()
    written = json.loads(json_path.read_text())
    assert [row["strategy"] for row in written["summary"]] == ["single"] and written["summary"][0]["n"] == 4
    assert png_path.stat().st_size > 1000


def test_a_dpo_checkpoint_is_served(bootstrap_traces: Path, tmp_path: Path) -> None:
    """DPO on the right-vs-wrong pairs (full fine-tuning: TRL loads the base as the reference), then served."""
    checkpoint = tmp_path / "dpo-model"
    config = PreferenceDistillConfig(
        output_dir=str(checkpoint),
        traces=str(bootstrap_traces),
        reward_source="reference",
        min_examples=2,
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        seed=0,
    )
    assert distill_main(config) == 0
    report = json.loads((checkpoint / REPORT_FILE).read_text())
    train = report["train"]
    assert (train["method"], train["steps"], train["loss_type"]) == ("dpo", 2, ["sigmoid"])
    assert train["examples"] == report["report"]["pairs"] >= 2
    assert train["first_loss"] == pytest.approx(0.6931, abs=0.01)  # log 2: the policy starts as its reference
    assert train["last_reward_accuracy"] is not None
    assert_served_and_answers(checkpoint, tmp_path).stop()


def test_sft_plus_dpo_with_lora_keeps_the_adapter(bootstrap_traces: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "rpo-model"
    config = PreferenceDistillConfig(
        output_dir=str(checkpoint),
        traces=str(bootstrap_traces),
        method="sft+dpo",
        use_lora=True,
        reward_source="reference",
        min_examples=2,
        max_steps=1,
        per_device_train_batch_size=2,
        seed=0,
    )
    assert distill_main(config) == 0
    train = json.loads((checkpoint / REPORT_FILE).read_text())["train"]
    assert (train["method"], train["loss_type"], train["lora"]) == ("sft+dpo", ["sigmoid", "sft"], True)
    assert (checkpoint / "adapter" / "adapter_config.json").exists() and (checkpoint / "model.safetensors").exists()
